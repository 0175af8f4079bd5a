"""Hierarchical softmax: a tree of small softmaxes instead of one over all K classes.

Each internal node of a ``Tree`` (see ``trees.py``) is a softmax over its children,
and a class's log-probability is the sum of the log-choices on its path:

    log p(k | h) = sum over (node m, child j) on the path to k of log softmax(s_m)[j]

Parameterisation ("one row per free choice"). A softmax over ``c`` children is
unchanged by adding a constant to all ``c`` scores, so one score per node can be
pinned to 0 without losing anything: node ``m`` owns ``c_m - 1`` weight rows, one
per child except the last, whose score is the constant 0 (the *reference* child):

    s_m = [node_W[r] . h + node_b[r]  for the node's rows r ...,  0]

For a binary node this is exactly word2vec's sigmoid ``p(first child) =
sigma(w . h + b)``. Summed over the tree the rows number ``sum_m (c_m - 1) = K - 1``
for *any* tree with K leaves, so ``node_W`` is ``(K - 1, D)`` (one row per free
choice, in node order and child order; rows are D-vectors so a row gather is one
contiguous copy) and ``node_b`` is ``(K - 1,)``.

Training touches only the nodes on the targets' paths: O(N D depth) per step
instead of O(N D K). The forward climbs from every target leaf to the root
(``kernels.tree_paths``). Each of the C path entries (sample i, weight row r) needs
one score ``node_W[r] . h[i]``. Small trees (few distinct touched rows U, shared by
the whole batch, e.g. CIFAR-100's 20 superclasses) compute all N x U scores with one
GEMM and collect the backward with two: with ``A (N, U)`` the summed score gradients
of sample i at touched row u (``np.bincount``),

    dh = A @ node_W[rows],   d node_W[rows] = A^T @ h,   d node_b[rows] = sum_i A

Large trees (U close to C, e.g. 10^5 .. 10^6 classes, where A is mostly zeros)
compute only the C entries, reading the rows in place: ``kernels.gathered_row_dots``
forward and its adjoint ``kernels.scatter_row_products`` backward (the same sums,
added pair by pair). ``_GEMM_SCORE_FACTOR`` chooses between the two.

Gradients and huge K (``RowSparseHead``). ``grads["node_W"]`` / ``grads["node_b"]`` are
dense arrays of the parameters' shapes (what any optimizer expects), but each ``backward``
only clears the rows it wrote last time and writes the rows it touched now: no dense
``(K - 1, D)`` pass per step. ``row_grads`` holds the same gradient sparsely as
``{name: (rows (U,), values (U, ...))}``, and ``sparse_sgd_step(lr)`` updates only those
rows; with a million classes use that (a dense optimizer would sweep the whole table).
With ``class_weights`` every sample's path gradient is scaled by ``w[y_i] / sum_j w[y_j]``
instead of ``1 / N``. Label smoothing is not supported (it needs every class's log-prob).

``log_prob`` is exact over all leaves: every node's log-softmax, then log-probs
accumulated from the root down one level at a time. ``predict`` is the exact argmax
of it (default); ``predict(h, method="greedy")`` follows the best child from the
root, which costs O(depth) but is only an approximation: a likely subtree can hold
no single likely class (greedy != exact; see the tests).

Exact decoding in sub-linear time: ``predict(h, method="search")`` and ``topk(h, k)``.
A node's log-probability is the sum of the edge log-probs above it, and every edge
log-prob is <= 0, so log-probabilities only fall on the way down: a node bounds every
class in its subtree. Best-first search keeps a priority queue of open nodes ordered by
log-probability and always expands the best one; the first *leaf* popped is therefore
at least as probable as everything still in the queue, i.e. the exact argmax, and the
j-th leaf popped is the exact j-th best. A confident model expands ~depth nodes per
sample (O(D depth) instead of O(D K)); an untrained, flat model may expand many more
(``last_search_expansions`` reports the count per sample).

Ties are broken like ``np.argmax`` (smallest class index). The queue is ordered by
``(-log p, smallest class in the subtree)``: a subtree holding a leaf that ties with the
popped one has log-prob >= that leaf's (>= because rounding is monotone, so even in
floating point a child is never above its parent) and, if it held a smaller class,
a smaller second key, so it would have been popped first. The edge log-probs are
computed with the same formula and dtype as ``log_prob``; the only difference is the
dot products (a per-node product instead of one GEMM), which can round differently,
so two classes whose log-probs agree to within that rounding (~1e-6 relative in
float32, ~1e-15 in float64) may be ordered differently by the two methods. Exact ties
(e.g. equal biases and zero weights) are reproduced exactly.
"""

import heapq

import numpy as np

from .. import kernels, parallel
from .base import RowSparseHead, linear_weight
from .trees import Tree, balanced_tree, huffman_tree, tree_from_groups

#: Above this many (sample, touched row) pairs the step never builds the (N, U) matrix A.
_DENSE_SCATTER_LIMIT = 1 << 22
#: A step scores all (sample, touched row) pairs with one GEMM (and sums the backward with
#: two) while there are at most this many times as many pairs as path entries; otherwise
#: it computes only the path entries' products (kernels.gathered_row_dots and
#: kernels.scatter_row_products).
_GEMM_SCORE_FACTOR = 16
#: log_prob/predict are evaluated in row chunks with at most this many (row, edge) entries.
_PREDICT_CHUNK_ENTRIES = 1 << 23


def _segment_log_normaliser(scores, segment_first, segment_of):
    """Per-segment ``log(exp(0) + sum exp(scores))`` (the reference child adds exp(0)).

    Args:
        scores: (C,) scores, segments contiguous and non-empty.
        segment_first: (S,) index of each segment's first score.
        segment_of: (C,) segment of each score.

    Returns:
        (S,) log normalisers, computed with the max shift (the max includes the 0).
    """
    shift = np.maximum(np.maximum.reduceat(scores, segment_first), 0)
    total = np.add.reduceat(np.exp(scores - shift[segment_of]), segment_first)
    return shift + np.log(np.exp(-shift) + total)


def build_tree(n_classes, tree="balanced", *, branching=2, class_counts=None, groups=None):
    """Resolve a head's ``tree`` option into a ``Tree`` with ``n_classes`` leaves.

    ``tree`` is a ``Tree``, or one of ``"balanced"`` (uses ``branching``),
    ``"huffman"`` (needs ``class_counts``) or ``"groups"`` (needs ``groups``, e.g.
    CIFAR-100's superclass of every class, ``npsoftmax.data.COARSE_OF_FINE``: a head
    knows no data set, the caller passes the grouping).
    """
    if isinstance(tree, Tree):
        built = tree
    elif tree == "balanced":
        built = balanced_tree(n_classes, branching)
    elif tree == "huffman":
        if class_counts is None:
            raise ValueError("tree='huffman' needs class_counts=(K,) class frequencies")
        built = huffman_tree(class_counts)
    elif tree == "groups":
        if groups is None:
            raise ValueError("tree='groups' needs groups=(K,) group label of every class")
        built = tree_from_groups(groups)
    else:
        raise ValueError(f"tree must be a Tree or one of 'balanced', 'huffman', 'groups', got {tree!r}")
    if built.n_classes != n_classes:
        raise ValueError(f"tree has {built.n_classes} leaves but the head has "
                         f"n_classes={n_classes}")
    return built


class HierarchicalSoftmaxHead(RowSparseHead):
    """Tree-structured softmax head (see the module docstring for the math).

    Parameters: ``node_W (K - 1, D)`` and ``node_b (K - 1,)``, one row per free child
    choice; node ``m``'s rows are ``row_offsets[m]:row_offsets[m + 1]``, for its
    children in order except the last (score 0).

    Args:
        in_features: D.  n_classes: K.  rng: Generator.  dtype: float32 or float64.
        tree: a ``Tree`` with K leaves, or ``"balanced"`` (default), ``"huffman"``,
            ``"groups"`` (see ``build_tree``).
        branching: children per node for ``tree="balanced"`` (default 2).
        class_counts: (K,) frequencies for ``tree="huffman"``.
        groups: (K,) group labels for ``tree="groups"``.
        class_weights: optional (K,) weights (torch's weighted mean of the per-sample NLL).
        label_smoothing: must be 0 (ValueError otherwise; see the module docstring).

    Attributes:
        last_search_expansions: (N,) int64, internal nodes expanded per sample by the
            last ``predict(h, method="search")`` / ``topk`` (None before the first).
    """

    def __init__(self, in_features, n_classes, *, rng, dtype=np.float32, tree="balanced",
                 branching=2, class_counts=None, groups=None, class_weights=None, label_smoothing=0.0):
        super().__init__(in_features, n_classes, rng=rng, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self.tree = build_tree(self.n_classes, tree, branching=branching,
                               class_counts=class_counts, groups=groups)
        t = self.tree
        free_rows = t.arity - 1
        #: node m's rows are row_offsets[m]:row_offsets[m + 1] (M + 1,)
        self.row_offsets = np.concatenate([[0], np.cumsum(free_rows)])
        # Edges that own a row (all but each node's last child), in row order.
        self._free_edges = np.flatnonzero(t.edge_position < t.arity[t.edge_node] - 1)
        self._node_position = np.where(t.node_edge >= 0, t.edge_position[t.node_edge], -1)
        n_rows = self.n_classes - 1
        self._add_param("node_W", linear_weight(self.rng, self.in_features,
                                                (n_rows, self.in_features), self.dtype))
        self._add_param("node_b", np.zeros(n_rows, dtype=self.dtype))
        self._node_min_class = None  # built on the first search (see _smallest_class_below)
        self.last_search_expansions = None

    # -- training: only the targets' paths ------------------------------------------------
    def _climb(self, y):
        """Every decision on the targets' paths, as flat (S,) arrays, sample by sample.

        Returns ``(sample, node, position)``: step s is sample ``sample[s]`` choosing
        child ``position[s]`` at internal node ``node[s]``; ``sample`` is sorted, and a
        sample's steps go from its leaf up to the root (``kernels.tree_paths``: a compiled
        walk up the parent pointers, or level by level for the whole batch in NumPy).
        """
        t = self.tree
        return kernels.tree_paths(y, t.depth, t.leaf_parent, t.leaf_position, t.node_parent,
                                  self._node_position)

    def _choices(self, step_node):
        """Expand steps into their node's weight rows (a node has arity - 1 of them).

        Returns ``(step_first (S,), step_of (C,), row (C,))``: the scores of step s are
        entries ``step_first[s] : step_first[s] + arity - 1``, entry c belongs to step
        ``step_of[c]`` and uses weight row ``row[c]``.
        """
        n_free = self.tree.arity[step_node] - 1
        step_first = np.cumsum(n_free) - n_free
        step_of = np.repeat(np.arange(step_node.size), n_free)
        row = (self.row_offsets[step_node][step_of]
               + np.arange(step_of.size) - step_first[step_of])
        return step_first, step_of, row

    def forward(self, h, y):
        """Mean NLL of ``y (N,)``; touches only the weight rows on the targets' paths."""
        h, y = self._check_batch(h, y)
        n_samples = h.shape[0]
        step_sample, step_node, step_position = self._climb(y)
        step_first, step_of, row = self._choices(step_node)
        choice_sample = step_sample[step_of]
        rows, inverse = np.unique(row, return_inverse=True)
        weights = self.params["node_W"]
        # The C path scores, each a dot product of a touched row with its sample's h.
        # Small trees (few distinct rows U, shared by all samples): one (N, U) GEMM and
        # pick the entries; BLAS is ~16x faster per dot product than one dot at a time.
        # Large trees (U ~ C): the C needed dot products only, read in place
        # (kernels.gathered_row_dots), and the backward scatters them likewise.
        dense = n_samples * rows.size <= min(_GEMM_SCORE_FACTOR * row.size, _DENSE_SCATTER_LIMIT)
        if dense:
            weights = weights[rows]  # (U, D): each touched row copied once
            scores = parallel.matmul(h, weights.T)[choice_sample, inverse]
        else:
            scores = kernels.gathered_row_dots(weights, row, h, choice_sample)
        scores += self.params["node_b"][rows][inverse]
        log_normaliser = _segment_log_normaliser(scores, step_first, step_of)
        # The target child's score: its row's score, or 0 for the reference (last) child.
        n_free = self.tree.arity[step_node] - 1
        chosen = np.flatnonzero(step_position < n_free)
        chosen_entry = step_first[chosen] + step_position[chosen]
        # Sample i's NLL is sum over its steps of (log normaliser - chosen score); the batch
        # loss weighs it by a_i = 1/N (or w[y_i] / sum_j w[y_j] with class weights).
        sample_weight = self._sample_weights(y)
        loss = (np.dot(sample_weight[step_sample], log_normaliser)
                - np.dot(sample_weight[step_sample[chosen]], scores[chosen_entry]))
        # d loss / d score = a_i (p(child) - [child is the target]) for every score.
        dscores = np.exp(scores - log_normaliser[step_of])
        dscores[chosen_entry] -= 1
        dscores *= sample_weight[choice_sample].astype(self.dtype)
        self._cache = (h, choice_sample, row, rows, inverse, dscores, weights, dense)
        return float(loss)

    def backward(self):
        """Returns ``dh (N, D)``; writes the touched rows of ``grads`` and ``row_grads``."""
        h, choice_sample, row, rows, inverse, dscores, weights, dense = self._take_cache()
        n_samples, n_rows = h.shape[0], rows.size
        # Score c = node_W[row[c]] . h[i] + node_b[row[c]] (i = choice_sample[c], row[c] =
        # rows[inverse[c]]) sends dscore_c * node_W[row[c]] to dh[i] and dscore_c * h[i] to
        # the gradient of touched row inverse[c].
        if dense:  # weights: the (U, D) touched rows
            # Sum them with one small dense matrix: A[i, u] = total dscore of sample i at
            # touched row u (np.bincount), then two GEMMs. Several times faster than
            # np.add.at (unbuffered) or np.add.reduceat over rows of a (C, D) array.
            score_matrix = np.bincount(choice_sample * n_rows + inverse, weights=dscores,
                                       minlength=n_samples * n_rows)
            score_matrix = score_matrix.reshape(n_samples, n_rows).astype(self.dtype)
            # (On the thread pool when there is one: npsoftmax.parallel.matmul.)
            dh = parallel.matmul(score_matrix, weights)
            dweight_rows = parallel.matmul(score_matrix.T, h)
            dbias_rows = score_matrix.sum(axis=0)
        else:  # weights: the whole (K - 1, D) table; A would be big and mostly zeros
            dh, dweight_rows = kernels.scatter_row_products(dscores, weights, row, h, choice_sample,
                                                            inverse, n_rows)
            dbias_rows = np.bincount(inverse, weights=dscores, minlength=n_rows).astype(self.dtype)
        self._write_row_grads(rows, {"node_W": dweight_rows, "node_b": dbias_rows})
        return dh

    # -- evaluation: all leaves -----------------------------------------------------------
    def _edge_scores(self, h):
        """Score of every edge (N, E): the row's score, 0 for each node's last child."""
        t = self.tree
        edge_scores = np.zeros((h.shape[0], t.children.size), dtype=self.dtype)
        edge_scores[:, self._free_edges] = h @ self.params["node_W"].T + self.params["node_b"]
        return edge_scores

    def _log_prob_rows(self, h):
        t = self.tree
        edge_scores = self._edge_scores(h)
        node_first = t.child_offsets[:-1]
        # log-softmax within every node: edges of node m are contiguous (CSR order).
        # (z - max) - log(sum(exp(z - max))), as in log_softmax.
        node_max = np.maximum.reduceat(edge_scores, node_first, axis=1)
        shifted = edge_scores - node_max[:, t.edge_node]
        log_sum = np.log(np.add.reduceat(np.exp(shifted), node_first, axis=1))
        edge_log_prob = shifted - log_sum[:, t.edge_node]
        # log p(node) = log p(parent) + log p(edge into node), one level at a time.
        node_log_prob = np.zeros((h.shape[0], t.n_internal), dtype=self.dtype)
        for nodes in t.levels[1:]:
            node_log_prob[:, nodes] = (node_log_prob[:, t.node_parent[nodes]]
                                       + edge_log_prob[:, t.node_edge[nodes]])
        return node_log_prob[:, t.leaf_parent] + edge_log_prob[:, t.leaf_edge]

    def _row_chunks(self, n_samples):
        step = max(1, _PREDICT_CHUNK_ENTRIES // self.tree.children.size)
        return [slice(start, start + step) for start in range(0, n_samples, step)]

    def log_prob(self, h):
        """Exact log-probabilities of all K leaves (N, K); cost O(N D K)."""
        h = self._check_features(h)
        return np.concatenate([self._log_prob_rows(h[chunk]) for chunk in self._row_chunks(h.shape[0])])

    def predict(self, h, method="exact"):
        """Most probable class (N,) int64.

        Args:
            h: (N, D) features.
            method: ``"exact"`` (default): ``argmax(log_prob(h))``, O(D K) per sample.
                ``"search"``: the same answer by best-first search (see the module
                docstring), typically O(D depth) per sample for a confident model; the
                nodes expanded are in ``last_search_expansions``. ``"greedy"``: descend
                from the root to the most probable child at every node, O(depth) per
                sample but APPROXIMATE (it can miss the most probable class).
        """
        h = self._check_features(h)
        if method == "exact":
            return np.concatenate([np.argmax(self._log_prob_rows(h[chunk]), axis=1)
                                   for chunk in self._row_chunks(h.shape[0])])
        if method == "search":
            return self.topk(h, 1)[0][:, 0]
        if method == "greedy":
            return self._predict_greedy(h)
        raise ValueError(f"method must be 'exact', 'search' or 'greedy', got {method!r}")

    def topk(self, h, k):
        """The exact ``k`` most probable classes of every sample, by best-first search.

        Args:
            h: (N, D) features.
            k: 1 <= k <= K.

        Returns:
            classes: (N, k) int64, best first; ties broken by the smaller class index
                (the order of ``np.argsort(-log_prob(h), kind="stable")[:, :k]``).
            log_probs: (N, k) in the head's dtype, the matching ``log_prob(h)`` entries (equal up to
                the rounding of the dot products, see the module docstring).

        Sets ``last_search_expansions`` (N,) int64: internal nodes expanded per sample.
        """
        h = self._check_features(h)
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
        if not 1 <= k <= self.n_classes:
            raise ValueError(f"k must lie in [1, n_classes] = [1, {self.n_classes}], got {k}")
        min_class = self._smallest_class_below()
        classes = np.empty((h.shape[0], k), dtype=np.int64)
        log_probs = np.empty((h.shape[0], k), dtype=self.dtype)
        expansions = np.empty(h.shape[0], dtype=np.int64)
        for i in range(h.shape[0]):
            classes[i], log_probs[i], expansions[i] = self._best_first(h[i], k, min_class)
        self.last_search_expansions = expansions
        return classes, log_probs

    def _best_first(self, features, k, min_class):
        """Best-first search for one sample ``features (D,)``: its k best (classes, log-probs, expansions).

        Queue entries are ``(-log p, smallest class below, node)``; a leaf of class c is
        the node ``~c`` (< 0), as in ``Tree.children``. heapq pops the smallest tuple:
        the most probable entry, ties to the smallest class (see the module docstring).
        """
        t, dtype = self.tree, self.dtype.type
        node_W, node_b = self.params["node_W"], self.params["node_b"]
        queue = [(-0.0, 0, 0)]  # the root: log p = 0, contains class 0
        classes, log_probs, expansions = [], [], 0
        while len(classes) < k:
            negative_log_prob, smallest, node = heapq.heappop(queue)
            if node < 0:  # a leaf: nothing left in the queue can beat it
                classes.append(~node)
                log_probs.append(-negative_log_prob)
                continue
            expansions += 1
            first, last = self.row_offsets[node], self.row_offsets[node + 1]
            # The node's child scores, the reference child's 0 last, then log-softmax with
            # the same max shift (the 0 included) and dtype as log_prob's edge log-probs.
            scores = np.zeros(last - first + 1, dtype=self.dtype)
            scores[:-1] = node_W[first:last] @ features + node_b[first:last]
            shifted = scores - scores.max()
            edge_log_prob = shifted - np.log(np.sum(np.exp(shifted)))
            child_log_prob = dtype(-negative_log_prob) + edge_log_prob  # parent + edge, as log_prob
            children = t.children[t.child_offsets[node]:t.child_offsets[node + 1]]
            for child, value in zip(children.tolist(), child_log_prob.tolist()):
                below = ~child if child < 0 else int(min_class[child])
                heapq.heappush(queue, (-value, below, child))
        return classes, log_probs, expansions

    def _smallest_class_below(self):
        """(M,) int64: the smallest class index in every internal node's subtree (cached)."""
        if self._node_min_class is None:
            t = self.tree
            smallest = np.full(t.n_internal, t.n_classes, dtype=np.int64)
            np.minimum.at(smallest, t.leaf_parent, np.arange(t.n_classes))
            for nodes in reversed(t.levels[1:]):  # children before parents
                np.minimum.at(smallest, t.node_parent[nodes], smallest[nodes])
            self._node_min_class = smallest
        return self._node_min_class

    def _predict_greedy(self, h):
        t = self.tree
        prediction = np.empty(h.shape[0], dtype=np.int64)
        samples = np.arange(h.shape[0])
        nodes = np.zeros(h.shape[0], dtype=np.int64)
        while samples.size:
            step_first, step_of, row = self._choices(nodes)
            scores = (np.einsum("cd,cd->c", self.params["node_W"][row], h[samples[step_of]])
                      + self.params["node_b"][row])
            best_score = np.maximum.reduceat(scores, step_first)
            # First child with the best score (argmax's tie rule); the reference child's
            # score 0 wins only if it is strictly larger than all the others.
            local = np.arange(scores.size) - step_first[step_of]
            candidate = np.where(scores == best_score[step_of], local, np.iinfo(np.int64).max)
            position = np.minimum.reduceat(candidate, step_first)
            position = np.where(best_score < 0, t.arity[nodes] - 1, position)
            child = t.children[t.child_offsets[nodes] + position]
            is_leaf = child < 0
            prediction[samples[is_leaf]] = ~child[is_leaf]
            samples, nodes = samples[~is_leaf], child[~is_leaf]
        return prediction

    def __repr__(self):
        return super().__repr__()[:-1] + f", tree={self.tree!r})"
