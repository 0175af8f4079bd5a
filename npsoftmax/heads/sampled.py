"""Sampled softmax (Jean et al. 2015), with the semantics of TensorFlow's ``tf.nn.sampled_softmax_loss``.

The full softmax costs O(D K) per sample because its normaliser sums over every
class. Sampled softmax trains on the target plus a few *candidate* classes instead:

1. Draw ``n = n_samples`` distinct classes ``s_1..s_n`` for the whole batch from a
   proposal ``Q`` (``CandidateSampler``: uniform, log-uniform/Zipf, or unigram counts),
   as TF does with ``unique=True``: i.i.d. draws until n distinct classes appeared,
   ``num_tries`` draws in all (so the candidates are drawn *without replacement*).
2. Score only those rows: ``z_i[c] = class_W[c] . h_i + class_b[c]`` for ``c`` in
   ``{y_i} + {s_j}``.
3. log-Q correction (``subtract_log_q``): subtract ``log E[c]`` from every candidate
   logit, ``E[c] = 1 - (1 - Q(c))^num_tries`` the expected count of c in the sample.
   Sampled softmax estimates the normaliser ``sum_k exp(z_k)`` by importance sampling,
   ``sum_j exp(z_{s_j}) / E[s_j]``; dividing by E is subtracting log E in the exponent.
4. Accidental hits (``remove_accidental_hits``): a sampled class equal to the sample's
   own target would count the target twice (once as the positive, once as a
   "negative"); its logit is set to -inf, i.e. it drops out of that sample's softmax.
5. Cross-entropy over the ``1 + n`` candidate logits with the target at position 0:

       o_i = [z_i[y_i] - log E[y_i],  z_i[s_1] - log E[s_1], ...,  z_i[s_n] - log E[s_n]]
       loss = sum_i a_i (logsumexp(o_i) - o_i[0])      a_i = 1/N or w[y_i] / sum_j w[y_j]

   with gradient ``d o_i = a_i (softmax(o_i) - onehot(0))``, which flows to the rows
   ``y_i`` and ``s_j`` only (a masked hit has softmax 0: no gradient).

Backward touches only the U distinct rows in ``{y_i} + {s_j}``: with ``A (N, U)`` the
summed logit gradients of sample i at row u, ``dh = A class_W[rows]``,
``d class_W[rows] = A^T h``, ``d class_b[rows] = sum_i A`` (one small dense product, as
the hierarchical head). ``grads`` stay dense but only those rows are written;
``row_grads`` and ``sparse_sgd_step`` (``RowSparseHead``) give the sparse update.

Evaluation: ``log_prob``/``predict`` are the exact full softmax
``log_softmax(h class_W^T + class_b)``, and ``forward`` in ``eval()`` mode is its exact
(weighted) NLL. The sampled loss is a biased estimate of it whose gradient approaches
the full-softmax gradient as ``n_samples`` grows (tested).

Parameters: ``class_W (K, D)`` (one row per class, TF's ``weights`` layout: the row
gather of a step is a contiguous copy) and ``class_b (K,)``.
"""

import numpy as np

from .base import RowSparseHead, check_int, linear_weight
from .candidate_sampling import CandidateSample, CandidateSampler
from .softmax_functions import log_softmax, softmax_cross_entropy


class SampledSoftmaxHead(RowSparseHead):
    """Sampled-softmax head (see the module docstring for the math).

    Args:
        in_features: D.  n_classes: K.  rng: Generator (initialisation and sampling).
        dtype: float32 or float64.
        n_samples: number of distinct sampled classes per batch, 1 <= n_samples <= K (required).
        sampler: ``"log_uniform"`` (default; classes sorted by decreasing frequency),
            ``"uniform"`` or ``"unigram"`` (needs ``class_counts``).
        class_counts: (K,) counts > 0 for ``sampler="unigram"``.
        remove_accidental_hits: drop sampled classes equal to a sample's target (default True).
        subtract_log_q: subtract log expected counts from the candidate logits (default True).
        class_weights: optional (K,) weights (weighted mean over samples, as torch).
        label_smoothing: must be 0 (ValueError otherwise).

    Fixed samples (gradient checks, reproducibility): ``forward(h, y, samples=s)`` uses a
    given ``CandidateSample(ids, num_tries)`` instead of drawing one; ``head.last_samples``
    is the last one used, so ``forward(h, y, samples=head.last_samples)`` repeats a loss.
    """

    randomness_argument = "samples"

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, n_samples,
                 sampler="log_uniform", class_counts=None, remove_accidental_hits=True,
                 subtract_log_q=True, class_weights=None, label_smoothing=0.0):
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self.n_samples = check_int(n_samples, "n_samples")
        if self.n_samples > self.n_classes:
            raise ValueError(f"n_samples must be <= n_classes = {self.n_classes}, got {self.n_samples}")
        self.sampler = CandidateSampler(self.n_classes, sampler, class_counts)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.subtract_log_q = bool(subtract_log_q)
        self._add_param("class_W", linear_weight(self.rng, self.in_features,
                                                 (self.n_classes, self.in_features), self.dtype))
        self._add_param("class_b", np.zeros(self.n_classes, dtype=self.dtype))
        self.last_samples = None

    def _check_samples(self, samples):
        if not isinstance(samples, CandidateSample):
            raise TypeError("samples must be a CandidateSample(ids, num_tries) (e.g. head.last_samples), "
                            f"got {type(samples).__name__}")
        ids = np.asarray(samples.ids)
        if not np.issubdtype(ids.dtype, np.integer) or ids.shape != (self.n_samples,):
            raise ValueError(f"samples.ids must be {self.n_samples} integer class ids, got "
                             f"{ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.n_classes or np.unique(ids).size != ids.size:
            raise ValueError(f"samples.ids must be distinct classes in [0, {self.n_classes})")
        num_tries = check_int(samples.num_tries, "samples.num_tries", minimum=self.n_samples)
        return CandidateSample(ids.astype(np.int64, copy=False), num_tries)

    def _log_expected_count(self, classes, num_tries):
        if not self.subtract_log_q:
            return np.zeros(np.shape(classes), dtype=self.dtype)
        return np.log(self.sampler.expected_count(classes, num_tries)).astype(self.dtype)

    def forward(self, h, y, samples=None):
        """Mean sampled-softmax loss (training mode) or exact NLL (eval mode).

        Args:
            h: (N, D) features.  y: (N,) labels.
            samples: optional ``CandidateSample`` to use instead of a fresh draw
                (training mode only; ``head.last_samples`` repeats the last one).
        """
        if not self.training:
            if samples is not None:
                raise ValueError("samples are only used in training mode; this head is in eval mode")
            h, y = self._check_batch(h, y)
            loss, dlogits = softmax_cross_entropy(self._logits(h), y, class_weights=self.class_weights)
            self._cache = ("full", h, dlogits)
            return loss
        h, y = self._check_batch(h, y)
        n_batch = h.shape[0]
        samples = (self.sampler.sample(self.n_samples, self.rng) if samples is None
                   else self._check_samples(samples))
        self.last_samples = samples
        ids = samples.ids
        rows, inverse = np.unique(np.concatenate([y, ids]), return_inverse=True)
        target_column, sampled_columns = inverse[:n_batch], inverse[n_batch:]
        weight_rows = self.params["class_W"][rows]  # (U, D): each touched row copied once
        scores = h @ weight_rows.T + self.params["class_b"][rows]  # (N, U)
        everyone = np.arange(n_batch)
        logits = np.empty((n_batch, 1 + self.n_samples), dtype=self.dtype)
        logits[:, 0] = scores[everyone, target_column] - self._log_expected_count(y, samples.num_tries)
        logits[:, 1:] = scores[:, sampled_columns] - self._log_expected_count(ids, samples.num_tries)
        if self.remove_accidental_hits:
            logits[:, 1:][ids[None, :] == y[:, None]] = -np.inf  # exp(-inf) = 0: out of the softmax
        log_probs = log_softmax(logits)  # column 0 is finite, so every row has a finite max
        sample_weight = self._sample_weights(y)
        loss = -float(np.dot(sample_weight, log_probs[:, 0]))
        dlogits = np.exp(log_probs)
        dlogits[:, 0] -= 1
        dlogits *= sample_weight.astype(self.dtype)[:, None]
        # A[i, u]: gradient of sample i's loss w.r.t. z_i[rows[u]]; the sampled columns are
        # distinct, and a target column is written once per row, so plain indexing adds.
        score_matrix = np.zeros_like(scores)
        score_matrix[:, sampled_columns] = dlogits[:, 1:]
        score_matrix[everyone, target_column] += dlogits[:, 0]
        self._cache = ("sampled", h, rows, weight_rows, score_matrix)
        return loss

    def backward(self):
        """Returns ``dh (N, D)``; writes the touched rows of ``grads`` and ``row_grads``."""
        cache = self._take_cache()
        if cache[0] == "full":  # eval mode: the exact softmax over every class
            _, h, dlogits = cache
            rows = np.arange(self.n_classes)
            self._write_row_grads(rows, {"class_W": dlogits.T @ h, "class_b": dlogits.sum(axis=0)})
            return dlogits @ self.params["class_W"]
        _, h, rows, weight_rows, score_matrix = cache
        self._write_row_grads(rows, {"class_W": score_matrix.T @ h,
                                     "class_b": score_matrix.sum(axis=0)})
        return score_matrix @ weight_rows

    def _logits(self, h):
        return h @ self.params["class_W"].T + self.params["class_b"]

    def log_prob(self, h):
        """Exact full-softmax log-probabilities (N, K): ``log_softmax(h class_W^T + class_b)``."""
        h = self._check_features(h)
        return log_softmax(self._logits(h))

    def __repr__(self):
        return (super().__repr__()[:-1] + f", n_samples={self.n_samples}, sampler={self.sampler.name!r}, "
                f"remove_accidental_hits={self.remove_accidental_hits}, "
                f"subtract_log_q={self.subtract_log_q})")
