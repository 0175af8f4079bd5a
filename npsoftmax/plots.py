"""Plots of a run, saved as PNG files: curves, confusion matrix, reliability diagram, head comparison.

matplotlib is imported lazily (importing npsoftmax stays fast); scripts get the
non-interactive Agg backend, so these work on a machine without a display, while
a notebook keeps its inline backend.
"""

import os


def _pyplot():
    import sys

    import matplotlib

    # Choose the file-only backend when nobody has picked one yet (scripts, CI); inside
    # a notebook pyplot is already loaded with the inline backend, which must stay.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path, title=None):
    """Loss and top-1 accuracy per epoch (train and test) from a history list; returns ``path``.

    ``history``: list of per-epoch dicts with ``epoch``, ``train_loss``, ``test_loss``,
    ``train_top1``, ``test_top1`` (what :class:`npsoftmax.train.Trainer` records).
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    plt = _pyplot()
    epochs = [record["epoch"] for record in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        loss_axis.plot(epochs, [record[key] for record in history], marker="o", label=label)
    loss_axis.set(xlabel="epoch", ylabel="mean negative log-likelihood", title="loss")
    for key, label in (("train_top1", "train"), ("val_top1", "validation top-1"), ("test_top1", "test top-1"),
                       ("test_top5", "test top-5")):
        if key in history[0]:
            accuracy_axis.plot(epochs, [record[key] for record in history], marker="o", label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, plt)


def plot_confusion(confusion, path, class_names=None, title="confusion matrix (rows: true, columns: predicted)"):
    """Heat map of a (K, K) confusion matrix, rows normalised to recall; returns ``path``.

    Class names are written on the axes when K <= 30 (CIFAR-100's 100 classes are
    too many to label; use the 20 x 20 superclass view for names).
    """
    import numpy as np

    plt = _pyplot()
    confusion = np.asarray(confusion, dtype=np.float64)
    row_totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, row_totals, out=np.zeros_like(confusion), where=row_totals > 0)
    size = min(12, 4 + 0.12 * confusion.shape[0])
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, label="fraction of the true class")
    axis.set(xlabel="predicted class", ylabel="true class", title=title)
    if class_names is not None and len(class_names) <= 30:
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        axis.set_yticks(ticks, class_names, fontsize=7)
    figure.tight_layout()
    return _save(figure, path, plt)


def plot_head_comparison(results, path, metrics=("test_top1", "test_macro_f1", "epoch_seconds")):
    """Bar charts comparing heads; ``results`` maps head name -> final history record."""
    if not results:
        raise ValueError("results is empty: nothing to compare")
    plt = _pyplot()
    names = list(results)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    import numpy as np

    for axis, metric in zip(np.atleast_1d(axes), metrics):
        values = [results[name].get(metric, float("nan")) for name in names]
        axis.bar(names, values, color=[f"C{index % 10}" for index in range(len(names))])
        axis.set_title(metric.replace("_", " "))
        axis.tick_params(axis="x", rotation=20)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path, plt)


def plot_reliability(bins_by_name, path, title="reliability (test split, top-1 confidence)"):
    """Reliability diagrams, one panel per model; returns ``path``.

    ``bins_by_name`` maps a name to :func:`npsoftmax.metrics.reliability_bins`'s dict
    (``count``, ``confidence``, ``accuracy``, ``edges``). Each bar is a bin's accuracy; the
    diagonal is perfect calibration, so bars below it mean over-confidence. The panel
    title gives the expected calibration error (the count-weighted mean gap).
    """
    import numpy as np

    if not bins_by_name:
        raise ValueError("bins_by_name is empty: nothing to plot")
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(bins_by_name), figsize=(3.2 * len(bins_by_name), 3.4), squeeze=False)
    for axis, (name, bins) in zip(axes[0], bins_by_name.items()):
        edges = np.asarray(bins["edges"])
        count = np.asarray(bins["count"], dtype=float)
        accuracy, confidence = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
        ece = float(np.sum(count * np.abs(accuracy - confidence)) / count.sum())
        axis.bar(edges[:-1], accuracy, width=np.diff(edges), align="edge", edgecolor="black", alpha=0.7,
                 label="accuracy")
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
        axis.set(xlabel="confidence", xlim=(0, 1), ylim=(0, 1), title=f"{name}\nECE {ece:.3f}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path, plt)


def _save(figure, path, plt):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
