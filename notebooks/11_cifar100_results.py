# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11 · The CIFAR-100 study: what the five heads learned, and how they get things wrong
#
# Notebook 08 trained the heads for seconds on tiny images. This one reads the real study:
# the package's CNN body (widths 32-64-128, 256 features) trained for 30 epochs on the
# 45,000 CIFAR-100 training images with each head — the same body, seed, augmentation,
# optimiser (SGD with momentum, cosine schedule) and budget for all of them — by
#
# ```bash
# python examples/compare.py --dataset cifar100 --data-dir DEST --no-download --epochs 30 --jobs 2
# ```
#
# which writes one folder per run into `results/cifar100/`. The five runs:
#
# | run | head |
# |---|---|
# | `softmax` | the flat softmax over 100 classes (notebook 01) |
# | `gumbel` | Gumbel-softmax, $\tau$ annealed from 1 towards 0.5 (notebook 05) |
# | `hierarchical-superclass` | a two-level tree: the 20 CIFAR superclasses, then their 5 classes (notebook 06) |
# | `hierarchical-balanced` | a balanced binary tree (depth 7) over the classes in label order, i.e. alphabetical: a tree whose groups ignore meaning, the control |
# | `adaptive` | adaptive softmax, a head of 50 classes and one tail cluster (notebook 07) |
#
# Each run held 5,000 training images out for validation and kept the epoch with the best
# **validation** top-1 (its `weights.npz`); the test split was only ever reported. Part 1 uses only
# the committed files (tables, curves, calibration, the superclass confusion) and needs no images.
# Part 2 loads the committed weights, re-evaluates them on 2,000 test images and looks at the
# images themselves: the most confident mistakes, mistakes inside vs outside the true superclass,
# and the classes on which the heads disagree.

# %%
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

from npsoftmax.data import COARSE_NAMES, COARSE_OF_FINE, FINE_NAMES, default_data_dir, read_batch_file, stratified_indices
from npsoftmax.metrics import confusion_matrix, evaluation_record
from npsoftmax.plots import plot_reliability
from npsoftmax.train import best_record, predict_log_probs
from npsoftmax.weights import load_weights

REPOSITORY = Path.cwd().resolve().parent          # notebooks run with notebooks/ as working directory
RESULTS = REPOSITORY / "results" / "cifar100"
STUDY = ("softmax", "gumbel", "hierarchical-superclass", "hierarchical-balanced", "adaptive")
K, N_SUPERCLASSES = len(FINE_NAMES), len(COARSE_NAMES)
# If a mistake picked one of the 99 wrong classes at random, 4 of them share the true superclass.
CHANCE_IN_SUPERCLASS = 4 / 99
SHORT_NAMES = {"softmax": "softmax", "gumbel": "gumbel", "hierarchical-superclass": "hier-super",
               "hierarchical-balanced": "hier-bal", "adaptive": "adaptive"}


def read_json(path):
    with open(path) as stream:
        return json.load(stream)


runs, missing = [], []
for name in STUDY:
    folder = RESULTS / name
    if (folder / "weights.npz").is_file():
        runs.append(name)
    elif (folder / "history.json").is_file():
        planned = read_json(folder / "args.json")["epochs"]
        missing.append(f"{name} (still training: {len(read_json(folder / 'history.json'))}/{planned} epochs)")
    else:
        missing.append(f"{name} (not started)")
assert runs, f"no finished run (no weights.npz) in {RESULTS}: train them with examples/compare.py first"
print(f"finished runs ({len(runs)} of {len(STUDY)}): {', '.join(runs)}")
print(f"missing: {', '.join(missing)}" if missing else "missing: none")

# %% [markdown]
# ## Part 1 · The committed results
#
# ### 1 · The table
#
# For each finished run, the test figures of its best epoch by validation top-1 (the epoch its
# `weights.npz` holds), from `history.json`:
#
# * **top-1 / top-5** — the usual accuracies; **NLL** — the mean $-\log p(y \mid x)$, which punishes a
#   confident mistake far more than a hesitant one;
# * **ECE** — the expected calibration error (section 3);
# * **superclass acc** — how often the *fine* prediction lies in the true superclass (a wrong
#   "maple" for an "oak" counts as right here: both are *trees*);
# * **errors in superclass** — among the mistakes only, the share that stays in the true
#   superclass (section 4). Guessing a wrong class at random would give $4/99 \approx 0.040$.

# %%
histories = {name: read_json(RESULTS / name / "history.json") for name in runs}
best = {name: best_record(history) for name, history in histories.items()}  # the epoch in weights.npz

columns = [("test_top1", "top-1", ".4f"), ("test_top5", "top-5", ".4f"), ("test_loss", "NLL", ".3f"),
           ("test_ece", "ECE", ".3f"), ("test_coarse_top1", "superclass acc", ".4f"),
           ("test_in_superclass_error_share", "errors in superclass", ".3f"), ("val_top1", "val top-1", ".4f"),
           ("epoch", "best epoch", "d")]
lines = ["| run | " + " | ".join(title for _, title, _ in columns) + " | epochs |", "|---|" + "---:|" * (len(columns) + 1)]
for name, record in best.items():
    lines.append(f"| {name} | " + " | ".join(format(record[key], spec) for key, _, spec in columns)
                 + f" | {len(histories[name])} |")
display(Markdown("\n".join(lines)))

# Each weights.npz is the best epoch of its history (the file records the epoch and its figures).
weights = {name: load_weights(RESULTS / name / "weights.npz") for name in runs}
for name, (model, info) in weights.items():
    assert info["epoch"] == best[name]["epoch"], (name, info["epoch"], best[name]["epoch"])
    assert info["test_top1"] == best[name]["test_top1"] and info["val_top1"] == best[name]["val_top1"], name
# compare.py writes report.md once all runs finish: its table must agree with the histories.
report = RESULTS / "report.md"
if report.is_file():
    rows = [line.split("|")[1:-1] for line in report.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    reported = {cells[0].strip(): float(cells[header.index("top-1")]) for cells in rows[1:]}
    for name in set(reported) & set(best):
        assert abs(reported[name] - best[name]["test_top1"]) < 1e-4, (name, reported[name])
    print(f"report.md agrees with the histories on {len(set(reported) & set(best))} runs")
else:
    print("no report.md yet (compare.py writes it when every run has finished)")

# %% [markdown]
# ### 2 · Learning curves
#
# Left: top-1 per epoch on the validation split (dashed) and the test split (solid); the dot is the
# epoch each run kept. The two splits track each other within sampling error, which is why choosing
# the epoch on validation is safe; with the cosine schedule the best epochs come at the end, when the
# learning rate has decayed. Right: the test NLL. Unlike accuracy it also moves with *confidence*: of
# two heads with about the same accuracy, the one with the higher NLL puts less probability on the
# right class — typically because it is more sure of its mistakes. That is the next section's topic.

# %%
fig, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4))
for index, (name, history) in enumerate(histories.items()):
    color = f"C{index}"
    epochs = [record["epoch"] for record in history]
    accuracy_axis.plot(epochs, [record["test_top1"] for record in history], color=color, label=name)
    accuracy_axis.plot(epochs, [record["val_top1"] for record in history], color=color, linestyle="--")
    accuracy_axis.plot(best[name]["epoch"], best[name]["test_top1"], "o", color=color)
    loss_axis.plot(epochs, [record["test_loss"] for record in history], color=color, label=name)
accuracy_axis.set(xlabel="epoch", ylabel="top-1 (solid: test, dashed: validation)", title="accuracy")
loss_axis.set(xlabel="epoch", ylabel="test NLL (nats)", title="test negative log-likelihood")
for axis in (accuracy_axis, loss_axis):
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
fig.tight_layout()
plt.show()

for name in runs:
    gap = best[name]["val_top1"] - best[name]["test_top1"]
    print(f"{name:>24}: kept epoch {best[name]['epoch']:2d}, validation - test top-1 = {gap:+.4f}")
    # 5,000 validation and 10,000 test images: a few points would already be a warning sign.
    assert abs(gap) < 0.03, name

# %% [markdown]
# ### 3 · Calibration: does 80% confidence mean 80% right?
#
# A reliability diagram sorts the test images by the model's top-1 probability
# $\max_k p(k \mid x)$ into 15 bins and plots, per bin, how often the prediction was right. A
# calibrated model sits on the diagonal; bars *below* it mean over-confidence. The expected
# calibration error summarises the gaps, weighted by how many images fall in each bin:
# $\mathrm{ECE} = \sum_b \frac{n_b}{N} \left| \mathrm{acc}_b - \mathrm{conf}_b \right|$.
#
# Why the heads can differ: all are trained by maximum likelihood, which rewards calibration only
# through the NLL. The Gumbel head's training loss is that of a noisy sample at temperature
# $\tau < 1$, so at test time (no noise, $\tau$ folded away) its probabilities need not be the
# ones the likelihood would pick. The hierarchical heads multiply two softmaxes,
# $p(y) = p(\text{group}) \, p(y \mid \text{group})$, so an over-confident group decision carries over to
# every class in it. Each run's `reliability.json` holds the bins of its kept model on the full test split.

# %%
reliability = {name: read_json(RESULTS / name / "reliability.json") for name in runs}
scratch = tempfile.TemporaryDirectory()          # the package's plot functions write files; shown, then deleted
display(Image(filename=plot_reliability(reliability, f"{scratch.name}/reliability.png"), width=min(1000, 260 * len(runs))))
for name, bins in reliability.items():
    count, gap = np.asarray(bins["count"]), np.abs(np.subtract(bins["accuracy"], bins["confidence"]))
    over = np.sum(count * np.subtract(bins["confidence"], bins["accuracy"])) / count.sum()
    print(f"{name:>24}: ECE {best[name]['test_ece']:.3f}, mean confidence - accuracy {over:+.3f}")
    assert count.sum() == 10_000, name                               # the full test split
    # The bins are those of the kept epoch: they give back the ECE its history recorded.
    assert abs(np.sum(count * gap) / count.sum() - best[name]["test_ece"]) < 1e-9, name

# %% [markdown]
# ### 4 · How bad are the mistakes? The superclass confusion
#
# CIFAR-100's 100 classes come in 20 superclasses of 5 (*trees*: maple, oak, palm, pine, willow).
# Summing the $100 \times 100$ confusion matrix $C$ over the groups gives the $20 \times 20$ superclass
# confusion $M^\top C M$ (with $M$ the class-to-superclass membership matrix,
# `npsoftmax.metrics.coarse_confusion`); its diagonal counts the predictions that land in the right
# superclass, right class or not. Mistaking an oak for a maple is a milder error than mistaking it
# for a bus.
#
# Why might the `hierarchical-superclass` head keep more of its mistakes inside the true superclass?
# Its first decision *is* the superclass, trained directly on every image, and its second decision
# only ranks the five classes of that superclass against each other; once the group decision is
# right, the only mistakes left are within-group ones. The flat softmax learns the grouping only
# implicitly, through features that similar classes share. The `hierarchical-balanced` run is the
# control: also a tree, but its splits are alphabetical (*apple, aquarium fish, baby, bear* share a
# subtree), so an advantage that comes from being a tree at all shows up there too, and one that
# comes from the *semantic* groups does not. (The flip side: the superclass head must get the
# group right first, and a wrong group decision sends the mistake out of the superclass for sure.)
# All heads are far above the chance level of $4/99$ — similar-looking classes share a superclass —
# so the question is by how much each head moves it.

# %%
shares = {name: best[name]["test_in_superclass_error_share"] for name in runs}
coarse = {name: best[name]["test_coarse_top1"] for name in runs}
fig, axis = plt.subplots(figsize=(1.6 * len(runs) + 3, 3.4))
positions = np.arange(len(runs))
axis.bar(positions - 0.2, [shares[name] for name in runs], width=0.4, label="share of errors in the true superclass")
axis.bar(positions + 0.2, [coarse[name] for name in runs], width=0.4, label="superclass accuracy of the fine prediction")
axis.axhline(CHANCE_IN_SUPERCLASS, color="black", linestyle=":", label="chance share, 4/99")
axis.set_xticks(positions, runs, fontsize=8)
axis.set(ylim=(0, 1), title="mistake severity on the full test split (kept epoch)")
axis.legend(fontsize=8, loc="upper right")
axis.grid(alpha=0.3, axis="y")
plt.show()

for name in runs:
    assert shares[name] > 2 * CHANCE_IN_SUPERCLASS, (name, shares[name])      # far from random mistakes
    assert coarse[name] > best[name]["test_top1"], name                      # every right class is a right superclass
order = sorted(runs, key=shares.get, reverse=True)
print("errors kept inside the true superclass, most first: " + ", ".join(f"{name} {shares[name]:.3f}" for name in order))
# The hierarchy question, answered with whichever runs are there. Each share is a proportion of
# about (1 - top-1) * 10,000 errors, so its standard error is about 0.006.
for one, other in [("hierarchical-superclass", "softmax"), ("hierarchical-superclass", "hierarchical-balanced"),
                   ("hierarchical-balanced", "softmax")]:
    if one in runs and other in runs:
        n_errors = [(1 - best[name]["test_top1"]) * 10_000 for name in (one, other)]
        error = np.sqrt(sum(shares[name] * (1 - shares[name]) / count for name, count in zip((one, other), n_errors)))
        difference = shares[one] - shares[other]
        print(f"{one} vs {other}: {difference:+.3f} in the share of errors kept inside the superclass "
              f"({difference / error:+.1f} standard errors)")

# %% [markdown]
# Each finished run also saved its superclass confusion (`confusion_superclass.png`, rows normalised
# to recall). A bright diagonal is the right superclass; off-diagonal spots are the superclass pairs
# the head confuses — usually ones that look alike at 32 × 32 pixels.

# %%
pictures = [name for name in runs if (RESULTS / name / "confusion_superclass.png").is_file()]
columns_shown = min(len(pictures), 3)
rows_shown = -(-len(pictures) // columns_shown)
fig, axes = plt.subplots(rows_shown, columns_shown, figsize=(4.6 * columns_shown, 3.9 * rows_shown), squeeze=False)
for axis in axes.ravel():
    axis.axis("off")
for axis, name in zip(axes.ravel(), pictures):
    axis.imshow(plt.imread(RESULTS / name / "confusion_superclass.png"))
    axis.set_title(name)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Part 2 · Back to the images
#
# The rest needs the CIFAR-100 test images. The notebook looks for `cifar-100-python/test` in
# `$NPSOFTMAX_DATA` (default `~/.cache/npsoftmax`), then in the `--data-dir` each run was trained
# from (its `args.json`), then, in this project's checkout, writes it from the shared copy
# `../shared/data/cifar100/make_cifar100.py` into a temporary folder. Without any of them the cells
# below only say so (which is why they are tagged `varies`: what they print depends on whether the
# images are there; their `assert`s run whenever they are). To get the images yourself:
#
# ```bash
# python -c "from npsoftmax.data import load_cifar100; load_cifar100()"   # downloads into ~/.cache/npsoftmax
# ```
#
# Only the test split is read. The weights files record everything needed to rebuild each model
# (head, tree, architecture) and the per-channel mean/std its inputs were normalised with, so
# `predict_log_probs` gives exactly what the trainer computed. For speed we use a stratified
# subset of 2,000 test images (20 per class), drawn once with a fixed seed.

# %% tags=["varies"]
def find_test_split():
    """(images, labels, where they came from) of the CIFAR-100 test split, or None."""
    run_dirs = [read_json(RESULTS / name / "args.json").get("data_dir") for name in runs]
    candidates = [default_data_dir()] + [REPOSITORY / folder for folder in run_dirs if folder]
    for root in candidates:
        folder = Path(root) / "cifar-100-python"
        if (folder / "test").is_file():
            images, labels, _ = read_batch_file(folder / "test")
            return images, labels, f"{folder}"
    maker = REPOSITORY.parent / "shared" / "data" / "cifar100" / "make_cifar100.py"
    if maker.is_file():
        subprocess.run([sys.executable, str(maker), scratch.name], check=True, capture_output=True)
        images, labels, _ = read_batch_file(Path(scratch.name) / "cifar-100-python" / "test")
        return images, labels, f"written by {maker.name} into a temporary folder"
    return None


start = time.perf_counter()
found = find_test_split()
if found is None:
    print("The CIFAR-100 test images are not on disk, so part 2 is skipped. Get them with\n"
          '    python -c "from npsoftmax.data import load_cifar100; load_cifar100()"\n'
          "(or set NPSOFTMAX_DATA to a folder holding cifar-100-python/) and run the notebook again.")
else:
    test_images, test_labels, source = found
    subset_index = stratified_indices(test_labels, 2_000, np.random.default_rng(0))
    images, labels = test_images[subset_index], test_labels[subset_index]
    log_probs = {}
    for name, (model, info) in weights.items():
        identity = info["identity"]
        assert identity["dataset"] == "cifar100" and identity["subset"] is None, (name, identity)  # the full test split
        log_probs[name] = predict_log_probs(model, images, info["mean"], info["std"],
                                            dtype=np.dtype(info["model"]["dtype"]), batch_size=500)
    print(f"test split: {len(test_labels):,} images ({source}); {len(labels):,} of them, "
          f"{np.bincount(labels, minlength=K).min()} per class, evaluated with {len(runs)} heads "
          f"in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ### 5 · The subset agrees with the full test split
#
# First, a sanity check that the weights files rebuild the models that were reported: every head's
# top-1 on the subset should match its full-test figure up to sampling error. The subset holds
# $n = 2{,}000$ of the $N = 10{,}000$ test images, drawn without replacement, so its top-1 has a
# standard error of $\sqrt{p(1-p)/n \cdot (N - n)/(N - 1)} \approx 0.01$ (a little less, since it is
# stratified by class). Every head's probabilities also sum to 1 over the 100 classes — the tree and
# the adaptive head's clusters included — and a mistake stays in the true superclass far more often
# than the 4/99 of a random wrong class.

# %% tags=["varies"]
if found is not None:
    records, predictions, confidence = {}, {}, {}
    groups = np.asarray(COARSE_OF_FINE)
    n, population = len(labels), len(test_labels)
    for name, scores in log_probs.items():
        records[name], _ = evaluation_record(scores, labels, groups)
        predictions[name] = np.argmax(scores, axis=1)
        confidence[name] = np.exp(scores.max(axis=1).astype(np.float64))
        full = best[name]["test_top1"]
        error = np.sqrt(full * (1 - full) / n * (population - n) / (population - 1))
        print(f"{name:>24}: top-1 {records[name]['top1']:.4f} on the subset vs {full:.4f} on all {population:,} "
              f"({(records[name]['top1'] - full) / error:+.1f} standard errors); errors in superclass "
              f"{records[name]['in_superclass_error_share']:.3f} vs {best[name]['test_in_superclass_error_share']:.3f}")
        assert abs(records[name]["top1"] - full) < 3 * error, name
        total = np.logaddexp.reduce(scores.astype(np.float64), axis=1)          # log of sum_k p(k | x)
        assert np.allclose(total, 0.0, atol=1e-4), (name, np.abs(total).max())
        assert records[name]["in_superclass_error_share"] > 2 * CHANCE_IN_SUPERCLASS, name

# %% [markdown]
# ### 6 · The most confident mistakes
#
# Each row is one head; each picture is one of its mistakes on the subset, the most confident first,
# titled *true → predicted (probability)*. Orange titles stay inside the true superclass, red ones
# leave it. Confident mistakes are where calibration fails worst (they dominate the NLL), and looking
# at them is the quickest way to see what a model has not learned: look-alike classes at 32 × 32
# pixels, an object that is not the labelled one, or a label one could argue with.

# %% tags=["varies"]
def show_image(axis, index):
    axis.imshow(images[index])
    axis.set_xticks([])
    axis.set_yticks([])


def severity_color(true, predicted):
    return "tab:green" if true == predicted else ("tab:orange" if groups[true] == groups[predicted] else "tab:red")


if found is not None:
    shown = 8
    fig, axes = plt.subplots(len(runs), shown, figsize=(1.5 * shown, 2.0 * len(runs)), squeeze=False)
    for row, name in zip(axes, runs):
        wrong = np.flatnonzero(predictions[name] != labels)
        for axis, index in zip(row, wrong[np.argsort(-confidence[name][wrong])][:shown]):
            show_image(axis, index)
            axis.set_title(f"{FINE_NAMES[labels[index]]}\n→ {FINE_NAMES[predictions[name][index]]} "
                           f"({confidence[name][index]:.2f})", fontsize=7,
                           color=severity_color(labels[index], predictions[name][index]))
        row[0].set_ylabel(name, fontsize=8)
    fig.suptitle("most confident mistakes (orange: inside the true superclass, red: outside)")
    fig.tight_layout()
    plt.show()
    for name in runs:
        wrong = predictions[name] != labels
        sure = confidence[name][wrong] > 0.9
        print(f"{name:>24}: {wrong.sum()} mistakes, {sure.sum()} of them with probability > 0.9; "
              f"mean confidence {confidence[name][wrong].mean():.2f} when wrong, "
              f"{confidence[name][~wrong].mean():.2f} when right")
        assert confidence[name][wrong].mean() < confidence[name][~wrong].mean(), name

# %% [markdown]
# ### 7 · Same images, every head: inside or outside the superclass?
#
# To compare mistake severity between heads fairly, take images that **every** head gets wrong and
# put the heads' guesses side by side (orange: the guess stays in the true superclass, red: it
# leaves). The images shown are those where the heads do not all agree on the severity, when there
# are such images. Below them, for each head, the share of its mistakes on the subset that stay
# inside the superclass.

# %% tags=["varies"]
def gallery(indices, title):
    """One column per image; under it each head's guess, coloured by severity."""
    # Heights in inches: the suptitle, the row of images with their titles, one text line per head.
    title_space, image_space, text_space = 0.45, 1.75, 0.2 * len(runs) + 0.15
    height = title_space + image_space + text_space
    fig, axes = plt.subplots(1, len(indices), figsize=(1.45 * len(indices), height), squeeze=False)
    fig.subplots_adjust(top=1 - title_space / height, bottom=text_space / height, left=0.01, right=0.99, wspace=0.25)
    for axis, index in zip(axes[0], indices):
        show_image(axis, index)
        axis.set_title(FINE_NAMES[labels[index]], fontsize=8, fontweight="bold")
        for line, name in enumerate(runs):
            guess = predictions[name][index]
            axis.text(0.5, -0.06 - 0.15 * line, f"{SHORT_NAMES.get(name, name[:10])}: {FINE_NAMES[guess]}", transform=axis.transAxes, ha="center", va="top", fontsize=6.5,
                      color=severity_color(labels[index], guess))
    fig.suptitle(title, fontsize=10)
    plt.show()


if found is not None:
    all_predictions = np.stack([predictions[name] for name in runs])              # (heads, n)
    all_wrong = np.flatnonzero((all_predictions != labels).all(axis=0))
    inside = groups[all_predictions[:, all_wrong]] == groups[labels[all_wrong]]    # (heads, all_wrong)
    mixed = all_wrong[(inside.any(axis=0)) & (~inside.all(axis=0))]
    pool = mixed if len(mixed) >= 10 else all_wrong
    picked = np.sort(np.random.default_rng(1).choice(pool, size=min(10, len(pool)), replace=False))
    gallery(picked, f"{len(all_wrong)} subset images every head gets wrong; heads disagree on the severity of {len(mixed)}")
    for name, share in zip(runs, inside.mean(axis=1)):
        print(f"{name:>24}: on the {len(all_wrong)} images all heads miss, {share:.3f} of its guesses stay inside the "
              f"superclass; on all its {np.sum(predictions[name] != labels)} mistakes, "
              f"{records[name]['in_superclass_error_share']:.3f}")

# %% [markdown]
# ### 8 · Where the heads disagree
#
# With every head trained on the same body and budget, the classes on which they *disagree* show
# what the head itself changes. For each class we count the subset images on which not all heads
# predict the same class, and show the eight classes with the most such images: each head's accuracy
# on the class's 20 images (a standard error of about 0.1, so read them as leads, not verdicts), then
# one disputed image of each, with every head's guess (green: right).

# %% tags=["varies"]
if found is not None and len(runs) < 2:
    print(f"only {len(runs)} finished run: nothing to disagree about yet (missing: {', '.join(missing)})")
elif found is not None:
    disputed = ~(all_predictions == all_predictions[0]).all(axis=0)                # (n,)
    per_class = np.bincount(labels, weights=disputed, minlength=K)
    top = np.argsort(-per_class, kind="stable")[:8]
    fig, axis = plt.subplots(figsize=(12, 3.4))
    width = 0.8 / len(runs)
    for offset, name in enumerate(runs):
        confusion = confusion_matrix(labels, predictions[name], K)
        recall = np.diag(confusion) / confusion.sum(axis=1)
        axis.bar(np.arange(len(top)) + (offset - (len(runs) - 1) / 2) * width, recall[top], width=width, label=name)
    axis.set_xticks(np.arange(len(top)), [f"{FINE_NAMES[k]}\n({int(per_class[k])}/20 disputed)" for k in top], fontsize=8)
    axis.set(ylabel="accuracy on the class's 20 images", ylim=(0, 1), title="the classes on which the heads disagree most")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7, ncol=len(runs))
    plt.show()
    distinct = np.array([len(set(all_predictions[:, index])) for index in range(len(labels))])
    examples = [np.flatnonzero((labels == k) & disputed)[np.argmax(distinct[(labels == k) & disputed])] for k in top]
    gallery(examples, "one disputed image of each class (the one with the most different guesses)")
    print(f"the heads disagree on {disputed.mean():.3f} of the subset; per class from {per_class.min():.0f} "
          f"to {per_class.max():.0f} of 20 images")
    assert disputed.any()

# %% [markdown]
# ## What to take away
#
# * Top-1 is one column of many. Two heads with similar accuracy can differ in how confident they are
#   when they are wrong (the reliability diagrams, the NLL) and in **what kind** of mistakes they make
#   (the superclass views) — which is what a user of the probabilities or of the predictions feels.
# * Calibration is a separate axis from accuracy: check the reliability diagram (or the NLL), not just
#   top-1, before trusting a model's probabilities.
# * Mistake severity can be measured with a class hierarchy (superclass accuracy of the fine
#   prediction, the share of errors inside the superclass). Compare the `hierarchical-superclass` run
#   with its `hierarchical-balanced` control to separate what the *semantic* tree buys from what
#   being a tree at all does.
# * Everything above was computed from committed files and reproduced from the weights: re-running
#   this notebook after `examples/compare.py ... --resume` finishes more runs adds them to every view.
#
# **Back to the start:** [01_softmax_cross_entropy.ipynb](01_softmax_cross_entropy.ipynb).
