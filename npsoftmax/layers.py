"""Stateful modules over :mod:`npsoftmax.functional`.

Every module works the same way: ``forward(x)`` calls its functional forward
pass and keeps the cache; ``backward(dout)`` calls the matching backward pass
with that cache, writes the parameter gradients into ``grads`` and returns
``dx``.

Protocol shared by every module:

* ``params``: dict name -> the *live* parameter array. Optimizers update these
  arrays in place, and writing into ``params[name][...]`` changes the layer;
  never rebind an entry.
* ``grads``: dict with the same keys; its arrays are allocated once and
  overwritten in place by every ``backward``.
* ``buffers``: non-trainable state (batch norm's running statistics); empty
  for other modules.
* ``train()`` / ``eval()`` set the ``training`` flag and return the module.

Weights use He/Kaiming initialisation, ``N(0, 2 / fan_in)``, drawn from the
``numpy.random.Generator`` passed as ``rng`` (in float64, then cast, so the same
seed gives the same weights in float32 and float64); biases start at zero.
"""

import numbers
from typing import NamedTuple

import numpy as np

from . import functional as F
from . import kernels
from .validation import check_bool, check_dtype, check_generator, check_int

__all__ = [
    "Module",
    "Linear",
    "Conv2d",
    "MaxPool2d",
    "ReLU",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "Flatten",
    "Container",
    "Sequential",
]

def _kaiming_normal(rng, shape, fan_in, dtype):
    """He/Kaiming normal init: std sqrt(2 / fan_in) keeps activations' variance through ReLUs."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class Module:
    """Base class: ``params``/``grads``/``buffers`` dicts, the ``training`` flag and the cache."""

    def __init__(self, params=None, buffers=None):
        self.params = dict(params or {})
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.buffers = dict(buffers or {})
        self.training = True
        self._cache = None

    def train(self):
        """Switch to training mode; returns ``self``."""
        self.training = True
        return self

    def eval(self):
        """Switch to evaluation mode; returns ``self``."""
        self.training = False
        return self

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _take_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward was called before forward")
        return self._cache

    def _store_grads(self, **grads):
        for name, grad in grads.items():
            np.copyto(self.grads[name], grad)  # in place: the grads arrays stay the same objects

    def __repr__(self):
        return f"{type(self).__name__}()"


class Linear(Module):
    """Fully connected layer ``out = x @ w + b``.

    Shapes: x (N, in_features) -> out (N, out_features); params
    ``w (in_features, out_features)``, ``b (out_features,)`` (omitted when
    ``bias=False``). Inputs with more axes are flattened to (N, in_features).
    """

    def __init__(self, in_features, out_features, *, rng, dtype=np.float32, bias=True):
        self.in_features = check_int(in_features, "in_features")
        self.out_features = check_int(out_features, "out_features")
        dtype = check_dtype(dtype)
        params = {"w": _kaiming_normal(check_generator(rng), (in_features, out_features), in_features, dtype)}
        if bias:
            params["b"] = np.zeros(out_features, dtype=dtype)
        super().__init__(params)

    def forward(self, x):
        out, self._cache = F.affine_forward(x, self.params["w"], self.params.get("b"))
        return out

    def backward(self, dout):
        dx, dw, db = F.affine_backward(dout, self._take_cache())
        self._store_grads(w=dw, **({"b": db} if db is not None else {}))
        return dx

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={'b' in self.params})"


class Conv2d(Module):
    """2-D convolution (im2col + one GEMM, or Winograd's F(2x2, 3x3) for 3x3 kernels).

    Shapes: x (N, C, H, W) -> out (N, F, OH, OW) with
    ``OH = (H + 2*pad - KH) // stride + 1`` (likewise OW); params
    ``w (F, C, KH, KW)``, ``b (F,)`` (omitted when ``bias=False``), where
    ``C = in_channels``, ``F = out_channels`` and ``kernel_size`` is an int or
    a (KH, KW) pair.

    ``input_gradient=False`` makes ``backward`` skip dx and return None: the
    first layer of a network needs no gradient for the images, and computing it
    costs a GEMM and a col2im per step. The attribute can be changed later.

    ``algorithm`` ("auto", "im2col" or "winograd") is passed to ``functional.conv_forward``
    (see ``functional.conv_algorithm``); it can be changed between steps too.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, pad=0, rng, dtype=np.float32, bias=True,
                 input_gradient=True, algorithm="auto"):
        self.in_channels = check_int(in_channels, "in_channels")
        self.out_channels = check_int(out_channels, "out_channels")
        if isinstance(kernel_size, numbers.Integral):
            kernel_size = (kernel_size, kernel_size)
        if not isinstance(kernel_size, (tuple, list)) or len(kernel_size) != 2:
            raise TypeError(f"kernel_size must be an int or a (KH, KW) pair, got {kernel_size!r}")
        self.kernel_size = (
            check_int(kernel_size[0], "kernel_size[0]"),
            check_int(kernel_size[1], "kernel_size[1]"),
        )
        self.stride = check_int(stride, "stride")
        self.pad = check_int(pad, "pad", minimum=0)
        dtype = check_dtype(dtype)
        shape = (out_channels, in_channels, *self.kernel_size)
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        params = {"w": _kaiming_normal(check_generator(rng), shape, fan_in, dtype)}
        if bias:
            params["b"] = np.zeros(out_channels, dtype=dtype)
        super().__init__(params)
        check_bool(input_gradient, "input_gradient")
        self.input_gradient = bool(input_gradient)
        self.algorithm = algorithm
        F.conv_algorithm(shape, self.stride, algorithm)  # a bad choice fails here, not at the first step
        self._buffers = {}  # reusable scratch array kept for backward: "cols" (im2col) or "tiles" (Winograd)

    def _output_size(self, x):
        """(OH, OW) of this layer for input ``x``, or None when ``x`` is not a valid input (the
        functional layer then raises the precise error)."""
        w = self.params["w"]
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != w.dtype or x.shape[1] != self.in_channels:
            return None
        (KH, KW) = self.kernel_size
        OH = F.conv_output_size(x.shape[2], KH, self.stride, self.pad)
        OW = F.conv_output_size(x.shape[3], KW, self.stride, self.pad)
        return (OH, OW) if OH >= 1 and OW >= 1 else None

    def _cols_buffer(self, x, algorithm):
        """The buffer a training forward keeps for backward (``F.conv_buffer_shape``: im2col
        columns or Winograd tiles) for input ``x``, kept between steps and reallocated only
        when the shape, dtype or algorithm changes (a fresh allocation of tens of MiB
        page-faults every step). None when ``x`` is not a valid input."""
        if self._output_size(x) is None:
            return None
        shape = F.conv_buffer_shape(x.shape, self.params["w"].shape, self.stride, self.pad, algorithm)
        name = "tiles" if algorithm == "winograd" else "cols"
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype:
            self._buffers.clear()  # one buffer at a time
            if algorithm == "winograd":
                buffer = kernels.winograd_slabs(shape[1], shape[2], x.dtype)
            else:
                buffer = kernels.empty(shape, x.dtype)
            self._buffers[name] = buffer
        return buffer

    def forward(self, x):
        w, b = self.params["w"], self.params.get("b")
        algorithm = F.conv_algorithm(w.shape, self.stride, self.algorithm, output_size=self._output_size(x))
        if not self.training:
            # Inference keeps no columns (one chunk at a time), so evaluating a big batch
            # does not hold hundreds of MiB; a backward in eval mode recomputes them.
            out, self._cache = F.conv_forward(x, w, b, self.stride, self.pad, keep_cols=False, algorithm=algorithm)
            return out
        # Reusing the buffer is safe: the only cache that refers to it is this
        # layer's latest one, and this forward replaces it.
        out, self._cache = F.conv_forward(x, w, b, self.stride, self.pad, cols_out=self._cols_buffer(x, algorithm),
                                          algorithm=algorithm)
        return out

    def backward(self, dout):
        dx, dw, db = F.conv_backward(dout, self._take_cache(), input_gradient=self.input_gradient)
        self._store_grads(w=dw, **({"b": db} if db is not None else {}))
        return dx

    def __repr__(self):
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, pad={self.pad}, bias={'b' in self.params}"
            + (f", algorithm={self.algorithm!r})" if self.algorithm != "auto" else ")")
        )


class MaxPool2d(Module):
    """Max pooling over ``size x size`` windows moved by ``stride`` (default: ``size``).

    Shapes: x (N, C, H, W) -> out (N, C, OH, OW), ``OH = (H - size) // stride + 1``.
    No parameters.
    """

    def __init__(self, size=2, stride=None):
        self.size = check_int(size, "size")
        self.stride = self.size if stride is None else check_int(stride, "stride")
        super().__init__()

    def forward(self, x):
        out, self._cache = F.max_pool_forward(x, self.size, self.stride)
        return out

    def backward(self, dout):
        cache = self._take_cache()
        if cache is _POOLED_BY_BATCH_NORM:
            # The BatchNorm2d before this pool ran both (Sequential's fused pair): it takes the
            # pooled gradient itself (see BatchNorm2d.forward).
            return PooledGradient(dout)
        return F.max_pool_backward(dout, cache)

    def tiles(self, x_shape):
        """True when this pool's windows tile an (N, C, H, W) input, so that the batch norm
        before it can pool in the same pass (``functional.pool_tiles``)."""
        return F.pool_tiles(x_shape, self.size, self.stride)

    def __repr__(self):
        return f"MaxPool2d(size={self.size}, stride={self.stride})"


class ReLU(Module):
    """Elementwise ``max(x, 0)``. Shapes: any -> same. No parameters."""

    def forward(self, x):
        out, self._cache = F.relu_forward(x)
        return out

    def backward(self, dout):
        return F.relu_backward(dout, self._take_cache())


class _BatchNorm(Module):
    """Shared state of the batch-norm modules: gamma/beta params, running buffers."""

    _forward = None
    _backward = None

    def __init__(self, num_features, *, momentum=0.1, eps=1e-5, dtype=np.float32):
        self.num_features = check_int(num_features, "num_features")
        if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        if not isinstance(eps, numbers.Real) or not eps > 0.0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        dtype = check_dtype(dtype)
        super().__init__(
            params={"gamma": np.ones(num_features, dtype=dtype), "beta": np.zeros(num_features, dtype=dtype)},
            buffers={
                "running_mean": np.zeros(num_features, dtype=dtype),
                "running_var": np.ones(num_features, dtype=dtype),
            },
        )

    def forward(self, x):
        # In training mode the functional pass updates the running buffers in place.
        out, self._cache = type(self)._forward(
            x,
            self.params["gamma"],
            self.params["beta"],
            self.buffers["running_mean"],
            self.buffers["running_var"],
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )
        return out

    def backward(self, dout):
        dx, dgamma, dbeta = type(self)._backward(dout, self._take_cache())
        self._store_grads(gamma=dgamma, beta=dbeta)
        return dx

    def __repr__(self):
        return f"{type(self).__name__}({self.num_features}, momentum={self.momentum}, eps={self.eps})"


class BatchNorm1d(_BatchNorm):
    """Batch norm over the batch axis (PyTorch semantics, see ``functional.batchnorm_forward``).

    Shapes: x (N, D) -> out (N, D), ``D = num_features``; params
    ``gamma (D,)``, ``beta (D,)``; buffers ``running_mean (D,)``, ``running_var (D,)``.
    Training uses batch statistics and updates the buffers in place; eval uses the buffers.
    """

    _forward = staticmethod(F.batchnorm_forward)
    _backward = staticmethod(F.batchnorm_backward)


class BatchNorm2d(_BatchNorm):
    """Per-channel batch norm of images, statistics over (N, H, W) (PyTorch semantics).

    Shapes: x (N, C, H, W) -> out (N, C, H, W), ``C = num_features``; params
    ``gamma (C,)``, ``beta (C,)``; buffers ``running_mean (C,)``, ``running_var (C,)``.
    Training uses batch statistics and updates the buffers in place; eval uses the buffers.

    ``forward(x, pool=p)`` with the ``MaxPool2d`` that follows (its windows tiling x) returns
    the *pooled* output (N, C, H/size, W/size) and runs both layers in one pass
    (``functional.spatial_batchnorm_max_pool_forward``: the same numbers, without the
    full-size normalised image); ``p.backward`` then hands the pooled gradient back
    unchanged (a ``PooledGradient``) and this layer's ``backward`` does both backward passes.
    ``Sequential`` does this for every such pair.
    """

    _forward = staticmethod(F.spatial_batchnorm_forward)
    _backward = staticmethod(F.spatial_batchnorm_backward)

    def forward(self, x, pool=None):
        if pool is None:
            return super().forward(x)
        if not isinstance(pool, MaxPool2d) or not pool.tiles(np.shape(x)):
            raise ValueError(f"pool must be a MaxPool2d whose windows tile x (shape {np.shape(x)}), got {pool!r}")
        out, self._cache = F.spatial_batchnorm_max_pool_forward(
            x, self.params["gamma"], self.params["beta"], self.buffers["running_mean"],
            self.buffers["running_var"], pool.size, training=self.training, momentum=self.momentum, eps=self.eps)
        pool._cache = _POOLED_BY_BATCH_NORM
        return out

    def backward(self, dout):
        cache = self._take_cache()
        if not isinstance(cache, F.BatchNormMaxPoolCache):
            return super().backward(dout)
        if not isinstance(dout, PooledGradient):
            raise TypeError("BatchNorm2d.backward after forward(x, pool=...) takes what that pool's backward "
                            f"returned (a PooledGradient), got {type(dout).__name__}")
        dx, dgamma, dbeta = F.spatial_batchnorm_max_pool_backward(dout.dout, cache)
        self._store_grads(gamma=dgamma, beta=dbeta)
        return dx


#: A MaxPool2d's cache when the BatchNorm2d before it pooled in its own forward pass.
_POOLED_BY_BATCH_NORM = "pooled by the batch norm before it"


class PooledGradient(NamedTuple):
    """What a ``MaxPool2d`` fused into the ``BatchNorm2d`` before it returns from ``backward``:
    the gradient of the pooled output, for that batch norm's ``backward``."""
    dout: np.ndarray  # (N, C, OH, OW)


class Dropout(Module):
    """Inverted dropout with drop probability ``p``; identity in eval mode.

    Shapes: any -> same. No parameters. The mask is drawn from ``self.rng``
    (a ``numpy.random.Generator``) at every training-mode forward.
    """

    def __init__(self, p, *, rng):
        self.p = F._check_dropout_probability(p)
        self.rng = check_generator(rng)
        super().__init__()

    def forward(self, x):
        out, self._cache = F.dropout_forward(x, self.p, self.training, self.rng)
        return out

    def backward(self, dout):
        return F.dropout_backward(dout, self._take_cache())

    def __repr__(self):
        return f"Dropout(p={self.p})"


class Flatten(Module):
    """Flatten all but the batch axis. Shapes: (N, d_1, ..., d_k) -> (N, d_1*...*d_k)."""

    def forward(self, x):
        out, self._cache = F.flatten_forward(x)
        return out

    def backward(self, dout):
        return F.flatten_backward(dout, self._take_cache())


class Container(Module):
    """A module made of named child modules; its state is theirs, under ``"{child}.{name}"`` keys.

    A subclass defines :meth:`named_children` (``[(prefix, module), ...]``) and its own
    ``forward``/``backward``; ``params``, ``grads`` and ``buffers`` are collected from the
    children's live dicts, and ``train()``/``eval()`` reach every child. ``Sequential``
    (prefixes "0", "1", ...) and ``models.Classifier`` ("body", "head") are the two containers.
    """

    def __init__(self):
        self.training = True
        self._cache = None

    def named_children(self):
        raise NotImplementedError

    def _collect(self, attribute):
        return {
            f"{prefix}.{name}": value
            for prefix, module in self.named_children()
            for name, value in getattr(module, attribute, {}).items()
        }

    @property
    def params(self):
        return self._collect("params")

    @property
    def grads(self):
        return self._collect("grads")

    @property
    def buffers(self):
        return self._collect("buffers")

    def train(self):
        for _, module in self.named_children():
            module.train()
        self.training = True
        return self

    def eval(self):
        for _, module in self.named_children():
            module.eval()
        self.training = False
        return self


class Sequential(Container):
    """Modules applied in order; backward runs them in reverse.

    Shapes: whatever the chain maps; the input of module i+1 is the output of
    module i. ``params``, ``grads`` and ``buffers`` collect the children's
    current dicts under ``"{index}.{name}"`` keys (e.g. ``"0.w"``, ``"1.gamma"``);
    the arrays are the children's live arrays.
    """

    def __init__(self, *modules):
        super().__init__()
        for index, module in enumerate(modules):
            for attribute in ("forward", "backward", "params", "grads", "train", "eval"):
                if not hasattr(module, attribute):
                    raise TypeError(
                        f"modules[{index}] ({type(module).__name__}) has no {attribute!r}: not a module"
                    )
        self.modules = list(modules)

    def named_children(self):
        return [(str(index), module) for index, module in enumerate(self.modules)]

    #: Run every BatchNorm2d followed by a MaxPool2d whose windows tile its input as one fused
    #: pass (``BatchNorm2d.forward(x, pool=...)``): the same numbers, less memory traffic.
    #: Set False (on the class or one instance) to run every module by itself.
    fuse_batchnorm_max_pool = True

    def fuses_batchnorm_max_pool(self, index):
        """True when ``forward`` runs module ``index`` (a BatchNorm2d) together with the MaxPool2d
        after it, for every input whose size that pool's windows tile (``MaxPool2d.tiles``)."""
        modules = self.modules
        return (self.fuse_batchnorm_max_pool and index + 1 < len(modules) and type(modules[index]) is BatchNorm2d
                and type(modules[index + 1]) is MaxPool2d and modules[index + 1].size == modules[index + 1].stride)

    def forward(self, x):
        modules = self.modules
        index = 0
        while index < len(modules):
            module = modules[index]
            if self.fuses_batchnorm_max_pool(index) and np.ndim(x) == 4 and modules[index + 1].tiles(np.shape(x)):
                x = module.forward(x, pool=modules[index + 1])  # the pool's backward hands its gradient on
                index += 2
            else:
                x = module.forward(x)
                index += 1
        return x

    def backward(self, dout):
        for module in reversed(self.modules):
            dout = module.backward(dout)
        return dout

    def __len__(self):
        return len(self.modules)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.modules[index])
        return self.modules[index]

    def __iter__(self):
        return iter(self.modules)

    def __repr__(self):
        inner = "".join(f"\n  ({index}): {module!r}" for index, module in enumerate(self.modules))
        return f"Sequential({inner}\n)"
