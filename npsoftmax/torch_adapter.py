"""Optional PyTorch adapter: the same model as ``torch.nn`` modules, weights copied both ways.

PyTorch is an optional extra (``pip install torch==2.13.0``). Its half of the bridge,
the torch twins of the heads, lives in :mod:`npsoftmax.torch_twins`, which this module
imports only inside the functions that need it, so ``import npsoftmax.torch_adapter``
works without torch; only calling into the adapter raises ``ImportError``.

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

In code this is one table, ``CONVERTERS``: a :class:`Converter` per npsoftmax type
holding all three of its conversions (build the torch module, build the npsoftmax
module, pair their arrays). ``to_torch``, ``from_torch`` and the copies walk it.

Every torch head has the npsoftmax head protocol in torch terms:
``forward(h, y) -> scalar mean NLL`` (the Gumbel head also takes ``noise=``),
``log_prob(h) -> (N, K)`` and ``predict(h) -> (N,)``; ``class_weights`` and ``label_smoothing``
are carried over (``cross_entropy(weight=, label_smoothing=)``); ``nn.AdaptiveLogSoftmaxWithLoss``
returns ``(output, loss)`` instead, so use :func:`head_loss` to get the loss of any head.

Copies are exact: the torch modules are built in the numpy arrays' dtype (float32
stays float32), so ``from_torch(to_torch(m))`` gives back the same bits.
"""

import dataclasses
import numbers
import operator
from typing import Callable

import numpy as np

from .heads import (AdaptiveSoftmaxHead, GumbelSoftmaxHead, HierarchicalSoftmaxHead, SampledSoftmaxHead,
                    SoftmaxHead)
from .layers import BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .models import Classifier
from .optim import SGD, Adam

#: The classes of npsoftmax.torch_twins, also reachable from here (they need torch).
_TWIN_NAMES = ("TorchSoftmaxHead", "TorchGumbelSoftmaxHead", "TorchHierarchicalSoftmaxHead",
               "TorchSampledSoftmaxHead", "TorchClassifier")

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
    "Converter",
    "CONVERTERS",
    *_TWIN_NAMES,
]


def require_torch():
    """Import and return ``torch``; ``ImportError`` saying how to install it when it is missing."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "npsoftmax.torch_adapter needs PyTorch, an optional extra: install the CPU build with "
            "`pip install torch==2.13.0` (or the CUDA build from pytorch.org)") from error
    return torch


def _twins():
    """The module :mod:`npsoftmax.torch_twins`, imported on first use (it imports torch)."""
    require_torch()  # the ImportError that says how to install torch
    from . import torch_twins
    return torch_twins


def __getattr__(name):
    # ``from npsoftmax.torch_adapter import TorchClassifier`` keeps working (PEP 562),
    # without importing torch when this module is imported.
    if name in _TWIN_NAMES:
        return getattr(_twins(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def head_loss(head, h, y, noise=None):
    """Mean NLL (scalar tensor) of any converted head on features ``h (N, D)``, labels ``y (N,)``.

    ``nn.AdaptiveLogSoftmaxWithLoss`` returns ``(output, loss)``: this picks ``loss``.
    ``noise`` (N, K) is passed to the Gumbel head (and a ``CandidateSample`` to the sampled
    head, as its ``samples``) and refused by the others.
    """
    twins = _twins()
    if isinstance(head, twins.TorchGumbelSoftmaxHead):
        return head(h, y, noise=noise)
    if isinstance(head, twins.TorchSampledSoftmaxHead):
        return head(h, y, samples=noise)
    if noise is not None:
        raise ValueError(f"noise is only used by the Gumbel head, got a {type(head).__name__}")
    if isinstance(head, twins.nn.AdaptiveLogSoftmaxWithLoss):
        return head(h, y).loss
    return head(h, y)


# ----------------------------------------------------------------------------------
# The table: one Converter per npsoftmax type
# ----------------------------------------------------------------------------------

def _none(numpy_module, torch_module, where):
    return []


@dataclasses.dataclass(frozen=True)
class Converter:
    """Everything the bridge knows about one npsoftmax type and its torch twin.

    Attributes:
        numpy_type: the npsoftmax class (subclasses use it too, unless they have their own).
        torch_type: the torch class, as a name in :mod:`npsoftmax.torch_twins`
            (``"TorchSoftmaxHead"``, or ``"nn.Linear"`` for torch's own), so that this
            table is written without importing torch.
        build_torch: ``(module, torch_class, device, dtype) -> torch module`` with
            ``module``'s configuration (its weights are copied afterwards).
        build_numpy: ``(torch_module, rng, dtype) -> npsoftmax module``, the way back;
            raises ValueError for torch options npsoftmax does not have.
        pairs: ``(numpy_module, torch_module, where) -> [(name, tensor, transposed)]``:
            each npsoftmax parameter or buffer name with the torch tensor holding it
            (``None`` where torch has none, e.g. no bias) and whether torch stores its transpose.
        children: for containers, ``(numpy_module, torch_module, where) ->
            [(name, numpy child, torch child)]``, paired recursively under ``"name."``.
    """

    numpy_type: type
    torch_type: str
    build_torch: Callable
    build_numpy: Callable
    pairs: Callable = _none
    children: Callable = _none

    def torch_class(self, twins):
        """The torch class, looked up in ``twins`` (the :mod:`npsoftmax.torch_twins` module)."""
        return operator.attrgetter(self.torch_type)(twins)


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


def _sequential_children(numpy_module, torch_module, where):
    if len(numpy_module) != len(torch_module):
        raise TypeError(f"numpy_module at {where} has {len(numpy_module)} modules but torch_module has "
                        f"{len(torch_module)}")
    return [(str(index), numpy_child, torch_child)
            for index, (numpy_child, torch_child) in enumerate(zip(numpy_module, torch_module))]


def _conv2d_from_torch(module, rng, dtype):
    if (module.groups != 1 or _single(module.dilation, "dilation", module) != 1
            or module.padding_mode != "zeros" or isinstance(module.padding, str)):
        raise ValueError(f"{type(module).__name__}: npsoftmax's Conv2d needs groups=1, dilation=1, zero integer "
                         f"padding, got groups={module.groups}, dilation={module.dilation}, "
                         f"padding={module.padding!r}, padding_mode={module.padding_mode!r}")
    return Conv2d(module.in_channels, module.out_channels, tuple(module.kernel_size),
                  stride=_single(module.stride, "stride", module), pad=_single(module.padding, "padding", module),
                  rng=rng, dtype=dtype, bias=module.bias is not None)


def _batch_norm(kind):
    """The converter of BatchNorm1d or BatchNorm2d (``kind``) and torch's class of the same name."""
    def from_torch(module, rng, dtype):
        if not (module.affine and module.track_running_stats) or module.momentum is None:
            raise ValueError(f"{type(module).__name__}: npsoftmax's batch norm needs affine=True, "
                             f"track_running_stats=True and a numeric momentum, got affine={module.affine}, "
                             f"track_running_stats={module.track_running_stats}, momentum={module.momentum}")
        return kind(module.num_features, momentum=module.momentum, eps=module.eps, dtype=dtype)

    return Converter(
        kind, f"nn.{kind.__name__}",
        build_torch=lambda module, make, device, dtype: make(module.num_features, eps=module.eps,
                                                             momentum=module.momentum, device=device, dtype=dtype),
        build_numpy=from_torch,
        pairs=lambda numpy_module, torch_module, where: [
            ("gamma", torch_module.weight, False), ("beta", torch_module.bias, False),
            ("running_mean", torch_module.running_mean, False), ("running_var", torch_module.running_var, False)])


def _max_pool_from_torch(module, rng, dtype):
    if (_single(module.padding, "padding", module) != 0 or _single(module.dilation, "dilation", module) != 1
            or module.ceil_mode):
        raise ValueError(f"{type(module).__name__}: npsoftmax's MaxPool2d needs padding=0, dilation=1, "
                         f"ceil_mode=False, got padding={module.padding}, dilation={module.dilation}, "
                         f"ceil_mode={module.ceil_mode}")
    return MaxPool2d(_single(module.kernel_size, "kernel_size", module),
                     stride=_single(module.stride, "stride", module))


def _flatten_from_torch(module, rng, dtype):
    if (module.start_dim, module.end_dim) != (1, -1):
        raise ValueError(f"{type(module).__name__}: npsoftmax's Flatten is start_dim=1, end_dim=-1, got "
                         f"start_dim={module.start_dim}, end_dim={module.end_dim}")
    return Flatten()


def _loss_options(head):
    """``class_weights`` and ``label_smoothing`` of an npsoftmax head, as constructor keywords."""
    return {"class_weights": head.class_weights, "label_smoothing": head.label_smoothing}


def _torch_loss_options(head):
    """The same of a torch twin head: its ``class_weights`` buffer back as float64 numpy (or None)."""
    weights = head.class_weights
    return {"class_weights": None if weights is None else weights.detach().cpu().numpy().astype(np.float64),
            "label_smoothing": getattr(head, "label_smoothing", 0.0)}


def _sampled_options(head):
    """The sampling configuration of a sampled head, numpy or torch, as constructor keywords."""
    sampler = head.sampler
    return {"n_samples": head.n_samples, "sampler": sampler.name,
            "class_counts": sampler.probabilities if sampler.name == "unigram" else None,
            "remove_accidental_hits": head.remove_accidental_hits, "subtract_log_q": head.subtract_log_q}


def _linear_head_pairs(numpy_module, torch_module, where):
    return [("W", torch_module.linear.weight, True), ("b", torch_module.linear.bias, False)]


def _adaptive_to_torch(module, make, device, dtype):
    if module.class_weights is not None:
        raise ValueError("torch's nn.AdaptiveLogSoftmaxWithLoss has no class weights: an adaptive head "
                         "with class_weights has no torch twin (weight its per-sample `output` instead)")
    return make(module.in_features, module.n_classes, module.cutoffs[:-1], div_value=module.div_value,
                head_bias=module.head_bias, device=device, dtype=dtype)


def _adaptive_pairs(numpy_module, torch_module, where):
    if len(torch_module.tail) != numpy_module.n_clusters:
        raise TypeError(f"torch_module at {where} has {len(torch_module.tail)} tail clusters, "
                        f"numpy_module {numpy_module.n_clusters}")
    pairs = [("head_W", torch_module.head.weight, True), ("head_b", torch_module.head.bias, False)]
    for i, (projection, output) in enumerate(torch_module.tail):
        pairs += [(f"tail{i}_proj", projection.weight, True), (f"tail{i}_out", output.weight, True)]
    return pairs


CONVERTERS = (
    Converter(
        Classifier, "TorchClassifier",
        build_torch=lambda module, make, device, dtype: make(_build_torch(module.body, device),
                                                             _build_torch(module.head, device)),
        build_numpy=lambda module, rng, dtype: Classifier(_build_numpy(module.body, rng),
                                                          _build_numpy(module.head, rng)),
        children=lambda numpy_module, torch_module, where: [("body", numpy_module.body, torch_module.body),
                                                            ("head", numpy_module.head, torch_module.head)]),
    Converter(
        Sequential, "nn.Sequential",
        build_torch=lambda module, make, device, dtype: make(*[_build_torch(child, device) for child in module]),
        build_numpy=lambda module, rng, dtype: Sequential(*[_build_numpy(child, rng) for child in module]),
        children=_sequential_children),
    Converter(
        Linear, "nn.Linear",
        build_torch=lambda module, make, device, dtype: make(module.in_features, module.out_features,
                                                             bias="b" in module.params, device=device, dtype=dtype),
        build_numpy=lambda module, rng, dtype: Linear(module.in_features, module.out_features, rng=rng, dtype=dtype,
                                                      bias=module.bias is not None),
        pairs=lambda numpy_module, torch_module, where: [("w", torch_module.weight, True),
                                                         ("b", torch_module.bias, False)]),
    Converter(
        Conv2d, "nn.Conv2d",
        build_torch=lambda module, make, device, dtype: make(module.in_channels, module.out_channels,
                                                             module.kernel_size, stride=module.stride,
                                                             padding=module.pad, bias="b" in module.params,
                                                             device=device, dtype=dtype),
        build_numpy=_conv2d_from_torch,
        pairs=lambda numpy_module, torch_module, where: [("w", torch_module.weight, False),
                                                         ("b", torch_module.bias, False)]),
    _batch_norm(BatchNorm1d),
    _batch_norm(BatchNorm2d),
    Converter(ReLU, "nn.ReLU", build_torch=lambda module, make, device, dtype: make(),
              build_numpy=lambda module, rng, dtype: ReLU()),
    Converter(MaxPool2d, "nn.MaxPool2d",
              build_torch=lambda module, make, device, dtype: make(module.size, stride=module.stride),
              build_numpy=_max_pool_from_torch),
    Converter(Flatten, "nn.Flatten", build_torch=lambda module, make, device, dtype: make(),
              build_numpy=_flatten_from_torch),
    Converter(Dropout, "nn.Dropout", build_torch=lambda module, make, device, dtype: make(module.p),
              build_numpy=lambda module, rng, dtype: Dropout(module.p, rng=rng)),
    Converter(
        SoftmaxHead, "TorchSoftmaxHead",
        build_torch=lambda module, make, device, dtype: make(module.in_features, module.n_classes, device=device,
                                                             dtype=dtype, **_loss_options(module)),
        build_numpy=lambda module, rng, dtype: SoftmaxHead(module.in_features, module.n_classes, rng=rng,
                                                           dtype=dtype, **_torch_loss_options(module)),
        pairs=_linear_head_pairs),
    Converter(
        GumbelSoftmaxHead, "TorchGumbelSoftmaxHead",
        build_torch=lambda module, make, device, dtype: make(module.in_features, module.n_classes, tau=module.tau,
                                                             device=device, dtype=dtype, **_loss_options(module)),
        build_numpy=lambda module, rng, dtype: GumbelSoftmaxHead(
            module.in_features, module.n_classes, rng=rng, dtype=dtype, tau=module.tau, **_torch_loss_options(module)),
        pairs=_linear_head_pairs),
    Converter(
        SampledSoftmaxHead, "TorchSampledSoftmaxHead",
        build_torch=lambda module, make, device, dtype: make(module.in_features, module.n_classes,
                                                             class_weights=module.class_weights, device=device,
                                                             dtype=dtype, **_sampled_options(module)),
        build_numpy=lambda module, rng, dtype: SampledSoftmaxHead(
            module.in_features, module.n_classes, rng=rng, dtype=dtype,
            class_weights=_torch_loss_options(module)["class_weights"], **_sampled_options(module)),
        pairs=lambda numpy_module, torch_module, where: [("class_W", torch_module.class_W, False),
                                                         ("class_b", torch_module.class_b, False)]),
    Converter(
        HierarchicalSoftmaxHead, "TorchHierarchicalSoftmaxHead",
        build_torch=lambda module, make, device, dtype: make(module.tree, module.in_features, device=device,
                                                             dtype=dtype),
        build_numpy=lambda module, rng, dtype: HierarchicalSoftmaxHead(module.in_features, module.n_classes,
                                                                       rng=rng, dtype=dtype, tree=module.tree),
        pairs=lambda numpy_module, torch_module, where: [("node_W", torch_module.node_W, False),
                                                         ("node_b", torch_module.node_b, False)]),
    Converter(
        AdaptiveSoftmaxHead, "nn.AdaptiveLogSoftmaxWithLoss",
        build_torch=_adaptive_to_torch,
        build_numpy=lambda module, rng, dtype: AdaptiveSoftmaxHead(
            module.in_features, module.n_classes, rng=rng, dtype=dtype, cutoffs=list(module.cutoffs[:-1]),
            div_value=module.div_value, head_bias=module.head_bias),
        pairs=_adaptive_pairs),
)


def _converter_for_numpy(module):
    """The converter of ``module``'s class or of its nearest registered base class; None if none."""
    by_type = {converter.numpy_type: converter for converter in CONVERTERS}
    return next((by_type[kind] for kind in type(module).__mro__ if kind in by_type), None)


def _converter_for_torch(torch_module, twins):
    """The same, looked up by the torch class (so a Gumbel twin is never taken for a softmax one)."""
    by_type = {converter.torch_class(twins): converter for converter in CONVERTERS}
    return next((by_type[kind] for kind in type(torch_module).__mro__ if kind in by_type), None)


# ----------------------------------------------------------------------------------
# Walking the table: build a twin, build back, pair the arrays
# ----------------------------------------------------------------------------------

def _torch_dtype(torch, array):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[array.dtype]


def _build_torch(module, device):
    """An untrained torch module with ``module``'s configuration, dtype and training mode."""
    torch = require_torch()
    params = getattr(module, "params", {})
    dtype = _torch_dtype(torch, next(iter(params.values()))) if params else None
    converter = _converter_for_numpy(module)
    if converter is None:
        raise TypeError(f"module_or_model must be an npsoftmax layer, Sequential, head or Classifier, got "
                        f"{type(module).__name__}")
    built = converter.build_torch(module, converter.torch_class(_twins()), device, dtype)
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


def _build_numpy(module, rng):
    """An npsoftmax module with ``module``'s configuration and dtype (weights are overwritten later)."""
    dtype = _numpy_dtype(require_torch(), module)
    converter = _converter_for_torch(module, _twins())
    if converter is None:
        raise TypeError(f"torch_module must be one of the modules to_torch produces "
                        f"(nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, "
                        f"nn.Dropout, nn.Sequential, nn.AdaptiveLogSoftmaxWithLoss, Torch*Head, "
                        f"TorchClassifier), got {type(module).__name__}")
    built = converter.build_numpy(module, rng, dtype)
    return built.train() if module.training else built.eval()


def _pairs(numpy_module, torch_module, prefix=""):
    """Every array of ``numpy_module`` with its torch tensor.

    Returns a list of ``(kind, name, array, tensor, transposed)``: ``kind`` is
    ``"params"`` or ``"buffers"``, ``name`` the npsoftmax key (``"body.0.w"``),
    ``transposed`` whether torch stores the transpose. Raises TypeError when the two
    structures do not correspond.
    """
    where = prefix.rstrip(".") or "the top level"
    converter = _converter_for_numpy(numpy_module)
    if converter is None:
        raise TypeError(f"numpy_module at {where} must be an npsoftmax layer, Sequential, head or Classifier, "
                        f"got {type(numpy_module).__name__}")
    twins = _twins()
    if _converter_for_torch(torch_module, twins) is not converter:
        raise TypeError(f"torch_module at {where} must be a {converter.torch_class(twins).__name__} to pair with "
                        f"{type(numpy_module).__name__}, got {type(torch_module).__name__}")
    pairs = []
    for name, numpy_child, torch_child in converter.children(numpy_module, torch_module, where):
        pairs += _pairs(numpy_child, torch_child, f"{prefix}{name}.")
    for name, tensor, transposed in converter.pairs(numpy_module, torch_module, where):
        kind = "buffers" if name in numpy_module.buffers else "params"
        arrays = getattr(numpy_module, kind)
        if (name in arrays) != (tensor is not None):
            raise ValueError(f"{prefix}{name}: present in only one of the two modules "
                             f"(npsoftmax {name in arrays}, torch {tensor is not None}); is a bias missing?")
        if tensor is not None:
            pairs.append((kind, prefix + name, arrays[name], tensor, transposed))
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
        for _, name, array, tensor, transposed in _pairs(numpy_module, torch_module):
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
    require_torch()
    for _, name, array, tensor, transposed in _pairs(numpy_module, torch_module):
        _check_pair(name, array, tensor, transposed)
        np.copyto(array, _as_numpy(tensor, transposed))
    return numpy_module


def _collect(numpy_module, torch_module, kind, read):
    require_torch()
    return {name: read(array, tensor, transposed)
            for pair_kind, name, array, tensor, transposed in _pairs(numpy_module, torch_module)
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
    return copy_to_torch(module_or_model, _build_torch(module_or_model, device))


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
        into = _build_numpy(torch_module, rng)
    return copy_from_torch(torch_module, into)


def to_torch_optimizer(optimizer, torch_module, numpy_module=None):
    """A fresh ``torch.optim`` optimizer with the hyperparameters of an npsoftmax one.

    ``SGD(lr, momentum, nesterov, weight_decay)`` -> ``torch.optim.SGD`` (dampening 0) and
    ``Adam(lr, betas, eps, weight_decay)`` -> ``torch.optim.Adam``: npsoftmax implements
    exactly their update rules. It optimises all of ``torch_module.parameters()``, so
    the npsoftmax optimizer should cover all of the model's ``params``; only
    hyperparameters are copied, hence ``optimizer`` must not have stepped yet.

    An optimizer with ``lr_scales`` becomes one param group per distinct scale, each with
    ``lr = scale * lr`` and the scale kept as ``group["lr_scale"]`` (a schedule sets
    ``group["lr"] = group["lr_scale"] * lr``); naming the parameters needs ``numpy_module``,
    the npsoftmax twin of ``torch_module``.
    """
    torch = require_torch()
    if optimizer.step_count != 0:
        raise ValueError(f"optimizer has taken {optimizer.step_count} steps; its momentum/moment state "
                         "is not copied, so convert it before training")
    parameters = list(torch_module.parameters())
    if optimizer.lr_scales:
        if numpy_module is None:
            raise ValueError("optimizer has lr_scales: pass numpy_module (the npsoftmax twin of torch_module) "
                             "to name the parameters")
        groups = {}
        for kind, name, _, tensor, _ in _pairs(numpy_module, torch_module):
            if kind == "params":
                groups.setdefault(optimizer.lr_scales.get(name, 1.0), []).append(tensor)
        parameters = [{"params": tensors, "lr": optimizer.lr * scale, "lr_scale": scale}
                      for scale, tensors in groups.items()]
    if isinstance(optimizer, SGD):
        return torch.optim.SGD(parameters, lr=optimizer.lr, momentum=optimizer.momentum,
                               nesterov=optimizer.nesterov, weight_decay=optimizer.weight_decay)
    if isinstance(optimizer, Adam):
        return torch.optim.Adam(parameters, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                                weight_decay=optimizer.weight_decay)
    raise TypeError(f"optimizer must be an npsoftmax SGD or Adam, got {type(optimizer).__name__}")
