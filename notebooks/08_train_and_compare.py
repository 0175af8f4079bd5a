# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Train the CNN with each head, and compare
#
# Everything from the previous notebooks, end to end: the package's default CNN body
# (conv → batch norm → ReLU → max-pool blocks, then a fully connected layer; notebooks 02–04)
# produces features $h$, and one of the four heads (notebooks 01, 05–07) turns them into a
# loss. We train the same body with each head under the same budget, using the package's
# `Trainer` (`npsoftmax.train`), and compare learning curves, confusion matrices and a
# summary table.
#
# The data are scikit-learn's bundled handwritten digits — 1,797 grey $8\times8$ images, offline
# — so the whole notebook runs in seconds. Set `DATASET = "cifar100"` below to use a 5,000-image
# subset of CIFAR-100 instead, if it is already downloaded (`python examples/train_np.py`
# downloads it once); it falls back to the digits otherwise. The full-scale comparison is
# `python examples/compare.py --dataset cifar100`.

# %%
import tempfile

import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display
from threadpoolctl import threadpool_limits

from npsoftmax.data import DatasetNotFoundError, load_cifar100, load_digits_images, normalize, subset
from npsoftmax.heads import tree_from_groups
from npsoftmax.models import build_model
from npsoftmax.optim import SGD, CosineSchedule, ExponentialTemperatureSchedule
from npsoftmax.plots import plot_confusion, plot_head_comparison, plot_history
from npsoftmax.train import Trainer

# One BLAS/OpenMP thread: 8x8 images make tiny arrays, so more threads only add synchronisation,
# which stalls when the machine is busy. For CIFAR-sized batches you may drop this line.
thread_limits = threadpool_limits(limits=1)
DATASET = "digits"     # or "cifar100" (used only if already downloaded)

# %%
if DATASET == "cifar100":
    try:
        dataset = subset(load_cifar100(download=False), 5_000, n_test=1_000, seed=0)
    except DatasetNotFoundError as error:
        print(f"CIFAR-100 is not available ({str(error).splitlines()[0]}); using the digits instead.")
        DATASET = "digits"
if DATASET == "digits":
    dataset = load_digits_images(seed=0)

K = dataset.n_classes
height, width, channels = dataset.train.images.shape[1:]
image_shape = (channels, height, width)                          # the network sees NCHW
print(f"{DATASET}: {len(dataset.train)} training and {len(dataset.test)} test images of shape {image_shape}, {K} classes")

fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
for axis, index in zip(axes.ravel(), range(16)):
    image = dataset.train.images[index]
    axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray_r" if image.shape[-1] == 1 else None)
    axis.set_title(dataset.fine_names[dataset.train.labels[index]], fontsize=8)
    axis.axis("off")
plt.show()

# %% [markdown]
# ## The four runs
#
# The same body, optimiser and schedule for every head; only the head (and its options)
# changes. `build_model` draws the body's initial weights from its own random stream, so all
# four runs start from the **same body**.
#
# | head | options here |
# |---|---|
# | softmax | — |
# | gumbel | $\tau$ annealed from 1.0 towards 0.5, $\tau_t = \max(0.5, e^{-0.01 t})$ |
# | hierarchical | grouped tree: even / odd digits (CIFAR-100: the 20 superclasses) |
# | adaptive | cutoffs $[K/5, K/2]$, `div_value` 4 |
#
# SGD with momentum 0.9, weight decay $5\cdot10^{-4}$, a cosine learning-rate schedule from
# 0.05, batches of 64. After every epoch the `Trainer` evaluates on the test split in eval mode
# (no Gumbel noise, exact `log_prob`).

# %% tags=["varies"]
settings = {"digits": dict(widths=(16, 32, 64), feature_dim=128, epochs=10),
            "cifar100": dict(widths=(16, 32, 64), feature_dim=128, epochs=3)}[DATASET]
batch_size, learning_rate = 64, 0.05
head_options = {
    "softmax": {},
    "gumbel": {"tau": 1.0},
    "hierarchical": {"tree": tree_from_groups(dataset.coarse_of_fine())},
    "adaptive": {"cutoffs": [K // 5, K // 2], "div_value": 4.0},
}
run_root = tempfile.TemporaryDirectory()      # history.json and checkpoints; deleted at the end
steps_per_epoch = -(-len(dataset.train) // batch_size)
trainers = {}
for name, options in head_options.items():
    model = build_model(name, K, image_shape, rng=np.random.default_rng(0), widths=settings["widths"],
                        feature_dim=settings["feature_dim"], head_options=options)
    optimizer = SGD(model.params, lr=learning_rate, momentum=0.9, weight_decay=5e-4)
    trainer = Trainer(
        model, optimizer, dataset, epochs=settings["epochs"], batch_size=batch_size,
        run_dir=f"{run_root.name}/{name}", seed=0, augment=False,
        lr_schedule=CosineSchedule(learning_rate, settings["epochs"] * steps_per_epoch),
        tau_schedule=ExponentialTemperatureSchedule(1.0, 0.5, 0.01) if name == "gumbel" else None,
        coarse_of_fine=dataset.coarse_of_fine() if DATASET == "cifar100" else None,
        progress=False,
    )
    history = trainer.fit()
    trainers[name] = trainer
    print(f"{name:>12}: test top-1 {history[-1]['test_top1']:.3f} after {len(history)} epochs "
          f"({sum(record['epoch_seconds'] for record in history):.1f} s of training)")

# %% [markdown]
# ## Learning curves

# %%
fig, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 3.8))
for name, trainer in trainers.items():
    epochs = [record["epoch"] for record in trainer.history]
    loss_axis.plot(epochs, [record["train_loss"] for record in trainer.history], "o-", label=f"{name} (train)")
    accuracy_axis.plot(epochs, [record["test_top1"] for record in trainer.history], "o-", label=name)
loss_axis.set(xlabel="epoch", ylabel="mean training loss", yscale="log", title="training objective")
accuracy_axis.set(xlabel="epoch", ylabel="test top-1 accuracy", title="exact, noise-free evaluation")
for axis in (loss_axis, accuracy_axis):
    axis.grid(alpha=0.3); axis.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Note that the Gumbel head's training objective is the loss of a *noisy, tempered* sample,
# so it is not directly comparable with the others' (it stays higher); its test accuracy is
# measured without noise, like every head's.
#
# ## Comparison table
#
# From each run's last epoch: accuracy, macro-averaged F1, the test negative log-likelihood
# (the exact `log_prob` of the true class), seconds per epoch and the milliseconds per batch
# spent inside the head. With 10 classes the head is a sliver of each step (fractions of a
# millisecond; the Gumbel head also draws its noise), and the hierarchical and adaptive heads'
# bookkeeping makes them no faster than the plain softmax: they pay off with thousands of
# classes (notebooks 06 and 07).

# %% tags=["varies"]
columns = [("test_top1", "top-1", ".3f"), ("test_top5", "top-5", ".3f"), ("test_macro_f1", "macro F1", ".3f"),
           ("test_loss", "test NLL", ".3f"), ("epoch_seconds", "s / epoch", ".2f"),
           ("head_ms_per_batch", "head ms / batch", ".2f")]
lines = ["| head | " + " | ".join(title for _, title, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
for name, trainer in trainers.items():
    last = trainer.history[-1]
    lines.append(f"| {name} | " + " | ".join(format(last[key], spec) for key, _, spec in columns) + " |")
display(Markdown("\n".join(lines)))

# %%
# The claims of this notebook, checked.
for name, trainer in trainers.items():
    history = trainer.history
    assert len(history) == settings["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], name            # it learned
    assert history[-1]["test_top1"] > (0.85 if DATASET == "digits" else 2.0 / K), name
    confusion = trainer.last_confusion
    assert confusion.sum() == len(dataset.test)
    np.testing.assert_allclose(np.trace(confusion) / confusion.sum(), history[-1]["test_top1"])
    model = trainer.model.eval()
    x_test = normalize(dataset.test.images, trainer.mean, trainer.std)   # the trainer's input pipeline
    # predict is the exact argmax of log_prob, for every head (no approximate decoding by default)
    np.testing.assert_array_equal(model.predict(x_test), np.argmax(model.log_prob(x_test), axis=1))
taus = [record["tau"] for record in trainers["gumbel"].history]
assert taus[0] == 1.0 and taus[-1] < taus[0] and min(taus) >= 0.5                 # annealed, with its floor
print("all checks passed")

# %% [markdown]
# ## The package's own plots
#
# `npsoftmax.plots` writes the figures that `examples/train_np.py` and `examples/compare.py`
# save next to a run: per-run curves, confusion matrices (rows normalised to recall) and a
# bar chart comparing heads. We write them into the temporary run folder and show them.

# %%
final_records = {name: trainer.history[-1] for name, trainer in trainers.items()}
figures = [
    plot_head_comparison(final_records, f"{run_root.name}/heads.png",
                         metrics=("test_top1", "test_macro_f1", "head_ms_per_batch")),
    plot_history(trainers["gumbel"].history, f"{run_root.name}/gumbel_curves.png", title="gumbel head"),
    plot_confusion(trainers["hierarchical"].last_confusion, f"{run_root.name}/confusion.png",
                   class_names=dataset.fine_names if K <= 30 else None,
                   title="hierarchical head: test confusion (rows: true class)"),
]
for path in figures:
    display(Image(filename=path, width=640))
run_root.cleanup()

# %% [markdown]
# ### Where to go from here
# * `python examples/train_np.py --softmax gumbel --dataset digits --epochs 5` trains one head
#   from the command line; `--dataset cifar100` is the real task (`--tree superclass` for the
#   hierarchical head's 20 × 5 tree).
# * `python examples/compare.py --dataset cifar100 --epochs 30` repeats this notebook at full
#   scale and writes a report.
# * `python -m pytest` runs the gradient-check suite these notebooks are built on.
#
# Back to the start: [01_softmax_cross_entropy.ipynb](01_softmax_cross_entropy.ipynb).
