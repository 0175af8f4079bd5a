"""Numerically stable softmax, log-softmax, logsumexp and softmax cross-entropy.

The one identity everything here relies on: softmax is unchanged by adding the
same constant to every logit, so subtracting the row maximum ``m`` first gives

    logsumexp(z) = m + log(sum_j exp(z_j - m))        (every exp(...) <= 1: no overflow)
    log_softmax(z)_k = z_k - logsumexp(z)             (never log(0): no -inf from underflow)

and at least one term of the sum is exp(0) = 1, so the log never sees 0.
All functions keep the input's floating dtype (float32 stays float32).
"""

import numpy as np

from .base import check_labels


def _check_logits(logits, name="logits"):
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(logits).__name__}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{name} must be a float array, got dtype {logits.dtype}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class on its last axis, got shape {logits.shape}")
    return logits


def logsumexp(logits, axis=-1, keepdims=False):
    """``log(sum(exp(logits), axis))`` computed with the max shift.

    Args:
        logits: float array (..., K).
        axis: the axis to reduce (default: the last, the class axis).

    Returns:
        array of the reduced shape (keepdims keeps a length-1 axis), same dtype.
    """
    logits = _check_logits(logits)
    shift = np.max(logits, axis=axis, keepdims=True)
    # A row of all -inf would give (-inf) - (-inf) = NaN; shifting it by 0 gives -inf instead.
    shift = np.where(np.isfinite(shift), shift, 0).astype(logits.dtype, copy=False)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the right answer for all -inf
        out = np.log(np.sum(np.exp(logits - shift), axis=axis, keepdims=True)) + shift
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(logits, axis=-1):
    """``logits - logsumexp(logits)`` along ``axis``: (..., K) -> (..., K), same dtype.

    Computed as ``(z - m) - log(sum(exp(z - m)))``: subtracting the max first keeps
    the result exact to the dtype's relative precision even for logits like 1e3 in
    float32 (``z - logsumexp(z)`` would lose the digits below 1e3's spacing).
    """
    logits = _check_logits(logits)
    shift = np.max(logits, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0).astype(logits.dtype, copy=False)
    shifted = logits - shift
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis=-1):
    """``exp(z - max) / sum(exp(z - max))`` along ``axis``: (..., K) -> (..., K), same dtype."""
    logits = _check_logits(logits)
    shifted = np.exp(logits - np.max(logits, axis=axis, keepdims=True))
    shifted /= np.sum(shifted, axis=axis, keepdims=True)
    return shifted


def softmax_cross_entropy(logits, y):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    ``loss = -(1/N) sum_i log softmax(z_i)[y_i]``. Differentiating
    ``-z_y + logsumexp(z)`` gives ``softmax(z) - onehot(y)``: the softmax Jacobian
    contracted with the log's 1/p collapses to this simple form, which is why the
    gradient is computed from the probabilities once, not by chaining two Jacobians.

    Args:
        logits: (N, K) float array, z.
        y: (N,) int labels in [0, K).

    Returns:
        loss: python float.
        dlogits: (N, K) array, same dtype as logits, ``(softmax(z) - onehot(y)) / N``.
    """
    logits = _check_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    n_samples, n_classes = logits.shape
    y = check_labels(y, n_samples, n_classes)
    rows = np.arange(n_samples)
    log_probs = log_softmax(logits)
    loss = -float(np.mean(log_probs[rows, y], dtype=np.float64))
    dlogits = np.exp(log_probs)
    dlogits[rows, y] -= 1
    dlogits /= n_samples
    return loss, dlogits
