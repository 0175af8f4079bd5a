"""The torch twins of the npsoftmax heads and of the classifier (needs PyTorch).

This module imports torch at its top: it is the torch half of the bridge, loaded by
:mod:`npsoftmax.torch_adapter` only when a conversion runs, so ``import npsoftmax``
never needs torch. Build twins with ``to_torch``; the classes are here to be
``isinstance``-checked, constructed directly or subclassed.

Every twin head has the npsoftmax head protocol in torch terms:
``forward(h (N, D), y (N,) int64) -> scalar`` mean NLL, ``log_prob(h) -> (N, K)`` and
``predict(h) -> (N,)``. The Gumbel head's ``forward`` also takes ``noise=`` (its (N, K)
Gumbel noise) and the sampled head's ``samples=`` (the numpy head's ``CandidateSample``),
so both frameworks can see the same random draws.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from .heads import GumbelSoftmaxHead
from .heads.base import check_class_weights, check_label_smoothing
from .heads.candidate_sampling import CandidateSampler
from .heads.trees import Tree
from .torch_adapter import gumbel_noise, head_loss

__all__ = ["TorchSoftmaxHead", "TorchGumbelSoftmaxHead", "TorchHierarchicalSoftmaxHead", "TorchSampledSoftmaxHead",
           "TorchClassifier"]


class TorchHead(nn.Module):
    """What every twin head shares: ``in_features``, ``n_classes``, optional class weights, ``predict``."""

    def __init__(self, in_features, n_classes):
        super().__init__()
        self.in_features, self.n_classes = in_features, n_classes

    def _register_class_weights(self, class_weights, *, device, dtype):
        # A non-persistent buffer: it follows .to(device), but is configuration, not state.
        weights = check_class_weights(class_weights, self.n_classes)
        self.register_buffer("class_weights", None if weights is None else torch.tensor(
            weights, device=device, dtype=dtype), persistent=False)

    def predict(self, h):
        return self.log_prob(h).argmax(dim=1)


class TorchSoftmaxHead(TorchHead):
    """``nn.Linear`` + cross-entropy, the twin of :class:`~npsoftmax.heads.SoftmaxHead`.

    ``linear.weight`` (K, D) is ``W.T``, ``linear.bias`` (K,) is ``b``.
    ``forward(h (N, D), y (N,) int64) -> scalar`` mean NLL; ``log_prob(h) -> (N, K)``;
    ``predict(h) -> (N,)``. ``class_weights (K,)`` and ``label_smoothing`` are passed to
    ``cross_entropy`` as ``weight=`` and ``label_smoothing=``.
    """

    def __init__(self, in_features, n_classes, *, device=None, dtype=None, class_weights=None,
                 label_smoothing=0.0):
        super().__init__(in_features, n_classes)
        self.linear = nn.Linear(in_features, n_classes, device=device, dtype=dtype)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self._register_class_weights(class_weights, device=device, dtype=self.linear.weight.dtype)

    def _cross_entropy(self, logits, y):
        return functional.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def forward(self, h, y):
        return self._cross_entropy(self.linear(h), y)

    def log_prob(self, h):
        return functional.log_softmax(self.linear(h), dim=1)


class TorchGumbelSoftmaxHead(TorchSoftmaxHead):
    """The twin of :class:`~npsoftmax.heads.GumbelSoftmaxHead` (same logits, Gumbel loss).

    Training mode: ``cross_entropy((z + g) / tau, y)`` with ``z = linear(h)`` and
    ``g = noise`` if given (N, K), else fresh :func:`~npsoftmax.torch_adapter.gumbel_noise`;
    ``last_noise`` keeps it. Passing the numpy head's ``last_noise`` makes both see
    identical noise. Eval mode, ``log_prob`` and ``predict``: noise-free ``softmax(z)``.
    """

    # The numpy head's validated property itself (finite, > 0), not a copy of it.
    tau = GumbelSoftmaxHead.tau

    def __init__(self, in_features, n_classes, *, tau=1.0, device=None, dtype=None, generator=None,
                 class_weights=None, label_smoothing=0.0):
        super().__init__(in_features, n_classes, device=device, dtype=dtype, class_weights=class_weights,
                         label_smoothing=label_smoothing)
        self.tau = tau
        self.generator = generator
        self.last_noise = None

    def forward(self, h, y, noise=None):
        logits = self.linear(h)
        if not self.training:
            if noise is not None:
                raise ValueError("noise is only used in training mode; this head is in eval mode")
            return self._cross_entropy(logits, y)
        if noise is None:
            noise = gumbel_noise(logits.shape, dtype=logits.dtype, device=logits.device, generator=self.generator)
        elif tuple(noise.shape) != tuple(logits.shape) or noise.dtype != logits.dtype:
            raise ValueError(f"noise must be a {logits.dtype} tensor of shape {tuple(logits.shape)}, "
                             f"got {noise.dtype} {tuple(noise.shape)}")
        self.last_noise = noise
        return self._cross_entropy((logits + noise.to(logits.device)) / self.tau, y)

    def extra_repr(self):
        return f"tau={self.tau:g}"


def _class_paths(tree):
    """(K, L) int64: the edges on every class's root-to-leaf path, padded with E (= no edge)."""
    n_edges = tree.children.size
    paths = np.full((tree.n_classes, tree.max_depth), n_edges, dtype=np.int64)
    paths[:, 0] = tree.leaf_edge
    node = tree.leaf_parent.copy()
    for level in range(1, tree.max_depth):
        climbing = node > 0  # the root (node 0) has no incoming edge
        paths[climbing, level] = tree.node_edge[node[climbing]]
        node = np.where(climbing, tree.node_parent[np.where(climbing, node, 0)], 0)
    return paths


class TorchHierarchicalSoftmaxHead(TorchHead):
    """The twin of :class:`~npsoftmax.heads.HierarchicalSoftmaxHead` over the same ``Tree``.

    Parameters ``node_W (K - 1, D)`` and ``node_b (K - 1,)`` exactly as the numpy head:
    one row per child of every internal node except its last (reference) child,
    whose score is 0, rows in edge order. Written densely (every node's softmax for
    every sample, O(N D K)), which is a different algorithm from the numpy head's
    path-only climb, and so an independent check of it:

        edge score (N, E)      = [h node_W^T + node_b, 0][:, edge_row]
        edge log-prob (N, E)   = edge score - logsumexp over the edge's node's children
        log p(k) (N, K)        = sum of the edge log-probs on k's root-to-leaf path
    """

    def __init__(self, tree, in_features, *, device=None, dtype=None):
        if not isinstance(tree, Tree):
            raise TypeError(f"tree must be an npsoftmax.heads.Tree, got {type(tree).__name__}")
        super().__init__(in_features, tree.n_classes)
        self.tree = tree
        n_rows, n_edges = tree.n_classes - 1, tree.children.size
        self.node_W = nn.Parameter(torch.zeros(n_rows, in_features, device=device, dtype=dtype))
        self.node_b = nn.Parameter(torch.zeros(n_rows, device=device, dtype=dtype))
        # Edge -> weight row: the free edges (all but each node's last child) take rows
        # 0..K-2 in edge order; a reference edge reads column K-1, a constant 0.
        free = tree.edge_position < tree.arity[tree.edge_node] - 1
        edge_row = np.full(n_edges, n_rows, dtype=np.int64)
        edge_row[free] = np.arange(n_rows)
        # Node -> its edges, padded with column E, which holds -inf (exp(-inf) = 0).
        widest = int(tree.arity.max())
        node_edges = tree.child_offsets[:-1, None] + np.arange(widest)
        node_edges = np.where(np.arange(widest) < tree.arity[:, None], node_edges, n_edges)
        for name, table in (("edge_row", edge_row), ("node_edges", node_edges),
                            ("edge_node", tree.edge_node), ("class_paths", _class_paths(tree))):
            self.register_buffer(name, torch.as_tensor(np.array(table), device=device), persistent=False)

    def _edge_log_prob(self, h):
        """(N, E + 1): log p(child | node) of every edge, then a 0 column for path padding."""
        n_samples = h.shape[0]
        row_scores = h @ self.node_W.T + self.node_b
        edge_scores = torch.cat([row_scores, row_scores.new_zeros(n_samples, 1)], dim=1)[:, self.edge_row]
        padded = torch.cat([edge_scores, edge_scores.new_full((n_samples, 1), -torch.inf)], dim=1)
        log_normaliser = torch.logsumexp(padded[:, self.node_edges], dim=2)  # (N, M)
        edge_log_prob = edge_scores - log_normaliser[:, self.edge_node]
        return torch.cat([edge_log_prob, edge_log_prob.new_zeros(n_samples, 1)], dim=1)

    def forward(self, h, y):
        path_log_prob = self._edge_log_prob(h).gather(1, self.class_paths[y])  # (N, L)
        return -path_log_prob.sum(dim=1).mean()

    def log_prob(self, h):
        return self._edge_log_prob(h)[:, self.class_paths].sum(dim=2)

    def extra_repr(self):
        return f"in_features={self.in_features}, n_classes={self.n_classes}, tree={self.tree!r}"


class TorchSampledSoftmaxHead(TorchHead):
    """The twin of :class:`~npsoftmax.heads.SampledSoftmaxHead` (TF's ``sampled_softmax_loss``).

    Parameters ``class_W (K, D)`` and ``class_b (K,)`` as the numpy head. Written
    densely, an independent check of the numpy head's row gathers: all K logits
    ``z = h class_W^T + class_b``, then the target's and the sampled columns, each minus
    ``log E`` with ``E = 1 - (1 - Q)^num_tries`` (``subtract_log_q``), sampled columns
    equal to the target set to -inf (``remove_accidental_hits``), and cross-entropy with
    the target at position 0 (weighted mean with ``class_weights``).

    ``forward(h, y, samples)`` needs the numpy head's ``CandidateSample`` in training
    mode (``samples=head.last_samples``); eval mode, ``log_prob``, ``predict``: full softmax.
    """

    def __init__(self, in_features, n_classes, *, n_samples, sampler="log_uniform", class_counts=None,
                 remove_accidental_hits=True, subtract_log_q=True, class_weights=None, device=None,
                 dtype=None):
        super().__init__(in_features, n_classes)
        self.n_samples = n_samples
        self.sampler = CandidateSampler(n_classes, sampler, class_counts)
        self.remove_accidental_hits, self.subtract_log_q = remove_accidental_hits, subtract_log_q
        self.class_W = nn.Parameter(torch.zeros(n_classes, in_features, device=device, dtype=dtype))
        self.class_b = nn.Parameter(torch.zeros(n_classes, device=device, dtype=dtype))
        self._register_class_weights(class_weights, device=device, dtype=self.class_W.dtype)

    def _logits(self, h):
        return h @ self.class_W.T + self.class_b

    def forward(self, h, y, samples=None):
        logits = self._logits(h)
        if not self.training:
            if samples is not None:
                raise ValueError("samples are only used in training mode; this head is in eval mode")
            return functional.cross_entropy(logits, y, weight=self.class_weights)
        if samples is None:
            raise ValueError("TorchSampledSoftmaxHead.forward needs samples= (a CandidateSample, "
                             "e.g. the numpy head's last_samples) in training mode")
        ids = torch.as_tensor(np.asarray(samples.ids), device=h.device)
        candidates = torch.cat([y[:, None], ids[None, :].expand(len(y), -1)], dim=1)  # (N, 1 + n)
        candidate_logits = logits.gather(1, candidates)
        if self.subtract_log_q:
            proposal = torch.as_tensor(self.sampler.probabilities, device=h.device)  # Q (K,) float64
            expected = -torch.expm1(samples.num_tries * torch.log1p(-proposal[candidates]))
            candidate_logits = candidate_logits - torch.log(expected).to(logits.dtype)
        if self.remove_accidental_hits:
            hit = torch.cat([torch.zeros_like(y[:, None], dtype=torch.bool),
                             candidates[:, 1:] == y[:, None]], dim=1)
            candidate_logits = candidate_logits.masked_fill(hit, -torch.inf)
        nll = -functional.log_softmax(candidate_logits, dim=1)[:, 0]
        if self.class_weights is None:
            return nll.mean()
        weights = self.class_weights[y]
        return (weights * nll).sum() / weights.sum()

    def log_prob(self, h):
        return functional.log_softmax(self._logits(h), dim=1)

    def extra_repr(self):
        return (f"in_features={self.in_features}, n_classes={self.n_classes}, n_samples={self.n_samples}, "
                f"sampler={self.sampler.name!r}")


class TorchClassifier(nn.Module):
    """Body + head, the twin of :class:`~npsoftmax.models.Classifier`.

    ``forward(x (N, C, H, W), y (N,), noise=None) -> scalar`` mean NLL (``noise``: the
    Gumbel head's (N, K) noise); ``log_prob(x) -> (N, K)``; ``predict(x) -> (N,)``.
    """

    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x, y, noise=None):
        return head_loss(self.head, self.body(x), y, noise=noise)

    def log_prob(self, x):
        return self.head.log_prob(self.body(x))

    def predict(self, x):
        return self.head.predict(self.body(x))
