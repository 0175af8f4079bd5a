"""Gumbel-softmax: the sampling relaxation and a Gumbel-softmax classification head.

The Gumbel-max trick: with ``g_k ~ Gumbel(0, 1)`` i.i.d., ``argmax_k (z_k + g_k)`` is
an exact sample from ``Categorical(softmax(z))``. Replacing the argmax by a softmax
at temperature ``tau`` gives a differentiable, "relaxed" sample

    y = softmax((z + g) / tau)          -> one-hot as tau -> 0, uniform as tau -> inf

Gumbel noise is ``g = -log(-log(u))`` with ``u ~ U(0, 1)``. ``u = 0`` gives
``-log(inf) = -inf`` and ``u = 1`` gives ``-log(0) = +inf``, so ``u`` is clipped
into ``[tiny, 1 - eps/2]`` of its dtype first; the noise is then always finite
(within about [-4.5, 16.7] in float32 and [-6.6, 36.7] in float64).

Backward of the relaxed sample: with ``t = (z + g) / tau`` and ``y = softmax(t)``,
the Jacobian ``dy/dt = diag(y) - y y^T`` is *full* (every output depends on every
logit), so a vector-Jacobian product is

    dz = (1/tau) * y * (dy - sum_k dy_k y_k)

Keeping only the diagonal ``y (1 - y)`` is a classic bug; the tests catch it with
a random upstream gradient.

The head trains with ``-log softmax((z + g)/tau)[y]`` (fresh noise every call), whose
gradient w.r.t. ``z`` is ``(softmax((z+g)/tau) - onehot(y)) / tau``. At evaluation it
uses no noise: ``log_prob(h) = log_softmax(z)``, the categorical that the Gumbel-max
trick samples from, so ``predict`` is the noise-free argmax of ``z`` whatever tau is.
"""

import numbers

import numpy as np

from .. import parallel
from .base import check_dtype, check_generator
from .softmax import SoftmaxHead
from .softmax_functions import softmax


def check_temperature(tau, name="tau"):
    """Return ``tau`` as a python float; it must be a finite real number > 0 (ValueError)."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(tau).__name__} {tau!r}")
    tau = float(tau)
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {tau}")
    return tau


def gumbel_from_uniform(u):
    """Transform uniforms ``u`` (any shape, float) into Gumbel(0, 1) noise ``-log(-log(u))``.

    ``u`` is clipped into ``[tiny, 1 - eps/2]`` of its dtype (the smallest normal
    number, and the largest number below 1), so even ``u = 0`` or ``u = 1`` give
    finite noise. Returns a new array of the same shape and dtype.
    """
    u = np.asarray(u)
    if not np.issubdtype(u.dtype, np.floating):
        raise TypeError(f"u must be a float array, got dtype {u.dtype}")
    info = np.finfo(u.dtype)
    clipped = np.clip(u, info.tiny, np.nextafter(u.dtype.type(1), u.dtype.type(0)))
    return -np.log(-np.log(clipped))


def sample_gumbel(shape, rng, dtype=np.float32):
    """Draw Gumbel(0, 1) noise of ``shape`` in ``dtype`` from ``rng`` (never inf or NaN)."""
    rng = check_generator(rng)
    dtype = check_dtype(dtype)
    # Generator.random draws float32 natively, so float32 noise costs no float64 pass.
    return gumbel_from_uniform(rng.random(shape, dtype=dtype))


def _check_noise(noise, shape, dtype):
    if not isinstance(noise, np.ndarray):
        raise TypeError(f"noise must be a numpy.ndarray of shape {shape}, got {type(noise).__name__}")
    if noise.shape != shape:
        raise ValueError(f"noise must have shape {shape} (same as the logits), got {noise.shape}")
    if noise.dtype != dtype:
        raise TypeError(f"noise must have dtype {dtype}, got {noise.dtype}")
    if not np.all(np.isfinite(noise)):
        raise ValueError("noise must be finite (Gumbel noise is never inf or NaN)")
    return noise


def gumbel_softmax(logits, tau, hard=False, *, rng=None, noise=None):
    """Draw a relaxed (or straight-through hard) one-hot sample from softmax(logits).

    Args:
        logits: (N, K) float array ``z`` (unnormalised log-probabilities).
        tau: temperature > 0.
        hard: if True, the returned sample is the exact one-hot ``argmax(z + g)``
            (a true categorical sample), while ``gumbel_softmax_backward`` passes the
            gradient of the relaxed sample through ("straight-through" estimator:
            biased, but low-variance).
        rng: ``numpy.random.Generator`` for fresh noise (required unless ``noise``).
        noise: optional (N, K) Gumbel noise to use instead of drawing it (finite, same dtype).

    Returns:
        sample: (N, K) array in the logits' dtype; rows sum to 1.
        cache: for ``gumbel_softmax_backward``; ``cache["noise"]`` is the noise used.
    """
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits must be a numpy.ndarray, got {type(logits).__name__}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits must be a float array, got dtype {logits.dtype}")
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, K) with K >= 1, got {logits.shape}")
    tau = check_temperature(tau)
    if noise is None:
        if rng is None:
            raise ValueError("gumbel_softmax needs rng=numpy.random.Generator or explicit noise=")
        noise = sample_gumbel(logits.shape, rng, logits.dtype)
    else:
        noise = _check_noise(noise, logits.shape, logits.dtype)
    soft = softmax((logits + noise) / tau)
    if hard:
        sample = np.zeros_like(soft)
        sample[np.arange(soft.shape[0]), np.argmax(soft, axis=1)] = 1
    else:
        sample = soft
    return sample, {"soft": soft, "tau": tau, "hard": bool(hard), "noise": noise}


def gumbel_softmax_backward(dsample, cache):
    """Vector-Jacobian product of ``gumbel_softmax``: dsample (N, K) -> dlogits (N, K).

    Uses the full softmax Jacobian, ``dz = y * (dy - sum(dy * y)) / tau`` with ``y``
    the relaxed sample; for ``hard=True`` this same gradient is passed straight through.
    """
    soft, tau = cache["soft"], cache["tau"]
    if not isinstance(dsample, np.ndarray) or dsample.shape != soft.shape:
        raise ValueError(f"dsample must be an array of shape {soft.shape}, got "
                         f"{getattr(dsample, 'shape', type(dsample).__name__)}")
    dsample = dsample.astype(soft.dtype, copy=False)
    inner = np.sum(dsample * soft, axis=1, keepdims=True)
    return soft * (dsample - inner) / tau


class GumbelSoftmaxHead(SoftmaxHead):
    """Linear projection trained through Gumbel-perturbed, temperature-scaled softmax.

    Training loss (``training`` mode): ``-(1/N) sum_i log softmax((z_i + g_i)/tau)[y_i]``
    with ``z = h W + b`` and fresh ``g ~ Gumbel(0, 1)`` from ``rng`` on every call.
    Evaluation (``eval()`` mode, and always in ``log_prob``/``predict``): no noise,
    no temperature: the model's distribution is ``softmax(z)``, and ``forward`` in
    eval mode returns its mean NLL.

    Parameters: ``W (D, K)``, ``b (K,)`` (as ``SoftmaxHead``).

    Temperature: ``head.tau`` may be set at any time (e.g. by
    ``npsoftmax.optim.ExponentialTemperatureSchedule``, which applies
    ``tau_t = max(tau_min, tau0 * exp(-rate * t))``); non-positive or non-finite
    values raise ``ValueError``.

    Fixed noise (for gradient checks and reproducibility): ``forward(h, y, noise=g)``
    uses the given (N, K) noise instead of drawing it, and ``head.last_noise`` is
    the noise of the last training forward, so ``forward(h, y, noise=head.last_noise)``
    re-evaluates exactly the same loss.

    Args:
        in_features: D.  n_classes: K.  rng: Generator (init and noise).
        dtype: float32 or float64.  tau: initial temperature (default 1.0).
        class_weights: optional (K,) weights; label_smoothing: eps in [0, 1). Both as
            torch's ``cross_entropy`` applied to the perturbed, tempered logits
            ``(z + g) / tau`` (in eval mode: to ``z``).
    """

    randomness_argument = "noise"

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, tau=1.0, class_weights=None,
                 label_smoothing=0.0):
        self.tau = tau  # validated before anything is allocated
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self.last_noise = None

    @property
    def tau(self):
        """The softmax temperature (finite, > 0)."""
        return self._tau

    @tau.setter
    def tau(self, value):
        self._tau = check_temperature(value)

    def forward(self, h, y, noise=None):
        """Mean training loss (with noise) in train mode, noise-free NLL in eval mode.

        Args:
            h: (N, D) features.  y: (N,) labels.
            noise: optional (N, K) Gumbel noise to use instead of a fresh draw
                (training mode only; ``head.last_noise`` repeats the last one).
        """
        if not self.training:
            if noise is not None:
                raise ValueError("noise is only used in training mode; this head is in eval mode")
            return super().forward(h, y)  # the noise-free NLL of softmax(z)
        h, y = self._check_batch(h, y)
        logits = parallel.matmul(h, self.params["W"]) + self.params["b"]
        if noise is None:
            noise = sample_gumbel(logits.shape, self.rng, self.dtype)
        else:
            noise = _check_noise(noise, logits.shape, self.dtype)
        self.last_noise = noise
        loss, dscaled = self._cross_entropy((logits + noise) / self.tau, y)
        # d/dz of t = (z + g)/tau is 1/tau: dz = (softmax(t) - onehot(y)) / (N tau).
        self._cache = (h, dscaled / self.tau)
        return loss

    # backward (dW = h^T dz, db = sum dz, dh = dz W^T from the cached dz), logits and
    # log_prob (noise-free log_softmax(h W + b), independent of tau and of the mode)
    # are SoftmaxHead's: only the training objective differs.

    def sample(self, h, hard=False):
        """A Gumbel-softmax sample (N, K) of the head's distribution at temperature tau."""
        sample, _ = gumbel_softmax(self.logits(h), self.tau, hard=hard, rng=self.rng)
        return sample

    def __repr__(self):
        return super().__repr__()[:-1] + f", tau={self.tau:g})"
