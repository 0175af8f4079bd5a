"""Candidate samplers for sampled softmax, with TensorFlow's semantics.

A sampler has a fixed proposal distribution ``Q (K,)`` over the classes and draws a set
of ``n`` *distinct* classes for a whole batch the way TensorFlow's candidate samplers do
with ``unique=True`` (the default inside ``tf.nn.sampled_softmax_loss``): draw classes
i.i.d. from Q, with replacement, and keep the first ``n`` distinct ones; ``num_tries``
is how many draws that took. The "expected count" of class k, i.e. how often k is
expected among the candidates, is then (TF's ``SampleBatchGetExpectedCountAvoid``)

    E[k] = 1 - (1 - Q(k))^num_tries          (the chance k appeared in num_tries draws)

computed as ``-expm1(num_tries * log1p(-Q(k)))`` so that tiny ``Q(k)`` keep their digits.
Sampled softmax subtracts ``log E`` from the logits (the log-Q correction).

Distributions (``name`` of ``CandidateSampler``):

* ``"uniform"``: ``Q(k) = 1 / K``.
* ``"log_uniform"`` (Zipf, TF's ``log_uniform_candidate_sampler``, for classes sorted by
  decreasing frequency): ``Q(k) = log((k + 2) / (k + 1)) / log(K + 1)``, drawn by
  inverting its CDF ``F(k) = log(k + 2) / log(K + 1)``: ``k = floor(exp(u log(K + 1))) - 1``.
* ``"unigram"`` (TF's ``fixed_unigram_candidate_sampler``, distortion 1): ``Q(k)``
  proportional to ``class_counts[k]``, drawn by binary search in the cumulative counts.
"""

from collections import namedtuple

import numpy as np

from .base import check_generator, check_int

#: A batch's candidates: ``ids (n,)`` int64 distinct classes in the order first drawn,
#: and ``num_tries`` the number of i.i.d. draws it took (for the expected counts).
CandidateSample = namedtuple("CandidateSample", ["ids", "num_tries"])

SAMPLERS = ("uniform", "log_uniform", "unigram")


class CandidateSampler:
    """Proposal distribution Q over K classes and TF-style unique sampling from it.

    Args:
        n_classes: K.
        name: ``"uniform"``, ``"log_uniform"`` or ``"unigram"``.
        class_counts: (K,) finite counts > 0, required by (and only used by) ``"unigram"``
            (every class needs Q > 0, else a target never drawable has log Q = -inf).

    Attributes:
        probabilities: (K,) float64 Q, summing to 1.
    """

    def __init__(self, n_classes, name="log_uniform", class_counts=None):
        self.n_classes = check_int(n_classes, "n_classes", minimum=2)
        if name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
        if (class_counts is not None) != (name == "unigram"):
            raise ValueError("class_counts=(K,) is required by sampler='unigram' and used by no "
                             f"other sampler; got sampler={name!r} with class_counts "
                             f"{'given' if class_counts is not None else 'None'}")
        self.name = name
        K = self.n_classes
        if name == "uniform":
            self.probabilities = np.full(K, 1.0 / K)
        elif name == "log_uniform":
            k = np.arange(K, dtype=np.float64)
            self.probabilities = np.log1p(1.0 / (k + 1)) / np.log(K + 1)
        else:
            counts = np.asarray(class_counts)
            if counts.shape != (K,) or not np.issubdtype(counts.dtype, np.number) or counts.dtype == bool:
                raise ValueError(f"class_counts must be a numeric array of shape ({K},), got "
                                 f"{counts.dtype} {counts.shape}")
            counts = counts.astype(np.float64)
            if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
                raise ValueError("class_counts must be finite and > 0 for every class (a class the "
                                 f"sampler can never draw has log Q = -inf), got min {counts.min():g}")
            self.probabilities = counts / counts.sum()
            self._cumulative = np.cumsum(self.probabilities)
            self._cumulative[-1] = 1.0

    def draw(self, size, rng):
        """``size`` i.i.d. classes from Q, with replacement: (size,) int64."""
        if self.name == "uniform":
            return rng.integers(0, self.n_classes, size=size)
        u = rng.random(size)
        if self.name == "log_uniform":
            classes = np.floor(np.exp(u * np.log(self.n_classes + 1))).astype(np.int64) - 1
        else:
            classes = np.searchsorted(self._cumulative, u, side="right")
        return np.minimum(classes, self.n_classes - 1)  # u -> 1 rounding guard

    def sample(self, n_samples, rng):
        """``n_samples`` distinct classes, TF's ``unique=True``: a ``CandidateSample``.

        Draws i.i.d. from Q in chunks until ``n_samples`` distinct classes have appeared;
        the candidates are those classes in order of first appearance, and ``num_tries``
        the position of the draw that completed the set.
        """
        rng = check_generator(rng)
        n_samples = check_int(n_samples, "n_samples")
        if n_samples > self.n_classes:
            raise ValueError(f"n_samples must be <= n_classes = {self.n_classes}, got {n_samples}")
        draws = np.zeros(0, dtype=np.int64)
        chunk = max(2 * n_samples, 64)
        while True:
            draws = np.concatenate([draws, self.draw(chunk, rng)])
            _, first = np.unique(draws, return_index=True)
            if first.size >= n_samples:
                first = np.sort(first)[:n_samples]  # the first n distinct draws, in draw order
                return CandidateSample(draws[first], int(first[-1]) + 1)
            chunk *= 2

    def expected_count(self, classes, num_tries):
        """``1 - (1 - Q(k))^num_tries`` for every class in ``classes`` (any shape), float64."""
        probability = self.probabilities[classes]
        return -np.expm1(num_tries * np.log1p(-probability))

    def __repr__(self):
        return f"CandidateSampler(n_classes={self.n_classes}, name={self.name!r})"
