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

#: The head softmax and the tail clusters are independent tasks until their log-probs are
#: added. They share out the thread pool's threads (forward and backward) when their products
#: add up to at least this many flops (~0.3 ms on one core): waking a pool thread costs
#: 0.1-1 ms, which a small head (CIFAR-100's) would not repay.
CONCURRENT_MIN_FLOPS = 1 << 24

#: For ordering and sharing out the tasks, one logit of a softmax costs about as much as this
#: many flops of the products (exp, max, sum and scaling: measured at K = 100,000 on one core,
#: 1.4 ms for a cluster's 680,000 logits against 0.9 ms for its 22 MFLOP of scores).
SOFTMAX_FLOPS_PER_LOGIT = 64


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

        def head_task():
            # output_i = log_softmax(head_i)[target], dhead_i = a_i (softmax(head_i) - onehot(target)):
            # log_softmax_target computes both without forming the log-probabilities.
            return log_softmax_target(self._head_scores(h), head_target, scale)

        def tail_task(i):
            members = members_of[i]
            scores, hidden = self._tail_scores(h[members], i)
            relative = y[members] - self.cutoffs[i]
            tail_output, dscores = log_softmax_target(scores, relative, scale[members])
            return tail_output, (members, hidden, dscores)

        # The head and each cluster with targets are independent until their log-probs are
        # added: separate tasks, which _run_tasks shares out among the pool's threads.
        active = [i for i, members in enumerate(members_of) if members.size]
        costs = self._task_costs(len(y), members_of, active, softmax=True)
        results = self._run_tasks([head_task] + [lambda i=i: tail_task(i) for i in active], costs)
        output, dhead = results[0]
        tails = [None] * self.n_clusters
        for i, (tail_output, tail) in zip(active, results[1:]):
            output[tail[0]] += tail_output
            tails[i] = tail
        self.last_output = output
        self._cache = (h, dhead, tails, members_of, active)
        if self.class_weights is None:
            return -float(np.mean(output, dtype=np.float64))
        return -float(np.dot(sample_weight, output))

    def backward(self):
        """Returns ``dh (N, D)``; writes every entry of ``grads`` (zeros for idle clusters)."""
        h, dhead, tails, members_of, active = self._take_cache()

        def head_weight_task():
            # The large products run on the thread pool when there is one (npsoftmax.parallel.matmul).
            parallel.matmul(h.T, dhead, out=self.grads["head_W"])
            if self.head_bias:
                np.sum(dhead, axis=0, out=self.grads["head_b"])

        def head_input_task():
            return parallel.matmul(dhead, self.params["head_W"].T)

        def tail_task(i):
            members, hidden, dscores = tails[i]
            parallel.matmul(hidden.T, dscores, out=self.grads[f"tail{i}_out"])
            dhidden = parallel.matmul(dscores, self.params[f"tail{i}_out"].T)
            np.matmul(h[members].T, dhidden, out=self.grads[f"tail{i}_proj"])
            return dhidden @ self.params[f"tail{i}_proj"].T  # cluster i's share of dh[members]

        for i, tail in enumerate(tails):
            if tail is None:  # no target in this cluster: it did not enter the loss
                self.grads[f"tail{i}_proj"][...] = 0
                self.grads[f"tail{i}_out"][...] = 0
        (head_cost, head_splits), *tail_costs = self._task_costs(len(h), members_of, active, softmax=False)
        results = self._run_tasks(
            [head_weight_task, head_input_task] + [lambda i=i: tail_task(i) for i in active],
            [(head_cost / 2, head_splits)] * 2 + tail_costs)
        dh = results[1]
        for i, dh_tail in zip(active, results[2:]):
            dh[tails[i][0]] += dh_tail   # clusters own disjoint samples
        return dh

    def _task_costs(self, n_samples, members_of, active, softmax):
        """``(cost, splits)`` of the head's task and of each active cluster's, in that order.

        ``cost`` estimates the task's time in flops: its products, plus
        ``SOFTMAX_FLOPS_PER_LOGIT`` per logit in the forward pass (``softmax=True``); the
        backward pass has twice the products and no softmax. ``splits`` says whether the task
        cuts its own work into blocks on the pool: a product of ``parallel.MIN_PARALLEL_FLOPS``
        or more, or ``softmax_functions.PARALLEL_MIN_LOGITS`` logits or more.
        """
        D = self.in_features

        def task(n, products, logits):
            cost = sum(products) * (1 if softmax else 2) + (SOFTMAX_FLOPS_PER_LOGIT * logits if softmax else 0)
            splits = (max(products) >= parallel.MIN_PARALLEL_FLOPS
                      or (softmax and logits >= softmax_functions.PARALLEL_MIN_LOGITS))
            return cost, splits

        tasks = [task(n_samples, [2 * n_samples * D * self.head_size], n_samples * self.head_size)]
        for i in active:
            n, width = members_of[i].size, self.hidden_sizes[i]
            size = self.cutoffs[i + 1] - self.cutoffs[i]
            tasks.append(task(n, [2 * n * D * width, 2 * n * width * size], n * size))
        return tasks

    def _run_tasks(self, tasks, costs):
        """``[task() for task in tasks]``, sharing the thread pool's threads among them.

        ``costs``: ``(cost, splits)`` per task (``_task_costs``). A task that splits its own
        products and softmax into blocks, one per thread of the pool, runs alone, in turn. The
        others, if they add up to at least ``CONCURRENT_MIN_FLOPS``, run at the same time
        (``parallel.run_concurrently``), longest first, each on one thread. With a million
        classes the largest tail splits itself, and that beats running it beside the head
        (205 vs 143 ms at 2 threads, K = 1,000,000); at K = 100,000 no task does, and the
        head and the three clusters share the threads.
        """
        results = [None] * len(tasks)
        together = [index for index, (_, splits) in enumerate(costs) if not splits]
        if len(together) > 1 and sum(costs[index][0] for index in together) >= CONCURRENT_MIN_FLOPS:
            together.sort(key=lambda index: -costs[index][0])
            for index, result in zip(together, parallel.run_concurrently(*(tasks[index] for index in together))):
                results[index] = result
        else:
            together = []
        for index, task in enumerate(tasks):
            if index not in together:
                results[index] = task()
        return results

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
