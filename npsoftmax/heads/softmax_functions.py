"""Numerically stable softmax, log-softmax, logsumexp and softmax cross-entropy.

The one identity everything here relies on: softmax is unchanged by adding the
same constant to every logit, so subtracting the row maximum ``m`` first gives

    logsumexp(z) = m + log(sum_j exp(z_j - m))        (every exp(...) <= 1: no overflow)
    log_softmax(z)_k = z_k - logsumexp(z)             (never log(0): no -inf from underflow)

and at least one term of the sum is exp(0) = 1, so the log never sees 0.
All functions keep the input's floating dtype (float32 stays float32).
"""

import numpy as np

from .. import parallel
from .base import check_class_weights, check_label_smoothing, check_labels

#: log_softmax_target splits its rows across the thread pool (npsoftmax.parallel) from this
#: many logits on (~4 ms of work on one core); below it the whole matrix is one task on the
#: calling thread, as waking a pool thread costs 0.1-1 ms.
PARALLEL_MIN_LOGITS = 1 << 21


def _check_logits(logits, name="logits"):
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(logits).__name__}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{name} must be a float array, got dtype {logits.dtype}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one class on its last axis, got shape {logits.shape}")
    return logits


def _max_shift(logits, axis):
    """The max along ``axis`` (kept as a length-1 axis), 0 where that max is not finite.

    A row of all -inf would give (-inf) - (-inf) = NaN; shifting it by 0 gives -inf instead.
    """
    shift = np.max(logits, axis=axis, keepdims=True)
    return np.where(np.isfinite(shift), shift, 0).astype(logits.dtype, copy=False)


def logsumexp(logits, axis=-1, keepdims=False):
    """``log(sum(exp(logits), axis))`` computed with the max shift.

    Args:
        logits: float array (..., K).
        axis: the axis to reduce (default: the last, the class axis).

    Returns:
        array of the reduced shape (keepdims keeps a length-1 axis), same dtype.
    """
    logits = _check_logits(logits)
    shift = _max_shift(logits, axis)
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
    shifted = logits - _max_shift(logits, axis)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis=-1):
    """``exp(z - max) / sum(exp(z - max))`` along ``axis``: (..., K) -> (..., K), same dtype."""
    logits = _check_logits(logits)
    shifted = np.exp(logits - np.max(logits, axis=axis, keepdims=True))
    shifted /= np.sum(shifted, axis=axis, keepdims=True)
    return shifted


def log_softmax_target(logits, target, row_scale):
    """Each row's log-probability of its target, and the gradient of the scaled loss, in one go.

    For every row i of ``z = logits`` with target ``t_i`` and weight ``a_i = row_scale[i]``::

        picked_i = log softmax(z_i)[t_i] = (z_i[t_i] - m_i) - log(sum_k exp(z_ik - m_i))
        grad_i   = a_i * (softmax(z_i) - onehot(t_i))     = d(-sum_i a_i picked_i) / dz_i

    (``m_i`` the row max, as in ``log_softmax``). This is the training path of every
    softmax-like loss here: ``softmax_cross_entropy`` (``a_i = 1/N``) and the adaptive
    head's head and tail softmaxes. It never forms the (N, K) log-probabilities: the
    gradient buffer holds ``z - m``, then ``exp(z - m)``, then the gradient, in place
    (5 passes over the matrix instead of about 12 for log_softmax, exp, subtract, divide),
    and rows are independent, so a large matrix is split into one block of rows per
    thread of the pool (``npsoftmax.parallel.block_size``).

    Args:
        logits: (N, K) float array.
        target: (N,) int array of column indices in [0, K) (not checked here: the caller's labels are).
        row_scale: (N,) weights a_i (1/N for a plain mean).

    Returns:
        picked: (N,) array, dtype of logits.
        grad: (N, K) C-contiguous array, dtype of logits.
    """
    logits = _check_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    n_rows, n_classes = logits.shape
    row_scale = np.asarray(row_scale, dtype=logits.dtype)
    picked = np.empty(n_rows, dtype=logits.dtype)
    grad = np.empty((n_rows, n_classes), dtype=logits.dtype)

    def rows(start, stop):
        z, g, t = logits[start:stop], grad[start:stop], target[start:stop]
        inside = np.arange(stop - start)
        np.subtract(z, _max_shift(z, 1), out=g)   # z - m: every entry <= 0
        shifted_target = g[inside, t]         # z_t - m
        np.exp(g, out=g)                      # exp(z - m): the largest is 1, so the sum is >= 1
        total = np.sum(g, axis=1)
        with np.errstate(divide="ignore"):
            picked[start:stop] = shifted_target - np.log(total)
        scale = row_scale[start:stop]
        g *= (scale / total)[:, None]         # a_i * softmax(z_i)
        g[inside, t] -= scale                 # - a_i * onehot(t_i)

    block = n_rows if logits.size < PARALLEL_MIN_LOGITS else parallel.block_size(n_rows)
    parallel.map_chunks(rows, n_rows, block)
    return picked, grad


def softmax_cross_entropy(logits, y, *, class_weights=None, label_smoothing=0.0):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    ``loss = -(1/N) sum_i log softmax(z_i)[y_i]``. Differentiating
    ``-z_y + logsumexp(z)`` gives ``softmax(z) - onehot(y)``: the softmax Jacobian
    contracted with the log's 1/p collapses to this simple form, which is why the
    gradient is computed from the probabilities once, not by chaining two Jacobians.

    Options, with exactly ``torch.nn.functional.cross_entropy``'s semantics
    (``weight=``, ``label_smoothing=``). With ``w`` the class weights (all 1 if None),
    ``S = sum_i w[y_i]``, ``eps`` the smoothing and ``l_i = log softmax(z_i)``::

        loss = (1 - eps) * sum_i w[y_i] (-l_i[y_i]) / S  +  (eps / K) * sum_i sum_k w[k] (-l_i[k]) / S

    i.e. torch's weighted-mean NLL plus ``eps / K`` times the weighted "uniform
    target" term, both divided by the same ``S`` (torch normalises the smoothing
    term by the weights of the *labels*, not by ``sum_k w[k]``). Writing it as
    ``loss = -sum_i T_i . l_i`` with the target matrix
    ``T_i = ((1 - eps) w[y_i] onehot(y_i) + (eps / K) w) / S``, and using
    ``d(-l_i[k])/dz_i = p_i - onehot(k)``, the gradient is

        dz_i = (sum_k T_ik) p_i - T_i

    which for ``w = 1`` is ``(p_i - ((1 - eps) onehot(y_i) + eps / K)) / N``: the
    familiar smoothed target.

    Args:
        logits: (N, K) float array, z.
        y: (N,) int labels in [0, K).
        class_weights: optional (K,) non-negative weights (see ``base.check_class_weights``).
        label_smoothing: eps in [0, 1).

    Returns:
        loss: python float.
        dlogits: (N, K) array, same dtype as logits, the gradient of ``loss``.
    """
    logits = _check_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    n_samples, n_classes = logits.shape
    y = check_labels(y, n_samples, n_classes)
    class_weights = check_class_weights(class_weights, n_classes)
    eps = check_label_smoothing(label_smoothing)
    if class_weights is None and eps == 0.0:  # the plain mean: the common, fastest path
        picked, dlogits = log_softmax_target(logits, y, np.full(n_samples, 1.0 / n_samples))
        return -float(np.mean(picked, dtype=np.float64)), dlogits
    rows = np.arange(n_samples)
    log_probs = log_softmax(logits)
    label_weight = np.ones(n_samples) if class_weights is None else class_weights[y]
    total = label_weight.sum()  # S
    if total <= 0:
        raise ValueError(f"class_weights of this batch's labels sum to {total:g}: the weighted mean "
                         "is 0 / 0 (every label in the batch has weight 0)")
    nll = -log_probs[rows, y].astype(np.float64)
    loss = (1 - eps) * np.dot(label_weight, nll) / total
    # The smoothing target spreads eps / K of every label's weight S over the classes,
    # class k getting w[k] of it: (eps / (K S)) * w (a scalar eps / (K S) without weights).
    uniform = eps / (n_classes * total) * (1.0 if class_weights is None else class_weights)
    if eps > 0:
        # sum_i sum_k w[k] (-l_i[k]) without a float64 copy of the (N, K) matrix
        column_sum = -np.sum(log_probs, axis=0, dtype=np.float64)
        loss += float(np.sum(uniform * column_sum))
    # dz_i = (sum_k T_ik) p_i - T_i, with sum_k T_ik = ((1 - eps) w[y_i] + eps sum(w) / K) / S.
    target_weight = (1 - eps) * label_weight / total
    row_mass = target_weight + (np.sum(uniform) if class_weights is not None else uniform * n_classes)
    dlogits = np.exp(log_probs)
    dlogits *= row_mass[:, None].astype(logits.dtype)
    if eps > 0:
        dlogits -= np.asarray(uniform, dtype=logits.dtype)
    dlogits[rows, y] -= target_weight.astype(logits.dtype)
    return float(loss), dlogits
