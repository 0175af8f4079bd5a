"""Classification metrics: top-k accuracy, confusion matrices and per-class P/R/F1.

Everything is computed from integer labels and, for top-k, from a score matrix
(log-probabilities, probabilities or raw logits: only the order inside a row
matters). Conventions:

* ``labels`` / ``predictions`` are (N,) integer arrays with values in [0, K).
* ``scores`` is (N, K); row i scores the K classes for sample i.
* ``confusion[t, p]`` counts samples whose true class is t and predicted class is p
  (rows = truth, columns = prediction, the scikit-learn convention).

Per-class precision / recall / F1 use the scikit-learn ``zero_division=0`` rule: a
ratio whose denominator is zero (a class never predicted, or never present) is 0.
"""

import numpy as np


def _as_label_array(values, name, n_classes):
    """Return ``values`` as a (N,) int64 array with every entry in [0, n_classes)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (N,), got shape {values.shape}")
    if values.size == 0:
        return values.astype(np.int64)                 # np.asarray([]) is float64; nothing to check
    if values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {values.dtype}")
    if (values.min() < 0 or values.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values in "
            f"[{values.min()}, {values.max()}]")
    return values.astype(np.int64, copy=False)


def _check_count(value, name):
    """Return ``value`` as a positive python int (a class or group count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_confusion(confusion):
    """Return ``confusion`` as a square (K, K) array of finite, non-negative counts."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] == 0:
        raise ValueError(f"confusion must be a square (K, K) array with K >= 1, got shape {confusion.shape}")
    if confusion.dtype == bool or not np.issubdtype(confusion.dtype, np.number):
        raise TypeError(f"confusion must be numeric, got dtype {confusion.dtype}")
    if not np.all(np.isfinite(confusion)) or np.any(confusion < 0):
        raise ValueError("confusion must hold finite, non-negative counts")
    return confusion


def _safe_divide(numerator, denominator):
    """``numerator / denominator`` elementwise, with 0 wherever the denominator is 0 (float64)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def top_k_accuracy(scores, labels, k=1):
    """Fraction of samples whose true label is among the k best-scored classes.

    Args:
        scores: (N, K) float array; log-probabilities, probabilities or logits
            (only the order within a row matters). ``-inf`` is allowed, NaN is not.
        labels: (N,) int array of true classes in [0, K).
        k: 1 <= k <= K.

    Returns:
        float in [0, 1].

    Ties: classes are ranked by score, highest first, and equal scores are ordered
    by class index, lowest first -- exactly the order in which ``np.argmax`` picks,
    so ``top_k_accuracy(scores, labels, 1) == mean(argmax(scores, 1) == labels)``
    always holds, also for tied rows. With that order the rank of the true class y
    is ``#{j : s_j > s_y} + #{j < y : s_j == s_y}`` and the sample is a hit when the
    rank is below k; this costs O(N K) and needs no sort.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, K), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise TypeError(f"scores must be a real-valued array, got dtype {scores.dtype}")
    n_samples, n_classes = scores.shape
    if n_samples == 0:
        raise ValueError("top_k_accuracy needs at least one sample, got scores of shape (0, K)")
    labels = _as_label_array(labels, "labels", n_classes)
    if labels.shape[0] != n_samples:
        raise ValueError(
            f"labels must have shape ({n_samples},) to match scores {scores.shape}, got {labels.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes:
        raise ValueError(f"k must be an int in [1, K={n_classes}], got {k!r}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN; top-k accuracy is undefined for NaN scores")

    true_score = scores[np.arange(n_samples), labels][:, None]          # (N, 1)
    lower_index = np.arange(n_classes)[None, :] < labels[:, None]         # (N, K)
    rank = np.count_nonzero(
        (scores > true_score) | ((scores == true_score) & lower_index), axis=1)
    return float(np.mean(rank < k))


def confusion_matrix(labels, predictions, n_classes):
    """Count (true, predicted) pairs.

    Args:
        labels: (N,) int array of true classes in [0, K).
        predictions: (N,) int array of predicted classes in [0, K).
        n_classes: K.

    Returns:
        (K, K) int64 array; ``[t, p]`` is the number of samples of class t predicted as p.
        Rows sum to the class supports, columns to the prediction counts.
    """
    n_classes = _check_count(n_classes, "n_classes")
    labels = _as_label_array(labels, "labels", n_classes)
    predictions = _as_label_array(predictions, "predictions", n_classes)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions must have the same shape (N,), got {labels.shape} and "
            f"{predictions.shape}")
    # Each (t, p) pair is one cell of a flattened K*K grid: index t*K + p.
    counts = np.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64, copy=False)


def coarse_confusion(confusion, groups, n_groups=None):
    """Merge a fine (K, K) confusion matrix into a (G, G) one over class groups.

    Args:
        confusion: (K, K) counts, rows = true class, columns = predicted class.
        groups: (K,) int array; ``groups[k]`` is the group of class k (for CIFAR-100,
            ``npsoftmax.data.cifar100_classes.COARSE_OF_FINE``).
        n_groups: G; defaults to ``groups.max() + 1``.

    Returns:
        (G, G) array of the same dtype; ``[a, b]`` counts samples whose true class is
        in group a and whose predicted class is in group b. With the one-hot
        membership matrix M (K, G), ``M[k, groups[k]] = 1``, this is ``M.T @ C @ M``.
        The trace is the "right superclass" count, which is at least the trace of C.
    """
    confusion = _as_confusion(confusion)
    n_classes = confusion.shape[0]
    groups = np.asarray(groups)
    if groups.shape != (n_classes,):
        raise ValueError(
            f"groups must have shape ({n_classes},) to match confusion {confusion.shape}, "
            f"got {groups.shape}")
    if groups.dtype == bool or not np.issubdtype(groups.dtype, np.integer):
        raise TypeError(f"groups must hold integer group indices, got dtype {groups.dtype}")
    if n_groups is None:
        # max(.., 1) so that all-negative groups reach the range check below, which names them.
        n_groups = max(int(groups.max()) + 1, 1)
    n_groups = _check_count(n_groups, "n_groups")
    groups = _as_label_array(groups, "groups", n_groups)
    membership = np.zeros((n_classes, n_groups), dtype=confusion.dtype)
    membership[np.arange(n_classes), groups] = 1
    return membership.T @ confusion @ membership


def precision_recall_f1(confusion):
    """Per-class precision, recall and F1 from a (K, K) confusion matrix.

    With tp_k = C[k, k], predicted_k = sum_t C[t, k] (column) and support_k = sum_p C[k, p] (row):

        precision_k = tp_k / predicted_k
        recall_k    = tp_k / support_k
        f1_k        = 2 precision_k recall_k / (precision_k + recall_k) = 2 tp_k / (predicted_k + support_k)

    Any ratio with a zero denominator is 0 (scikit-learn's ``zero_division=0``).

    Returns:
        (precision, recall, f1), each a (K,) float64 array.
    """
    confusion = _as_confusion(confusion)
    true_positive = np.diagonal(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    # The second form of F1 avoids dividing by precision + recall, and is 0 exactly when tp is 0.
    f1 = _safe_divide(2 * true_positive, predicted + support)
    return precision, recall, f1


def macro_scores(confusion):
    """Unweighted means over all K classes of per-class precision, recall and F1.

    Classes that are neither present nor predicted count as 0 (as scikit-learn with
    ``labels=range(K), average='macro', zero_division=0``). Note macro F1 is the mean of
    the per-class F1 values, not the F1 of macro precision and macro recall.

    Returns:
        dict with float keys ``precision``, ``recall``, ``f1``.
    """
    precision, recall, f1 = precision_recall_f1(confusion)
    return dict(precision=float(precision.mean()), recall=float(recall.mean()), f1=float(f1.mean()))


def classification_report(labels, predictions, n_classes, scores=None, top_k=5):
    """Bundle the headline numbers of one evaluation pass into a flat dict of floats.

    Args:
        labels: (N,) int true classes in [0, K), N >= 1.
        predictions: (N,) int predicted classes (e.g. ``head.predict(h)``).
        n_classes: K.
        scores: optional (N, K) scores (e.g. ``head.log_prob(h)``) for top-k accuracy.
        top_k: the k of the extra accuracy, used only when ``scores`` is given.

    Returns:
        dict with ``n_samples``, ``top1`` (accuracy of ``predictions``), ``macro_precision``,
        ``macro_recall``, ``macro_f1`` and, when ``scores`` is given, ``f"top{top_k}"``.
    """
    confusion = confusion_matrix(labels, predictions, n_classes)
    n_samples = int(confusion.sum())
    if n_samples == 0:
        raise ValueError("classification_report needs at least one sample, got N = 0")
    macro = macro_scores(confusion)
    report = dict(
        n_samples=n_samples,
        top1=float(np.trace(confusion) / n_samples),
        macro_precision=macro["precision"],
        macro_recall=macro["recall"],
        macro_f1=macro["f1"],
    )
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != (n_samples, confusion.shape[0]):
            raise ValueError(
                f"scores must have shape ({n_samples}, {confusion.shape[0]}), got {scores.shape}")
        report[f"top{top_k}"] = top_k_accuracy(scores, labels, top_k)
    return report


def reliability_bins(log_probs, labels, n_bins=15):
    """Top-1 confidence vs accuracy in ``n_bins`` equal-width bins (the data of a reliability diagram).

    The confidence of a prediction is its top-1 probability ``max_k p(k | x)``; bin b holds
    the confidences in ``(b/B, (b+1)/B]`` (a confidence of exactly 0 goes to bin 0).

    Args:
        log_probs: (N, K) normalised log-probabilities (e.g. ``head.log_prob(h)``).
        labels: (N,) int true classes in [0, K).
        n_bins: B.

    Returns:
        dict of (B,) arrays: ``count`` (int64), ``confidence`` and ``accuracy`` (float64 means
        per bin, 0 for an empty bin), and ``edges`` (B + 1,).
    """
    log_probs = np.asarray(log_probs)
    if log_probs.ndim != 2 or log_probs.shape[0] == 0:
        raise ValueError(f"log_probs must have shape (N, K) with N >= 1, got {log_probs.shape}")
    labels = _as_label_array(labels, "labels", log_probs.shape[1])
    if labels.shape[0] != log_probs.shape[0]:
        raise ValueError(f"labels must have shape ({log_probs.shape[0]},) to match log_probs, got {labels.shape}")
    n_bins = _check_count(n_bins, "n_bins")
    predictions = np.argmax(log_probs, axis=1)
    confidence = np.exp(log_probs[np.arange(labels.shape[0]), predictions].astype(np.float64))
    correct = (predictions == labels).astype(np.float64)
    # ceil(c * B) - 1 is the b with b/B < c <= (b+1)/B.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    return {"count": count,
            "confidence": _safe_divide(np.bincount(bins, weights=confidence, minlength=n_bins), count),
            "accuracy": _safe_divide(np.bincount(bins, weights=correct, minlength=n_bins), count),
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(log_probs, labels, n_bins=15):
    """Expected calibration error of the top-1 prediction (Guo et al. 2017), 15 bins by default.

    In each confidence bin of :func:`reliability_bins` the mean confidence is compared
    with the accuracy of the predictions that fell there, and the gaps are averaged,
    weighted by the share of samples::

        ECE = sum_b (n_b / N) * | accuracy_b - confidence_b |

    0 means perfectly calibrated; a network that says 90% and is right 60% of the time
    adds 0.3 for the samples in that bin. Returns a float in [0, 1].
    """
    bins = reliability_bins(log_probs, labels, n_bins)
    count = bins["count"]
    return float(np.sum(count * np.abs(bins["accuracy"] - bins["confidence"])) / count.sum())


def superclass_scores(labels, predictions, groups):
    """How bad the fine-class mistakes are, measured with a class grouping (CIFAR-100 superclasses).

    Args:
        labels, predictions: (N,) int fine classes in [0, K).
        groups: (K,) int; ``groups[k]`` is the superclass of fine class k.

    Returns:
        dict with ``coarse_top1`` (share of samples whose *fine* prediction lies in the
        true superclass, i.e. the superclass accuracy of the fine predictions) and
        ``in_superclass_error_share`` (among the fine-class errors, the share whose
        prediction stays inside the true superclass; NaN when there is no error).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must have shape (K,), got {groups.shape}")
    labels = _as_label_array(labels, "labels", groups.shape[0])
    predictions = _as_label_array(predictions, "predictions", groups.shape[0])
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"labels and predictions must have the same shape (N,) with N >= 1, got "
                         f"{labels.shape} and {predictions.shape}")
    same_group = groups[labels] == groups[predictions]
    wrong = labels != predictions
    n_wrong = int(wrong.sum())
    return {
        "coarse_top1": float(np.mean(same_group)),
        "in_superclass_error_share": float(np.sum(same_group & wrong) / n_wrong) if n_wrong else float("nan"),
    }


def evaluation_record(log_probs, labels, groups=None, n_bins=15):
    """Every evaluation number of one pass over a split, from its log-probabilities.

    The trainer (every epoch, on validation and test) and ``examples/evaluate.py``
    (from a weights file) both call this, so their numbers agree exactly.

    Args:
        log_probs: (N, K) exact log-probabilities of the model.
        labels: (N,) int true classes.
        groups: optional (K,) superclass of each class; adds :func:`superclass_scores`.
        n_bins: bins of the calibration error.

    Returns:
        (record, confusion): record is a dict of floats ``loss`` (mean NLL), ``top1``,
        ``top5`` (top-min(5, K)), ``macro_precision``, ``macro_recall``, ``macro_f1``,
        ``ece`` (and ``coarse_top1``, ``in_superclass_error_share`` with ``groups``);
        confusion is the (K, K) count matrix.
    """
    log_probs = np.asarray(log_probs)
    n_classes = log_probs.shape[1]
    labels = _as_label_array(labels, "labels", n_classes)
    # predict() is defined as the exact argmax of log_prob (tested for every head).
    predictions = np.argmax(log_probs, axis=1)
    top_k = min(5, n_classes)
    report = classification_report(labels, predictions, n_classes, scores=log_probs, top_k=top_k)
    report.pop("n_samples")
    record = {"loss": float(-np.mean(log_probs[np.arange(labels.shape[0]), labels], dtype=np.float64)),
              **report}
    record["top5"] = record.pop(f"top{top_k}")
    record["ece"] = expected_calibration_error(log_probs, labels, n_bins)
    if groups is not None:
        record.update(superclass_scores(labels, predictions, groups))
    return record, confusion_matrix(labels, predictions, n_classes)
