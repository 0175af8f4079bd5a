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

``params`` holds the arrays the head computes with, so an optimizer that writes
into them (``W -= lr * dW``) trains the head; entries are never rebound. ``grads``
has the same keys and shapes and is overwritten in place by every ``backward``.
"""

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
    """

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32):
        self.in_features = check_int(in_features, "in_features")
        self.n_classes = check_int(n_classes, "n_classes", minimum=2)
        self.rng = check_generator(rng)
        self.dtype = check_dtype(dtype)
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
        return h

    def _check_batch(self, h, y):
        """Validate a (features, labels) pair; returns ``(h, y as int64)``."""
        h = self._check_features(h)
        return h, check_labels(y, h.shape[0], self.n_classes)

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

    def __repr__(self):
        return (f"{type(self).__name__}(in_features={self.in_features}, "
                f"n_classes={self.n_classes}, dtype={self.dtype.name})")
