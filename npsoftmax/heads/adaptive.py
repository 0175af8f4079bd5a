"""Adaptive softmax (Grave et al. 2017), with the semantics of torch.nn.AdaptiveLogSoftmaxWithLoss.

Classes are assumed sorted by frequency (class 0 the most frequent). ``cutoffs``
``[c_0, c_1, ..., c_{n-1}]`` split them into a *shortlist* ``[0, c_0)`` and ``n``
tail clusters ``[c_0, c_1), ..., [c_{n-1}, K)``.

* The head is a softmax over the shortlist classes plus one entry per cluster:
  ``head = h @ head_W (+ head_b)``, ``(N, c_0 + n)``.
* Tail cluster i first projects to a narrower width ``hsz_i = D // div_value**(i+1)``
  (rarer classes get fewer dimensions), then scores its classes:
  ``tail_i = (h @ tail{i}_proj) @ tail{i}_out``, ``(N, cluster_size_i)``.

    log p(k) = log_softmax(head)[k]                                   if k < c_0
    log p(k) = log_softmax(head)[c_0 + i] + log_softmax(tail_i)[k - lo_i]   if k in cluster i

Training evaluates a tail cluster only for the targets that fall in it, so with
Zipf-distributed labels most samples cost one small head softmax. ``log_prob`` is
full and exact; ``predict`` is exact too: if a sample's best head entry is a
shortlist class ``s``, then every tail class ``k`` of cluster i has
``log p(k) <= log_softmax(head)[c_0 + i] <= log_softmax(head)[s]`` (a log-probability
is <= 0), so ``s`` is the argmax and the tails need not be computed (the same
shortcut as torch's ``predict``).

Parameters (names fixed by the package's API contract; the torch adapter copies them by transposing):
``head_W (D, c_0 + n)``, ``head_b (c_0 + n,)`` only with ``head_bias=True``,
``tail{i}_proj (D, hsz_i)``, ``tail{i}_out (hsz_i, cluster_size_i)``; no tail biases.
"""

import numbers

import numpy as np

from .. import parallel
from .base import Head, linear_weight
from . import softmax_functions
from .softmax_functions import log_softmax, log_softmax_target

#: The head softmax and the tail clusters run at the same time on the thread pool (forward and
#: backward) when each side has at least this many flops of products (~0.3 ms on one core):
#: waking a pool thread costs 0.1-1 ms, which a small head (CIFAR-100's) would not repay.
CONCURRENT_MIN_FLOPS = 1 << 24


def _branches(head_branch, tail_branch, side_by_side):
    """``[head_branch(), tail_branch()]``, side by side on the thread pool (in turn without one)
    or in turn."""
    if side_by_side:
        return parallel.run_concurrently(head_branch, tail_branch)
    return [head_branch(), tail_branch()]


def default_cutoffs(n_classes, in_features=None, div_value=4.0):
    """The default split for frequency-sorted labels: ``[K // 5, K // 2]`` (deduplicated, in [1, K)).

    With ``in_features`` (D) given, tail clusters whose projection ``D // div_value**(i+1)``
    would be 0 wide are dropped (narrow features keep fewer clusters). The head and the
    command line both use this one rule.
    """
    cutoffs = sorted({value for value in (n_classes // 5, n_classes // 2) if 1 <= value < n_classes}) or [1]
    while in_features is not None and len(cutoffs) > 1 and in_features // div_value ** len(cutoffs) < 1:
        cutoffs = cutoffs[:-1]
    return cutoffs


def check_cutoffs(cutoffs, n_classes):
    """Return ``cutoffs`` as a list of python ints, strictly increasing, in [1, n_classes - 1]."""
    if isinstance(cutoffs, (str, bytes)) or not hasattr(cutoffs, "__iter__"):
        raise TypeError(f"cutoffs must be a sequence of ints, got {type(cutoffs).__name__}")
    cutoffs = list(cutoffs)
    if not cutoffs:
        raise ValueError("cutoffs must contain at least one value (the shortlist size)")
    for value in cutoffs:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"cutoffs must be ints, got {value!r} ({type(value).__name__}) in {cutoffs}")
    cutoffs = [int(value) for value in cutoffs]
    if any(later <= earlier for earlier, later in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"cutoffs must be strictly increasing, got {cutoffs}")
    if cutoffs[0] < 1 or cutoffs[-1] >= n_classes:
        raise ValueError(f"cutoffs must lie in [1, n_classes - 1] = [1, {n_classes - 1}], got {cutoffs}")
    return cutoffs


class AdaptiveSoftmaxHead(Head):
    """Adaptive softmax head (see the module docstring).

    Args:
        in_features: D.  n_classes: K.  rng: Generator.  dtype: float32 or float64.
        cutoffs: strictly increasing ints in [1, K - 1]; ``None`` uses ``default_cutoffs(K)``
            (fewer of them if D is too narrow for every cluster's projection).
        div_value: width divisor per cluster, > 0 (default 4.0): cluster i projects to
            ``int(D // div_value ** (i + 1))`` dimensions, which must be >= 1.
        head_bias: whether the head projection has a bias (default False, as torch).
        class_weights: optional (K,) weights: the loss is ``sum_i w[y_i] nll_i / sum_i w[y_i]``
            (torch's ``AdaptiveLogSoftmaxWithLoss`` has no weights; this is the weighted mean
            of its per-sample ``output``, as ``cross_entropy(weight=)`` defines it).
        label_smoothing: must be 0 (ValueError otherwise: training never forms the
            tail log-probs of samples outside a cluster).

    Attributes:
        cutoffs: the cutoffs with K appended, as torch stores them.
        shortlist_size, n_clusters, head_size, hidden_sizes.
        last_output: (N,) ``log p(y_i | h_i)`` of the last ``forward`` (torch's ``output``).
    """

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, cutoffs=None,
                 div_value=4.0, head_bias=False, class_weights=None, label_smoothing=0.0):
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        if isinstance(div_value, bool) or not isinstance(div_value, numbers.Real) \
                or not np.isfinite(div_value) or div_value <= 0:
            raise ValueError(f"div_value must be a finite number > 0, got {div_value!r}")
        if cutoffs is None:
            cutoffs = default_cutoffs(self.n_classes, self.in_features, div_value)
        cutoffs = check_cutoffs(cutoffs, self.n_classes)
        self.cutoffs = cutoffs + [self.n_classes]
        self.div_value = float(div_value)
        self.head_bias = bool(head_bias)
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        # The same expression as torch, so the two always agree on the widths.
        self.hidden_sizes = [int(self.in_features // (self.div_value ** (i + 1)))
                             for i in range(self.n_clusters)]
        for i, width in enumerate(self.hidden_sizes):
            if width < 1:
                raise ValueError(
                    f"cluster {i} would project to in_features // div_value**{i + 1} = "
                    f"{self.in_features} // {self.div_value ** (i + 1):g} = 0 dimensions; "
                    "use a smaller div_value or fewer cutoffs")
        D = self.in_features
        self._add_param("head_W", linear_weight(self.rng, D, (D, self.head_size), self.dtype))
        if self.head_bias:
            self._add_param("head_b", np.zeros(self.head_size, dtype=self.dtype))
        for i, width in enumerate(self.hidden_sizes):
            size = self.cutoffs[i + 1] - self.cutoffs[i]
            self._add_param(f"tail{i}_proj", linear_weight(self.rng, D, (D, width), self.dtype))
            self._add_param(f"tail{i}_out", linear_weight(self.rng, width, (width, size), self.dtype))
        self.last_output = None

    def _head_scores(self, h):
        scores = parallel.matmul(h, self.params["head_W"])
        if self.head_bias:
            scores += self.params["head_b"]
        return scores

    def _tail_scores(self, h, i):
        """Cluster i's class scores (n, cluster_size) and the projection (n, hsz) they came from."""
        hidden = h @ self.params[f"tail{i}_proj"]
        return parallel.matmul(hidden, self.params[f"tail{i}_out"]), hidden

    def forward(self, h, y):
        """Mean NLL of ``y (N,)``; each tail cluster is evaluated only on its own targets."""
        h, y = self._check_batch(h, y)
        # a_i = 1/N, or w[y_i] / sum_j w[y_j]: the loss is -sum_i a_i output_i, and every
        # per-sample gradient is a_i times that of -output_i.
        sample_weight = self._sample_weights(y)
        scale = sample_weight.astype(self.dtype)
        # 0 = shortlist, i + 1 = tail cluster i.
        cluster_of = np.searchsorted(self.cutoffs[:-1], y, side="right")
        head_target = np.where(cluster_of == 0, y, self.shortlist_size + cluster_of - 1)
        members_of = [np.flatnonzero(cluster_of == i + 1) for i in range(self.n_clusters)]

        def head_branch():
            # output_i = log_softmax(head_i)[target], dhead_i = a_i (softmax(head_i) - onehot(target)):
            # log_softmax_target computes both without forming the log-probabilities.
            return log_softmax_target(self._head_scores(h), head_target, scale)

        def tail_branch():
            tails, tail_outputs = [], []
            for i, members in enumerate(members_of):
                if members.size == 0:
                    tails.append(None)
                    continue
                scores, hidden = self._tail_scores(h[members], i)
                relative = y[members] - self.cutoffs[i]
                tail_output, dscores = log_softmax_target(scores, relative, scale[members])
                tail_outputs.append((members, tail_output))
                tails.append((members, hidden, dscores))
            return tails, tail_outputs

        # The head and the tails are independent until their log-probs are added: with a
        # thread pool and enough work on both sides they run at the same time (and so do
        # their backward passes: the decision is kept for backward).
        side_by_side = self._side_by_side(len(y), members_of)
        (output, dhead), (tails, tail_outputs) = _branches(head_branch, tail_branch, side_by_side)
        for members, tail_output in tail_outputs:
            output[members] += tail_output
        self.last_output = output
        self._cache = (h, dhead, tails, side_by_side)
        if self.class_weights is None:
            return -float(np.mean(output, dtype=np.float64))
        return -float(np.dot(sample_weight, output))

    def backward(self):
        """Returns ``dh (N, D)``; writes every entry of ``grads`` (zeros for idle clusters)."""
        h, dhead, tails, side_by_side = self._take_cache()

        def head_branch():
            # The large products run on the thread pool when there is one (npsoftmax.parallel.matmul).
            parallel.matmul(h.T, dhead, out=self.grads["head_W"])
            if self.head_bias:
                np.sum(dhead, axis=0, out=self.grads["head_b"])
            return parallel.matmul(dhead, self.params["head_W"].T)

        def tail_branch():
            dh_tails = np.zeros_like(h)  # the tails' share of dh, added to the head's at the end
            for i, tail in enumerate(tails):
                grad_proj, grad_out = self.grads[f"tail{i}_proj"], self.grads[f"tail{i}_out"]
                if tail is None:  # no target in this cluster: it did not enter the loss
                    grad_proj[...] = 0
                    grad_out[...] = 0
                    continue
                members, hidden, dscores = tail
                parallel.matmul(hidden.T, dscores, out=grad_out)
                dhidden = parallel.matmul(dscores, self.params[f"tail{i}_out"].T)
                np.matmul(h[members].T, dhidden, out=grad_proj)
                dh_tails[members] += dhidden @ self.params[f"tail{i}_proj"].T
            return dh_tails

        dh, dh_tails = _branches(head_branch, tail_branch, side_by_side)
        dh += dh_tails
        return dh

    def _side_by_side(self, n_samples, members_of):
        """Whether the head's and the tails' halves of a pass run at the same time.

        Yes when both are worth a thread (``CONCURRENT_MIN_FLOPS`` of products each) and
        neither is big enough to be split on the pool by itself (its products under ``parallel.MIN_PARALLEL_FLOPS``,
        its logits under ``softmax_functions.PARALLEL_MIN_LOGITS``): a branch running on a
        pool thread does its own products on that one thread. With a million classes the
        tails are the big side, and splitting their products beats running the branches
        side by side (205 vs 143 ms at 2 threads, K = 1,000,000).
        """
        D = self.in_features
        sizes = [self.cutoffs[i + 1] - self.cutoffs[i] for i in range(self.n_clusters)]
        head_flops = 2 * n_samples * D * self.head_size
        tail_flops = sum(2 * members.size * width * (D + size)
                         for members, width, size in zip(members_of, self.hidden_sizes, sizes))
        largest_logits = max(n_samples * self.head_size,
                             sum(members.size * size for members, size in zip(members_of, sizes)))
        return (min(head_flops, tail_flops) >= CONCURRENT_MIN_FLOPS
                and max(head_flops, tail_flops) < parallel.MIN_PARALLEL_FLOPS
                and largest_logits < softmax_functions.PARALLEL_MIN_LOGITS)

    def log_prob(self, h):
        """Exact log-probabilities of all K classes (N, K) (torch's ``log_prob``)."""
        h = self._check_features(h)
        return self._full_log_prob(h, log_softmax(self._head_scores(h)))

    def _full_log_prob(self, h, head_log_prob):
        out = np.empty((h.shape[0], self.n_classes), dtype=self.dtype)
        out[:, :self.shortlist_size] = head_log_prob[:, :self.shortlist_size]
        for i in range(self.n_clusters):
            scores, _ = self._tail_scores(h, i)
            out[:, self.cutoffs[i]:self.cutoffs[i + 1]] = (
                log_softmax(scores) + head_log_prob[:, self.shortlist_size + i, None])
        return out

    def predict(self, h):
        """Exact ``argmax(log_prob(h))`` (N,); tails are computed only where needed."""
        h = self._check_features(h)
        head_log_prob = log_softmax(self._head_scores(h))
        prediction = np.argmax(head_log_prob, axis=1)
        # Best head entry is a cluster: the answer may be any class, so score them all.
        unsure = np.flatnonzero(prediction >= self.shortlist_size)
        if unsure.size:
            prediction[unsure] = np.argmax(
                self._full_log_prob(h[unsure], head_log_prob[unsure]), axis=1)
        return prediction

    def __repr__(self):
        return (super().__repr__()[:-1] + f", cutoffs={self.cutoffs[:-1]}, "
                f"div_value={self.div_value:g}, head_bias={self.head_bias})")
