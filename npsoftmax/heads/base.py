"""The head protocol shared by all four softmax heads, and its input checks.

A *head* turns features ``h (N, D)`` from the network body into a distribution
over ``K = n_classes`` classes. It owns its output projection, so every head is
a complete, trainable module with one interface::

    head = SomeHead(D, K, rng=np.random.default_rng(0), dtype=np.float32, **options)
    loss = head.forward(h, y)      # float: mean negative log-likelihood of the batch
    dh = head.backward()           # (N, D); also fills head.grads
    logp = head.log_prob(h)        # (N, K) exact, normalised log-probabilities
    pred = head.predict(h)         # (N,) exact argmax of log_prob
    head.params, head.grads        # name -> live array (optimizers update in place)
    head.buffers                   # name -> array state that is not trained (often empty)
    head.train(), head.eval()      # set head.training, return the head

Options every head shares (validated here, once): ``class_weights=(K,)`` turns the
mean into torch's weighted mean ``sum_i w[y_i] nll_i / sum_i w[y_i]``, and
``label_smoothing=eps`` (only heads that form the full softmax: ``supports_label_smoothing``)
mixes the target with the uniform distribution as ``torch.nn.functional.cross_entropy``
does. A head that cannot support an option raises ``ValueError``.

Stochastic training objectives (Gumbel noise, sampled classes) are declared by
``randomness_argument``: the name of the ``forward`` keyword that fixes the
randomness (``"noise"``, ``"samples"``), whose last value is ``head.last_<name>``;
``None`` for a deterministic objective. Every head's ``forward`` in ``eval()`` mode
is the exact (weighted) NLL under ``log_prob``.

Features must be finite: ``forward``, ``log_prob`` and ``predict`` refuse NaN/inf in
``h`` with a ``ValueError`` (a NaN loss and a quiet "class 0" prediction hide the bug).

``params`` holds the arrays the head computes with, so an optimizer that writes
into them (``W -= lr * dW``) trains the head; entries are never rebound. ``grads``
has the same keys and shapes and is overwritten in place by every ``backward``.
"""

import numbers

import numpy as np

from ..layers import Module
from ..validation import check_dtype, check_generator, check_int  # noqa: F401  (used by the head files)


def check_labels(y, n_samples, n_classes, name="y"):
    """Return class labels as a (N,) int64 array, checking dtype, length and range.

    Args:
        y: (N,) integer array-like with values in [0, n_classes).
        n_samples: the expected N (the batch size of the features).
        n_classes: K.
    """
    y = np.asarray(y)
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of shape (N,), got shape {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(
            f"{name} must have one label per feature row: expected length {n_samples}, "
            f"got {y.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64, copy=False)


def check_class_weights(class_weights, n_classes, name="class_weights"):
    """Return per-class loss weights as a read-only (K,) float64 array, or None.

    Same meaning as torch's ``weight=``: the loss is ``sum_i w[y_i] nll_i / sum_i w[y_i]``.
    The weights must be finite, >= 0 and sum to > 0 (else the mean is 0 / 0).
    """
    if class_weights is None:
        return None
    array = np.asarray(class_weights)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating)
                                   or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must be a real array of shape ({n_classes},), got dtype {array.dtype}")
    if array.shape != (n_classes,):
        raise ValueError(f"{name} must have shape (n_classes,) = ({n_classes},), got {array.shape}")
    array = array.astype(np.float64)  # a copy: later edits of the caller's array change nothing
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(array)))} NaN/inf "
                         f"entries (first at class {int(np.flatnonzero(~np.isfinite(array))[0])})")
    if np.any(array < 0):
        raise ValueError(f"{name} must be >= 0, got {array.min():g} at class {int(np.argmin(array))}")
    if array.sum() <= 0:
        raise ValueError(f"{name} must have a positive sum, got {array.sum():g}")
    array.flags.writeable = False
    return array


def check_label_smoothing(label_smoothing, name="label_smoothing"):
    """Return ``label_smoothing`` as a python float in [0, 1) (torch's range)."""
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got "
                        f"{type(label_smoothing).__name__} {label_smoothing!r}")
    value = float(label_smoothing)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return value


def linear_weight(rng, fan_in, shape, dtype):
    """A weight drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear default).

    The bound keeps the initial logits O(1) whatever the input width, so the
    initial softmax is neither saturated nor uniform.
    """
    bound = 1.0 / np.sqrt(fan_in)
    weight = np.empty(shape, dtype=dtype)
    flat = weight.reshape(-1)
    # Drawn in float64 (the same values for both dtypes from the same seed) but in
    # chunks, so a (1M, 256) float32 table never needs a 2 GB float64 temporary.
    chunk = 1 << 22
    for start in range(0, flat.size, chunk):
        stop = min(start + chunk, flat.size)
        flat[start:stop] = rng.uniform(-bound, bound, size=stop - start)
    return weight


class Head(Module):
    """Base class of the softmax heads: construction checks and input validation.

    Subclasses implement ``forward``, ``backward``, ``log_prob`` and ``predict``
    and fill ``self.params`` / ``self.grads`` (same keys, same shapes, live arrays).

    Args:
        in_features: D, the width of the features ``h``.
        n_classes: K >= 2.
        rng: ``numpy.random.Generator`` used for initialisation (and any sampling).
        dtype: float32 (training) or float64 (gradient checks); all parameters,
            gradients and outputs are in this dtype.
        class_weights: optional (K,) finite, non-negative weights with a positive sum:
            the loss becomes ``sum_i w[y_i] nll_i / sum_i w[y_i]`` (torch's weighted mean).
        label_smoothing: eps in [0, 1) (torch's ``cross_entropy`` semantics); only heads
            with ``supports_label_smoothing = True`` accept eps > 0 (ValueError otherwise).

    Class attributes:
        supports_label_smoothing: whether ``label_smoothing > 0`` is implemented.
        randomness_argument: ``None`` for a deterministic training loss, else the name of
            the ``forward`` keyword that fixes its randomness (``head.last_<name>`` repeats it).
    """

    supports_label_smoothing = False
    randomness_argument = None

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, class_weights=None,
                 label_smoothing=0.0):
        self.in_features = check_int(in_features, "in_features")
        self.n_classes = check_int(n_classes, "n_classes", minimum=2)
        self.rng = check_generator(rng)
        self.dtype = check_dtype(dtype)
        self.class_weights = check_class_weights(class_weights, self.n_classes)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        if self.label_smoothing > 0 and not self.supports_label_smoothing:
            raise ValueError(
                f"{type(self).__name__} does not support label_smoothing (got "
                f"{self.label_smoothing}): its loss never forms the full softmax over all "
                "classes that smoothing spreads mass over; use label_smoothing=0")
        # params/grads/buffers (filled by the subclass), the training flag, train()/eval()
        # and the cache come from Module: a head is a module whose forward also takes y.
        super().__init__()

    # -- helpers shared by the heads -----------------------------------------------------
    def _add_param(self, name, value):
        """Register a parameter array and its zero gradient of the same shape and dtype."""
        self.params[name] = value
        # np.zeros (calloc) rather than zeros_like: a huge, sparsely updated gradient
        # (hierarchical head at K = 1M) then only costs memory for the pages it touches.
        self.grads[name] = np.zeros(value.shape, dtype=value.dtype)

    def _check_features(self, h, name="h"):
        """Require ``h`` to be an (N, D) ndarray of the head's dtype, with N >= 1."""
        if not isinstance(h, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray of shape (N, {self.in_features}), "
                            f"got {type(h).__name__}")
        if h.ndim != 2 or h.shape[1] != self.in_features or h.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape (N, {self.in_features}) with N >= 1, got {h.shape}")
        if h.dtype != self.dtype:
            raise TypeError(
                f"{name} must have the head's dtype {self.dtype}, got {h.dtype} "
                f"(build the head with dtype={h.dtype} or cast the features)")
        # One vectorised pass (about 4 us for a 128 x 256 float32 batch, ~2.5% of the
        # cheapest forward, K = 100); a NaN loss or a quiet "class 0" is far costlier.
        finite = np.isfinite(h)
        if not finite.all():
            raise ValueError(
                f"{name} must be finite: {int(finite.size - np.count_nonzero(finite))} of its {h.size} "
                f"entries are NaN or inf, the first in row {int(np.flatnonzero(~finite.all(axis=1))[0])} "
                "(a diverged network body?)")
        return h

    def _check_batch(self, h, y):
        """Validate a (features, labels) pair; returns ``(h, y as int64)``."""
        h = self._check_features(h)
        return h, check_labels(y, h.shape[0], self.n_classes)

    def _sample_weights(self, y):
        """(N,) float64 weight of every sample in the batch mean; sums to 1.

        ``1 / N`` each without class weights; ``w[y_i] / sum_j w[y_j]`` with them
        (torch's weighted mean), so every head's per-sample gradient is this times
        the gradient of that sample's NLL.
        """
        if self.class_weights is None:
            return np.full(y.shape[0], 1.0 / y.shape[0])
        weights = self.class_weights[y]
        total = weights.sum()
        if total <= 0:
            raise ValueError(
                f"class_weights of this batch's labels sum to {total:g}: the weighted mean "
                "is 0 / 0 (every label in the batch has weight 0)")
        return weights / total

    def _take_cache(self):
        """The cache of the last training ``forward``; ``backward`` without one is an error."""
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() needs a preceding forward(h, y)")
        return self._cache

    # -- the protocol -------------------------------------------------------------------
    def forward(self, h, y):
        """Mean negative log-likelihood of labels ``y (N,)`` given features ``h (N, D)``."""
        raise NotImplementedError

    def backward(self):
        """Gradient of the last ``forward`` loss w.r.t. ``h`` (N, D); fills ``self.grads``."""
        raise NotImplementedError

    def log_prob(self, h):
        """Exact normalised log-probabilities (N, K) of every class."""
        raise NotImplementedError

    def predict(self, h):
        """The most probable class (N,) int64, i.e. ``argmax(log_prob(h), axis=1)``."""
        h = self._check_features(h)
        return np.argmax(self.log_prob(h), axis=1)

    def _options_repr(self):
        options = ""
        if self.class_weights is not None:
            options += ", class_weights=(K,)"
        if self.label_smoothing:
            options += f", label_smoothing={self.label_smoothing:g}"
        return options

    def __repr__(self):
        return (f"{type(self).__name__}(in_features={self.in_features}, "
                f"n_classes={self.n_classes}, dtype={self.dtype.name}{self._options_repr()})")


class RowSparseHead(Head):
    """A head whose training step touches only some rows of its (K-ish, D) tables.

    ``grads`` stay dense arrays of the parameters' shapes (what any optimizer
    expects), but each ``backward`` only clears the rows it wrote last time and
    writes the rows it touched now: no dense pass per step. ``row_grads`` holds the
    same gradient sparsely as ``{name: (rows (U,), values (U, ...))}``, and
    ``sparse_sgd_step(lr)`` updates only those rows; with a million classes use that
    (a dense optimizer would sweep the whole table).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._touched_rows = np.zeros(0, dtype=np.int64)
        self.row_grads = {}

    def _write_row_grads(self, rows, values):
        """Set ``grads[name][rows] = value`` for every ``name: value`` (other rows 0)."""
        for name, value in values.items():
            self.grads[name][self._touched_rows] = 0  # only the previous step's rows are non-zero
        for name, value in values.items():
            self.grads[name][rows] = value
        self._touched_rows = rows
        self.row_grads = {name: (rows, value) for name, value in values.items()}

    def sparse_sgd_step(self, learning_rate):
        """Plain SGD on the rows touched by the last ``backward`` only (for huge K).

        ``param[rows] -= learning_rate * d param[rows]`` for every parameter: the cost
        is O(touched rows x D), not O(K D).
        """
        if not self.row_grads:
            raise RuntimeError("sparse_sgd_step() needs a preceding backward()")
        for name, (rows, values) in self.row_grads.items():
            self.params[name][rows] -= self.dtype.type(learning_rate) * values
