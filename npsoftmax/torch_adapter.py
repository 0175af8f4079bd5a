"""Optional PyTorch adapter: the same model as ``torch.nn`` modules, weights copied both ways.

PyTorch is an optional extra (``pip install torch==2.13.0``). It is imported inside
the functions that need it, so ``import npsoftmax.torch_adapter`` works without it;
only calling into the adapter raises ``ImportError``.

    import numpy as np
    from npsoftmax.models import build_model
    from npsoftmax.torch_adapter import to_torch, from_torch, head_loss

    model = build_model("adaptive", 10, (1, 8, 8), rng=np.random.default_rng(0), dtype=np.float64,
                        widths=(8, 8, 8), feature_dim=32)
    twin = to_torch(model)                         # TorchClassifier: .body nn.Sequential, .head
    loss = twin(x_tensor, y_tensor)                # the same mean NLL as model.forward(x, y)
    back = from_torch(twin)                        # a new Classifier; params equal bit for bit

What maps to what (npsoftmax name -> torch name; ``.T`` marks a transpose, because
npsoftmax stores a Linear weight as (D_in, D_out) and torch as (D_out, D_in)):

=========================  ===========================================  ==========================
npsoftmax                  torch                                        parameters and buffers
=========================  ===========================================  ==========================
Linear                     nn.Linear                                    w.T -> weight, b -> bias
Conv2d                     nn.Conv2d (same stride, padding)             w -> weight (F, C, KH, KW)
BatchNorm2d / BatchNorm1d  nn.BatchNorm2d / nn.BatchNorm1d               gamma -> weight, beta -> bias,
                                                                        running_mean, running_var
ReLU, Flatten, Dropout     nn.ReLU, nn.Flatten, nn.Dropout               -
MaxPool2d(size, stride)    nn.MaxPool2d(size, stride)                   -
Sequential                 nn.Sequential ("0.w" -> "0.weight")          -
SoftmaxHead                TorchSoftmaxHead: nn.Linear + cross-entropy  W.T -> linear.weight, b
GumbelSoftmaxHead          TorchGumbelSoftmaxHead (same tau, noise=)    W.T -> linear.weight, b
HierarchicalSoftmaxHead    TorchHierarchicalSoftmaxHead (same tree)     node_W, node_b (no .T)
SampledSoftmaxHead         TorchSampledSoftmaxHead (same samples=)      class_W, class_b (no .T)
AdaptiveSoftmaxHead        nn.AdaptiveLogSoftmaxWithLoss                head_W.T -> head.weight,
                                                                        tail{i}_proj.T -> tail[i][0],
                                                                        tail{i}_out.T -> tail[i][1]
Classifier                 TorchClassifier (.body, .head)               "body.*", "head.*"
=========================  ===========================================  ==========================

Every torch head has the npsoftmax head protocol in torch terms:
``forward(h, y) -> scalar mean NLL`` (the Gumbel head also takes ``noise=``),
``log_prob(h) -> (N, K)`` and ``predict(h) -> (N,)``; ``class_weights`` and ``label_smoothing``
are carried over (``cross_entropy(weight=, label_smoothing=)``); ``nn.AdaptiveLogSoftmaxWithLoss``
returns ``(output, loss)`` instead, so use :func:`head_loss` to get the loss of any head.

Copies are exact: the torch modules are built in the numpy arrays' dtype (float32
stays float32), so ``from_torch(to_torch(m))`` gives back the same bits.
"""

import functools
import numbers

import numpy as np

from .heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, HierarchicalSoftmaxHead, SampledSoftmaxHead,
                    SoftmaxHead)
from .heads.base import check_class_weights, check_label_smoothing
from .heads.candidate_sampling import CandidateSampler
from .heads.gumbel import check_temperature
from .heads.trees import Tree
from .layers import BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .models import Classifier
from .optim import SGD, Adam

__all__ = [
    "require_torch",
    "to_torch",
    "from_torch",
    "copy_to_torch",
    "copy_from_torch",
    "params_from_torch",
    "grads_from_torch",
    "buffers_from_torch",
    "head_loss",
    "gumbel_noise",
    "to_torch_optimizer",
    "TorchSoftmaxHead",
    "TorchGumbelSoftmaxHead",
    "TorchHierarchicalSoftmaxHead",
    "TorchSampledSoftmaxHead",
    "TorchClassifier",
]

#: The torch module classes defined here; they exist only once torch is importable.
_TORCH_CLASS_NAMES = ("TorchSoftmaxHead", "TorchGumbelSoftmaxHead", "TorchHierarchicalSoftmaxHead",
                      "TorchSampledSoftmaxHead", "TorchClassifier")


def require_torch():
    """Import and return ``torch``; ``ImportError`` saying how to install it when it is missing."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "npsoftmax.torch_adapter needs PyTorch, an optional extra: install the CPU build with "
            "`pip install torch==2.13.0` (or the CUDA build from pytorch.org)") from error
    return torch


def __getattr__(name):
    # The torch classes are created on first access (PEP 562), so that importing this
    # module never imports torch.
    if name in _TORCH_CLASS_NAMES:
        return getattr(_torch_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------
# The torch twins of the heads and of the classifier
# ----------------------------------------------------------------------------------

def gumbel_noise(shape, *, dtype, device=None, generator=None):
    """Gumbel(0, 1) noise ``-log(-log(u))`` as a torch tensor of ``shape`` (the torch ``sample_gumbel``).

    ``u ~ U(0, 1)`` is clipped into ``[tiny, largest float below 1]`` of ``dtype`` first, as
    in :func:`npsoftmax.heads.gumbel.gumbel_from_uniform`, so the noise is always finite.
    """
    torch = require_torch()
    uniform = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    info = torch.finfo(dtype)
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)).item()
    return -torch.log(-torch.log(uniform.clamp_(info.tiny, below_one)))


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


@functools.lru_cache(maxsize=None)
def _torch_classes():
    """Define the torch modules (needs torch); cached, so each class is created once."""
    torch = require_torch()
    nn = torch.nn
    functional = torch.nn.functional

    class TorchSoftmaxHead(nn.Module):
        """``nn.Linear`` + cross-entropy, the twin of :class:`~npsoftmax.heads.SoftmaxHead`.

        ``linear.weight`` (K, D) is ``W.T``, ``linear.bias`` (K,) is ``b``.
        ``forward(h (N, D), y (N,) int64) -> scalar`` mean NLL; ``log_prob(h) -> (N, K)``;
        ``predict(h) -> (N,)``. ``class_weights (K,)`` and ``label_smoothing`` are passed to
        ``cross_entropy`` as ``weight=`` and ``label_smoothing=``.
        """

        def __init__(self, in_features, n_classes, *, device=None, dtype=None, class_weights=None,
                     label_smoothing=0.0):
            super().__init__()
            self.in_features, self.n_classes = in_features, n_classes
            self.linear = nn.Linear(in_features, n_classes, device=device, dtype=dtype)
            self.label_smoothing = check_label_smoothing(label_smoothing)
            weights = check_class_weights(class_weights, n_classes)
            self.register_buffer("class_weights", None if weights is None else torch.tensor(
                weights, device=device, dtype=self.linear.weight.dtype), persistent=False)

        def _cross_entropy(self, logits, y):
            return functional.cross_entropy(logits, y, weight=self.class_weights,
                                            label_smoothing=self.label_smoothing)

        def forward(self, h, y):
            return self._cross_entropy(self.linear(h), y)

        def log_prob(self, h):
            return functional.log_softmax(self.linear(h), dim=1)

        def predict(self, h):
            return self.log_prob(h).argmax(dim=1)

    class TorchGumbelSoftmaxHead(TorchSoftmaxHead):
        """The twin of :class:`~npsoftmax.heads.GumbelSoftmaxHead` (same logits, Gumbel loss).

        Training mode: ``cross_entropy((z + g) / tau, y)`` with ``z = linear(h)`` and
        ``g = noise`` if given (N, K), else fresh :func:`gumbel_noise`; ``last_noise``
        keeps it. Passing the numpy head's ``last_noise`` makes both see identical
        noise. Eval mode, ``log_prob`` and ``predict``: noise-free ``softmax(z)``.
        """

        def __init__(self, in_features, n_classes, *, tau=1.0, device=None, dtype=None, generator=None,
                     class_weights=None, label_smoothing=0.0):
            super().__init__(in_features, n_classes, device=device, dtype=dtype, class_weights=class_weights,
                             label_smoothing=label_smoothing)
            self.tau = tau
            self.generator = generator
            self.last_noise = None

        @property
        def tau(self):
            """Temperature (finite, > 0)."""
            return self._tau

        @tau.setter
        def tau(self, value):
            self._tau = check_temperature(value)

        def forward(self, h, y, noise=None):
            logits = self.linear(h)
            if not self.training:
                if noise is not None:
                    raise ValueError("noise is only used in training mode; this head is in eval mode")
                return self._cross_entropy(logits, y)
            if noise is None:
                noise = gumbel_noise(logits.shape, dtype=logits.dtype, device=logits.device,
                                     generator=self.generator)
            elif tuple(noise.shape) != tuple(logits.shape) or noise.dtype != logits.dtype:
                raise ValueError(f"noise must be a {logits.dtype} tensor of shape {tuple(logits.shape)}, "
                                 f"got {noise.dtype} {tuple(noise.shape)}")
            self.last_noise = noise
            return self._cross_entropy((logits + noise.to(logits.device)) / self.tau, y)

        def extra_repr(self):
            return f"tau={self.tau:g}"

    class TorchHierarchicalSoftmaxHead(nn.Module):
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
            super().__init__()
            if not isinstance(tree, Tree):
                raise TypeError(f"tree must be an npsoftmax.heads.Tree, got {type(tree).__name__}")
            self.tree, self.in_features, self.n_classes = tree, in_features, tree.n_classes
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

        def predict(self, h):
            return self.log_prob(h).argmax(dim=1)

        def extra_repr(self):
            return f"in_features={self.in_features}, n_classes={self.n_classes}, tree={self.tree!r}"

    class TorchSampledSoftmaxHead(nn.Module):
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
            super().__init__()
            self.in_features, self.n_classes, self.n_samples = in_features, n_classes, n_samples
            self.sampler = CandidateSampler(n_classes, sampler, class_counts)
            self.remove_accidental_hits, self.subtract_log_q = remove_accidental_hits, subtract_log_q
            self.class_W = nn.Parameter(torch.zeros(n_classes, in_features, device=device, dtype=dtype))
            self.class_b = nn.Parameter(torch.zeros(n_classes, device=device, dtype=dtype))
            weights = check_class_weights(class_weights, n_classes)
            self.register_buffer("class_weights", None if weights is None else torch.tensor(
                weights, device=device, dtype=self.class_W.dtype), persistent=False)

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

        def predict(self, h):
            return self.log_prob(h).argmax(dim=1)

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

    classes = {name: value for name, value in locals().items() if name in _TORCH_CLASS_NAMES}
    for name, cls in classes.items():
        cls.__module__, cls.__qualname__ = __name__, name  # so pickle finds them via __getattr__
    return type("TorchClasses", (), classes)


def head_loss(head, h, y, noise=None):
    """Mean NLL (scalar tensor) of any converted head on features ``h (N, D)``, labels ``y (N,)``.

    ``nn.AdaptiveLogSoftmaxWithLoss`` returns ``(output, loss)``: this picks ``loss``.
    ``noise`` (N, K) is passed to the Gumbel head (and a ``CandidateSample`` to the sampled
    head, as its ``samples``) and refused by the others.
    """
    torch = require_torch()
    classes = _torch_classes()
    if isinstance(head, classes.TorchGumbelSoftmaxHead):
        return head(h, y, noise=noise)
    if isinstance(head, classes.TorchSampledSoftmaxHead):
        return head(h, y, samples=noise)
    if noise is not None:
        raise ValueError(f"noise is only used by the Gumbel head, got a {type(head).__name__}")
    if isinstance(head, torch.nn.AdaptiveLogSoftmaxWithLoss):
        return head(h, y).loss
    return head(h, y)


# ----------------------------------------------------------------------------------
# Building one framework's modules from the other's configuration (no weights yet)
# ----------------------------------------------------------------------------------

def _torch_dtype(torch, array):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[array.dtype]


def _build_torch(module, torch, device):
    """An untrained torch module with ``module``'s configuration, dtype and training mode."""
    nn = torch.nn
    classes = _torch_classes()
    params = getattr(module, "params", {})
    dtype = _torch_dtype(torch, next(iter(params.values()))) if params else None
    if isinstance(module, Classifier):
        built = classes.TorchClassifier(_build_torch(module.body, torch, device),
                                        _build_torch(module.head, torch, device))
    elif isinstance(module, Sequential):
        built = nn.Sequential(*[_build_torch(child, torch, device) for child in module])
    elif isinstance(module, Linear):
        built = nn.Linear(module.in_features, module.out_features, bias="b" in params, device=device,
                          dtype=dtype)
    elif isinstance(module, Conv2d):
        built = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                          padding=module.pad, bias="b" in params, device=device, dtype=dtype)
    elif isinstance(module, (BatchNorm1d, BatchNorm2d)):
        kind = nn.BatchNorm2d if isinstance(module, BatchNorm2d) else nn.BatchNorm1d
        built = kind(module.num_features, eps=module.eps, momentum=module.momentum, device=device, dtype=dtype)
    elif isinstance(module, ReLU):
        built = nn.ReLU()
    elif isinstance(module, MaxPool2d):
        built = nn.MaxPool2d(module.size, stride=module.stride)
    elif isinstance(module, Flatten):
        built = nn.Flatten()
    elif isinstance(module, Dropout):
        built = nn.Dropout(module.p)
    elif isinstance(module, GumbelSoftmaxHead):
        built = classes.TorchGumbelSoftmaxHead(module.in_features, module.n_classes, tau=module.tau,
                                               device=device, dtype=dtype, class_weights=module.class_weights,
                                               label_smoothing=module.label_smoothing)
    elif isinstance(module, SoftmaxHead):
        built = classes.TorchSoftmaxHead(module.in_features, module.n_classes, device=device, dtype=dtype,
                                         class_weights=module.class_weights,
                                         label_smoothing=module.label_smoothing)
    elif isinstance(module, SampledSoftmaxHead):
        sampler = module.sampler
        built = classes.TorchSampledSoftmaxHead(
            module.in_features, module.n_classes, n_samples=module.n_samples, sampler=sampler.name,
            class_counts=sampler.probabilities if sampler.name == "unigram" else None,
            remove_accidental_hits=module.remove_accidental_hits, subtract_log_q=module.subtract_log_q,
            class_weights=module.class_weights, device=device, dtype=dtype)
    elif isinstance(module, HierarchicalSoftmaxHead):
        built = classes.TorchHierarchicalSoftmaxHead(module.tree, module.in_features, device=device, dtype=dtype)
    elif isinstance(module, AdaptiveSoftmaxHead):
        if module.class_weights is not None:
            raise ValueError("torch's nn.AdaptiveLogSoftmaxWithLoss has no class weights: an adaptive head "
                             "with class_weights has no torch twin (weight its per-sample `output` instead)")
        built = nn.AdaptiveLogSoftmaxWithLoss(module.in_features, module.n_classes, module.cutoffs[:-1],
                                              div_value=module.div_value, head_bias=module.head_bias,
                                              device=device, dtype=dtype)
    else:
        raise TypeError(
            f"module_or_model must be an npsoftmax layer, Sequential, head or Classifier, got "
            f"{type(module).__name__}")
    return built.train(getattr(module, "training", True))


def _numpy_dtype(torch, module):
    """float32/float64 of a torch module's floating tensors (float32 if it has none)."""
    dtypes = {tensor.dtype for tensor in [*module.parameters(), *module.buffers()] if tensor.is_floating_point()}
    if not dtypes:
        return np.dtype(np.float32)
    found = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
    if len(dtypes) > 1 or next(iter(dtypes)) not in found:
        raise TypeError(f"torch_module must be all float32 or all float64, got {sorted(map(str, dtypes))}")
    return found[next(iter(dtypes))]


def _single(value, name, module):
    """An int from an int or a pair of equal ints (npsoftmax strides/pads are square)."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{type(module).__name__}.{name} must be the same along both axes for "
                             f"npsoftmax, got {value}")
        value = value[0]
    if not isinstance(value, numbers.Integral):
        raise ValueError(f"{type(module).__name__}.{name} must be an int, got {value!r}")
    return int(value)


def _loss_options(module):
    """``class_weights`` (numpy or None) and ``label_smoothing`` of a torch head twin."""
    weights = module.class_weights
    return {"class_weights": None if weights is None else weights.detach().cpu().numpy().astype(np.float64),
            "label_smoothing": getattr(module, "label_smoothing", 0.0)}


def _build_numpy(module, torch, rng):
    """An npsoftmax module with ``module``'s configuration and dtype (weights are overwritten later)."""
    nn = torch.nn
    classes = _torch_classes()
    dtype = _numpy_dtype(torch, module)
    name = type(module).__name__
    if isinstance(module, classes.TorchClassifier):
        built = Classifier(_build_numpy(module.body, torch, rng), _build_numpy(module.head, torch, rng))
    elif isinstance(module, nn.Sequential):
        built = Sequential(*[_build_numpy(child, torch, rng) for child in module])
    elif isinstance(module, nn.Linear):
        built = Linear(module.in_features, module.out_features, rng=rng, dtype=dtype,
                       bias=module.bias is not None)
    elif isinstance(module, nn.Conv2d):
        if (module.groups != 1 or _single(module.dilation, "dilation", module) != 1
                or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise ValueError(f"{name}: npsoftmax's Conv2d needs groups=1, dilation=1, zero integer padding, "
                             f"got groups={module.groups}, dilation={module.dilation}, "
                             f"padding={module.padding!r}, padding_mode={module.padding_mode!r}")
        built = Conv2d(module.in_channels, module.out_channels, tuple(module.kernel_size),
                       stride=_single(module.stride, "stride", module),
                       pad=_single(module.padding, "padding", module), rng=rng, dtype=dtype,
                       bias=module.bias is not None)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not (module.affine and module.track_running_stats) or module.momentum is None:
            raise ValueError(f"{name}: npsoftmax's batch norm needs affine=True, track_running_stats=True "
                             f"and a numeric momentum, got affine={module.affine}, "
                             f"track_running_stats={module.track_running_stats}, momentum={module.momentum}")
        kind = BatchNorm2d if isinstance(module, nn.BatchNorm2d) else BatchNorm1d
        built = kind(module.num_features, momentum=module.momentum, eps=module.eps, dtype=dtype)
    elif isinstance(module, nn.ReLU):
        built = ReLU()
    elif isinstance(module, nn.MaxPool2d):
        if (_single(module.padding, "padding", module) != 0 or _single(module.dilation, "dilation", module) != 1
                or module.ceil_mode):
            raise ValueError(f"{name}: npsoftmax's MaxPool2d needs padding=0, dilation=1, ceil_mode=False, "
                             f"got padding={module.padding}, dilation={module.dilation}, "
                             f"ceil_mode={module.ceil_mode}")
        built = MaxPool2d(_single(module.kernel_size, "kernel_size", module),
                          stride=_single(module.stride, "stride", module))
    elif isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            raise ValueError(f"{name}: npsoftmax's Flatten is start_dim=1, end_dim=-1, got "
                             f"start_dim={module.start_dim}, end_dim={module.end_dim}")
        built = Flatten()
    elif isinstance(module, nn.Dropout):
        built = Dropout(module.p, rng=rng)
    elif isinstance(module, classes.TorchGumbelSoftmaxHead):
        built = GumbelSoftmaxHead(module.in_features, module.n_classes, rng=rng, dtype=dtype, tau=module.tau,
                                  **_loss_options(module))
    elif isinstance(module, classes.TorchSoftmaxHead):
        built = SoftmaxHead(module.in_features, module.n_classes, rng=rng, dtype=dtype, **_loss_options(module))
    elif isinstance(module, classes.TorchSampledSoftmaxHead):
        sampler = module.sampler
        built = SampledSoftmaxHead(
            module.in_features, module.n_classes, rng=rng, dtype=dtype, n_samples=module.n_samples,
            sampler=sampler.name, class_counts=sampler.probabilities if sampler.name == "unigram" else None,
            remove_accidental_hits=module.remove_accidental_hits, subtract_log_q=module.subtract_log_q,
            class_weights=_loss_options(module)["class_weights"])
    elif isinstance(module, classes.TorchHierarchicalSoftmaxHead):
        built = HierarchicalSoftmaxHead(module.in_features, module.n_classes, rng=rng, dtype=dtype,
                                        tree=module.tree)
    elif isinstance(module, nn.AdaptiveLogSoftmaxWithLoss):
        built = AdaptiveSoftmaxHead(module.in_features, module.n_classes, rng=rng, dtype=dtype,
                                    cutoffs=list(module.cutoffs[:-1]), div_value=module.div_value,
                                    head_bias=module.head_bias)
    else:
        raise TypeError(f"torch_module must be one of the modules to_torch produces "
                        f"(nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, "
                        f"nn.Dropout, nn.Sequential, nn.AdaptiveLogSoftmaxWithLoss, Torch*Head, "
                        f"TorchClassifier), got {name}")
    return built.train() if module.training else built.eval()


# ----------------------------------------------------------------------------------
# Pairing the arrays: npsoftmax name <-> torch tensor
# ----------------------------------------------------------------------------------

def _pairs(numpy_module, torch_module, torch, prefix=""):
    """Every array of ``numpy_module`` with its torch tensor.

    Returns a list of ``(kind, name, array, tensor, transposed)``: ``kind`` is
    ``"params"`` or ``"buffers"``, ``name`` the npsoftmax key (``"body.0.w"``),
    ``transposed`` whether torch stores the transpose. Raises TypeError when the two
    structures do not correspond.
    """
    nn = torch.nn
    classes = _torch_classes()
    expected = {
        Classifier: classes.TorchClassifier, Sequential: nn.Sequential, Linear: nn.Linear,
        Conv2d: nn.Conv2d, BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, ReLU: nn.ReLU,
        MaxPool2d: nn.MaxPool2d, Flatten: nn.Flatten, Dropout: nn.Dropout,
        SoftmaxHead: classes.TorchSoftmaxHead, GumbelSoftmaxHead: classes.TorchGumbelSoftmaxHead,
        HierarchicalSoftmaxHead: classes.TorchHierarchicalSoftmaxHead,
        SampledSoftmaxHead: classes.TorchSampledSoftmaxHead,
        AdaptiveSoftmaxHead: nn.AdaptiveLogSoftmaxWithLoss,
    }
    where = prefix.rstrip(".") or "the top level"
    wanted = next((expected[kind] for kind in type(numpy_module).__mro__ if kind in expected), None)
    if wanted is None:
        raise TypeError(f"numpy_module at {where} must be an npsoftmax layer, Sequential, head or Classifier, "
                        f"got {type(numpy_module).__name__}")
    if not isinstance(torch_module, wanted) or (
            wanted is classes.TorchSoftmaxHead and isinstance(torch_module, classes.TorchGumbelSoftmaxHead)):
        raise TypeError(f"torch_module at {where} must be a {wanted.__name__} to pair with "
                        f"{type(numpy_module).__name__}, got {type(torch_module).__name__}")
    pairs = []

    def add(kind, name, tensor, transposed=False):
        arrays = getattr(numpy_module, kind)
        if (name in arrays) != (tensor is not None):
            raise ValueError(f"{prefix}{name}: present in only one of the two modules "
                             f"(npsoftmax {name in arrays}, torch {tensor is not None}); is a bias missing?")
        if tensor is not None:
            pairs.append((kind, prefix + name, arrays[name], tensor, transposed))

    if isinstance(numpy_module, Classifier):
        pairs += _pairs(numpy_module.body, torch_module.body, torch, prefix + "body.")
        pairs += _pairs(numpy_module.head, torch_module.head, torch, prefix + "head.")
    elif isinstance(numpy_module, Sequential):
        if len(numpy_module) != len(torch_module):
            raise TypeError(f"numpy_module at {where} has {len(numpy_module)} modules but torch_module has "
                            f"{len(torch_module)}")
        for index, (numpy_child, torch_child) in enumerate(zip(numpy_module, torch_module)):
            pairs += _pairs(numpy_child, torch_child, torch, f"{prefix}{index}.")
    elif isinstance(numpy_module, (Linear, Conv2d)):
        add("params", "w", torch_module.weight, transposed=isinstance(numpy_module, Linear))
        add("params", "b", torch_module.bias)
    elif isinstance(numpy_module, (BatchNorm1d, BatchNorm2d)):
        add("params", "gamma", torch_module.weight)
        add("params", "beta", torch_module.bias)
        add("buffers", "running_mean", torch_module.running_mean)
        add("buffers", "running_var", torch_module.running_var)
    elif isinstance(numpy_module, (SoftmaxHead, GumbelSoftmaxHead)):
        add("params", "W", torch_module.linear.weight, transposed=True)
        add("params", "b", torch_module.linear.bias)
    elif isinstance(numpy_module, SampledSoftmaxHead):
        add("params", "class_W", torch_module.class_W)
        add("params", "class_b", torch_module.class_b)
    elif isinstance(numpy_module, HierarchicalSoftmaxHead):
        add("params", "node_W", torch_module.node_W)
        add("params", "node_b", torch_module.node_b)
    elif isinstance(numpy_module, AdaptiveSoftmaxHead):
        if len(torch_module.tail) != numpy_module.n_clusters:
            raise TypeError(f"torch_module at {where} has {len(torch_module.tail)} tail clusters, "
                            f"numpy_module {numpy_module.n_clusters}")
        add("params", "head_W", torch_module.head.weight, transposed=True)
        add("params", "head_b", torch_module.head.bias)
        for i, (projection, output) in enumerate(torch_module.tail):
            add("params", f"tail{i}_proj", projection.weight, transposed=True)
            add("params", f"tail{i}_out", output.weight, transposed=True)
    return pairs


def _check_pair(name, array, tensor, transposed):
    torch_shape = tuple(tensor.shape)
    numpy_shape = array.T.shape if transposed else array.shape
    if numpy_shape != torch_shape:
        raise ValueError(f"{name}: npsoftmax shape {array.shape} does not fit torch shape {torch_shape}"
                         f"{' (transposed)' if transposed else ''}")
    if str(tensor.dtype) != f"torch.{array.dtype}":
        raise TypeError(f"{name}: npsoftmax dtype {array.dtype} differs from torch dtype {tensor.dtype}; "
                        "convert both to the same dtype (copies are exact, never cast)")


def copy_to_torch(numpy_module, torch_module):
    """Copy every parameter and buffer of ``numpy_module`` into ``torch_module``, in place.

    Linear-type weights are transposed; shapes and dtypes must match exactly.
    Returns ``torch_module``.
    """
    torch = require_torch()
    with torch.no_grad():
        for _, name, array, tensor, transposed in _pairs(numpy_module, torch_module, torch):
            _check_pair(name, array, tensor, transposed)
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(array.T if transposed else array)))
    return torch_module


def _as_numpy(tensor, transposed):
    value = tensor.detach().cpu().numpy()
    return value.T if transposed else value


def copy_from_torch(torch_module, numpy_module):
    """Copy every parameter and buffer of ``torch_module`` into ``numpy_module``'s live arrays.

    The arrays are written in place (``np.copyto``), so optimizers holding them see the
    new values. Returns ``numpy_module``.
    """
    torch = require_torch()
    for _, name, array, tensor, transposed in _pairs(numpy_module, torch_module, torch):
        _check_pair(name, array, tensor, transposed)
        np.copyto(array, _as_numpy(tensor, transposed))
    return numpy_module


def _collect(numpy_module, torch_module, kind, read):
    torch = require_torch()
    return {name: read(array, tensor, transposed)
            for pair_kind, name, array, tensor, transposed in _pairs(numpy_module, torch_module, torch)
            if pair_kind == kind}


def params_from_torch(numpy_module, torch_module):
    """``torch_module``'s parameters as new arrays in npsoftmax layout, keyed like ``numpy_module.params``."""
    return _collect(numpy_module, torch_module, "params",
                    lambda array, tensor, transposed: np.array(_as_numpy(tensor, transposed)))


def buffers_from_torch(numpy_module, torch_module):
    """``torch_module``'s buffers (batch-norm running statistics), keyed like ``numpy_module.buffers``."""
    return _collect(numpy_module, torch_module, "buffers",
                    lambda array, tensor, transposed: np.array(_as_numpy(tensor, transposed)))


def grads_from_torch(numpy_module, torch_module):
    """``torch_module``'s ``.grad`` in npsoftmax layout, keyed like ``numpy_module.grads``.

    A parameter that autograd did not reach (``grad is None``) gives zeros, which is what
    the npsoftmax heads write for unused parameters (e.g. an idle adaptive cluster).
    """
    def read(array, tensor, transposed):
        if tensor.grad is None:
            return np.zeros_like(array)
        return np.array(_as_numpy(tensor.grad, transposed))

    return _collect(numpy_module, torch_module, "params", read)


# ----------------------------------------------------------------------------------
# The two conversions
# ----------------------------------------------------------------------------------

def to_torch(module_or_model, *, device=None):
    """The ``torch.nn`` twin of an npsoftmax layer, Sequential, head or Classifier, weights copied.

    Args:
        module_or_model: any npsoftmax module (see the module docstring's table).
        device: torch device for the new module (default: torch's default, the CPU).

    Returns:
        a ``torch.nn.Module`` in the arrays' dtype (float32 stays float32), in the same
        training/eval mode, holding copies of every parameter and buffer.
    """
    torch = require_torch()
    return copy_to_torch(module_or_model, _build_torch(module_or_model, torch, device))


def from_torch(torch_module, *, into=None, rng=None):
    """Back from torch: an npsoftmax module holding ``torch_module``'s weights.

    Args:
        torch_module: a module ``to_torch`` produces (or a plain torch module of the same kinds).
        into: optional npsoftmax module of the same structure; its live arrays are
            overwritten in place and it is returned (its mode is left as it is).
        rng: ``numpy.random.Generator`` for the new modules' own sampling (dropout
            masks, Gumbel noise); default ``np.random.default_rng()``. Unused with ``into``.

    Returns:
        the npsoftmax module; ``from_torch(to_torch(m))`` equals ``m`` bit for bit.
    """
    torch = require_torch()
    if not isinstance(torch_module, torch.nn.Module):
        raise TypeError(f"torch_module must be a torch.nn.Module, got {type(torch_module).__name__}")
    if into is None:
        if rng is None:
            rng = np.random.default_rng()
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        into = _build_numpy(torch_module, torch, rng)
    return copy_from_torch(torch_module, into)


def to_torch_optimizer(optimizer, torch_module):
    """A fresh ``torch.optim`` optimizer with the hyperparameters of an npsoftmax one.

    ``SGD(lr, momentum, nesterov, weight_decay)`` -> ``torch.optim.SGD`` (dampening 0) and
    ``Adam(lr, betas, eps, weight_decay)`` -> ``torch.optim.Adam``: npsoftmax implements
    exactly their update rules. It optimises all of ``torch_module.parameters()``, so
    the npsoftmax optimizer should cover all of the model's ``params``; only
    hyperparameters are copied, hence ``optimizer`` must not have stepped yet.
    """
    torch = require_torch()
    if optimizer.step_count != 0:
        raise ValueError(f"optimizer has taken {optimizer.step_count} steps; its momentum/moment state "
                         "is not copied, so convert it before training")
    parameters = list(torch_module.parameters())
    if isinstance(optimizer, SGD):
        return torch.optim.SGD(parameters, lr=optimizer.lr, momentum=optimizer.momentum,
                               nesterov=optimizer.nesterov, weight_decay=optimizer.weight_decay)
    if isinstance(optimizer, Adam):
        return torch.optim.Adam(parameters, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                weight_decay=optimizer.weight_decay)
    raise TypeError(f"optimizer must be an npsoftmax SGD or Adam, got {type(optimizer).__name__}")
