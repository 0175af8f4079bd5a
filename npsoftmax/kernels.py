"""The compiled kernels of a training step, one dispatch point between Cython and NumPy:
im2col / col2im, the Winograd F(2x2, 3x3) tile transforms (the algorithm: ``winograd.py``),
max pooling with argmax, ReLU backward, batch-norm statistics and normalisation, the layout
swap around the conv GEMM, and the hierarchical head's tree paths and row-sparse products.

A convolution slides a (C, KH, KW) filter over a zero-padded image. ``im2col``
copies every receptive field into one column, so that the whole convolution
becomes a single matrix product::

    x (N, C, H, W)  --im2col-->  cols (C*KH*KW, N*OH*OW)
    out = w.reshape(F, C*KH*KW) @ cols            # (F, N*OH*OW)

Row ``(c*KH + i)*KW + j`` of ``cols`` holds input channel ``c`` at kernel offset
``(i, j)``; column ``(n*OH + oh)*OW + ow`` is output pixel ``(oh, ow)`` of image
``n`` (the batch index is the slowest, so each image owns a contiguous block of
columns and the Cython kernel can give one image to each thread).

``col2im`` is the adjoint (transpose) of ``im2col``: it *adds* every column back
into the pixels it was copied from. Overlapping windows therefore accumulate,
which is exactly the chain rule for a pixel that feeds several outputs.

The same module dispatches the other loops of a training step that NumPy does
slowly (max pooling with argmax, ReLU backward, batch-norm statistics and
normalisation, the layout swap around the conv GEMM); each has a NumPy
reference here that states the math.

The compiled kernels live in ``_im2col.pyx``; if the extension was not built,
the NumPy reference below is used and a warning is printed once.

Threads: the kernels use OpenMP (``prange``), the GEMMs use OpenBLAS's own
threads, and a training step alternates between them a few hundred times. By
default an idle OpenMP thread *spins* for a while before sleeping, taking a core
away from the OpenBLAS threads that run next (on a 2-core machine, half the
machine). So unless ``OMP_WAIT_POLICY`` is already set, it is set to ``PASSIVE``
before the extension loads OpenMP: idle OpenMP threads sleep at once. (It cannot
take effect if another library has already started the same OpenMP runtime.)
"""

import math
import os
import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .validation import FLOAT_DTYPES, check_int, check_slabs

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when the OpenMP runtime starts

try:
    from . import _im2col as _extension
except ImportError:  # pragma: no cover - exercised only on an unbuilt checkout
    _extension = None
    warnings.warn(
        "npsoftmax: the Cython extension npsoftmax._im2col is not built; using the "
        "pure-NumPy im2col/col2im fallback (correct but slower). Build it with "
        "`pip install -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

#: True when the compiled Cython kernels are available.
HAVE_EXTENSION = _extension is not None
#: Name of the backend that :func:`im2col` and :func:`col2im` dispatch to.
BACKEND = "cython" if HAVE_EXTENSION else "numpy"

def conv_output_size(size, kernel_size, stride, pad):
    """Number of window positions along one axis: ``(size + 2*pad - kernel) // stride + 1``.

    Like PyTorch, a stride that does not tile the padded input exactly drops the
    last partial window (floor division).
    """
    return (size + 2 * pad - kernel_size) // stride + 1


def check_window_arguments(x_shape, kernel_height, kernel_width, stride, pad):
    """Validate a sliding-window geometry and return ``(OH, OW)``.

    Parameters
    ----------
    x_shape : tuple (N, C, H, W)
    kernel_height, kernel_width : int >= 1
    stride : int >= 1
    pad : int >= 0

    Raises ``ValueError`` naming the argument when the input is not 4-D, the
    stride is not positive, or the kernel is larger than the padded input.
    """
    if len(x_shape) != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    kernel_height = check_int(kernel_height, "kernel_height")
    kernel_width = check_int(kernel_width, "kernel_width")
    stride = check_int(stride, "stride")
    pad = check_int(pad, "pad", minimum=0)
    _, _, height, width = x_shape
    padded = (height + 2 * pad, width + 2 * pad)
    if kernel_height > padded[0] or kernel_width > padded[1]:
        raise ValueError(
            f"kernel ({kernel_height}, {kernel_width}) is larger than the padded input "
            f"{padded} (x shape {tuple(x_shape)}, pad={pad})"
        )
    return (
        conv_output_size(height, kernel_height, stride, pad),
        conv_output_size(width, kernel_width, stride, pad),
    )


#: Arrays of at least this many bytes made by :func:`empty` start on a page boundary.
ALIGN_MIN_BYTES = 1 << 20
_PAGE_BYTES = 4096


def empty(shape, dtype):
    """``np.empty(shape, dtype)``, except that an array of ``ALIGN_MIN_BYTES`` or more starts
    on a 4096-byte page boundary.

    Why: ``malloc`` starts every large block 16 bytes past a page boundary, so two arrays
    of one size allocated one after the other are ``size + 16`` bytes apart. When a
    streaming kernel (``out[i] = f(x[i])``) writes an output that lies 16 to ~100 bytes
    *ahead* of its input modulo 1 MiB, this CPU stalls: the batch-norm normalisation of a
    (128, 32, 32, 32) float32 batch took 12.9 ms instead of 2.6 with the output 16 MiB + 16
    bytes after the input, 6.8 ms at + 32, 4.2 at + 64, 2.6 at + 0 or with the output
    behind the input (measured; the same happened inside the model, where the conv output
    and the next layer's output were allocated that way). Every large output the kernels
    and the conv layer write comes from here: page-aligned outputs are 0 bytes apart from
    each other modulo a page, and 16 bytes *behind* NumPy's own arrays.
    Returns a C-contiguous writable array (a view of a slightly larger byte buffer).
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < ALIGN_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    raw = np.empty(nbytes + _PAGE_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % _PAGE_BYTES
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _check_float_array(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {array.dtype}")


# ----------------------------------------------------------------------------
# NumPy reference implementations (also the fallback when the extension is missing)
# ----------------------------------------------------------------------------
def im2col_numpy(x, kernel_height, kernel_width, stride=1, pad=0):
    """NumPy reference im2col.

    x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), same dtype as ``x``.
    """
    N, C, _, _ = x.shape
    OH, OW = check_window_arguments(x.shape, kernel_height, kernel_width, stride, pad)
    x_padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # windows[n, c, oh, ow, i, j] = x_padded[n, c, oh*stride + i, ow*stride + j]
    windows = sliding_window_view(x_padded, (kernel_height, kernel_width), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride][:, :, :OH, :OW]
    # rows (c, i, j), columns (n, oh, ow)
    return windows.transpose(1, 4, 5, 0, 2, 3).reshape(C * kernel_height * kernel_width, N * OH * OW)


def col2im_numpy(cols, x_shape, kernel_height, kernel_width, stride=1, pad=0):
    """NumPy reference col2im, the adjoint of :func:`im2col_numpy`.

    cols (C*KH*KW, N*OH*OW) -> x (N, C, H, W): each column entry is *added* to
    the pixel it was copied from.
    """
    N, C, H, W = x_shape
    OH, OW = check_window_arguments(x_shape, kernel_height, kernel_width, stride, pad)
    cols6 = cols.reshape(C, kernel_height, kernel_width, N, OH, OW)
    x_padded = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=cols.dtype)
    # One strided add per kernel offset: KH*KW vectorised adds instead of a loop per pixel.
    for i in range(kernel_height):
        for j in range(kernel_width):
            x_padded[:, :, i : i + stride * OH : stride, j : j + stride * OW : stride] += (
                cols6[:, i, j].transpose(1, 0, 2, 3)
            )
    return x_padded[:, :, pad : pad + H, pad : pad + W].copy() if pad else x_padded


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------
def im2col(x, kernel_height, kernel_width, stride=1, pad=0, out=None):
    """Unfold sliding windows into columns.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    kernel_height, kernel_width : int
        Window size (may differ: non-square kernels are supported).
    stride : int
    pad : int
        Zero padding added on every side.
    out : ndarray (C*KH*KW, N*OH*OW), optional
        Buffer of the same dtype to write into and return; each row must be
        contiguous (a column block ``buffer[:, a:b]`` of a bigger C-contiguous
        array is fine: the conv layer fills its columns one chunk of images at
        a time). Reusing one buffer every step avoids page-faulting tens of MiB
        afresh, which costs about as much as the copy itself.

    Returns
    -------
    cols : ndarray (C*KH*KW, N*OH*OW), dtype of ``x``
    """
    _check_float_array("x", x)
    N, C, _, _ = x.shape if x.ndim == 4 else (0,) * 4
    OH, OW = check_window_arguments(x.shape, kernel_height, kernel_width, stride, pad)
    if out is not None:
        expected = (C * kernel_height * kernel_width, N * OH * OW)
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype != x.dtype:
            raise ValueError(
                f"out must be an ndarray of shape {expected} and dtype {x.dtype}, got "
                f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}"
            )
        if out.strides[1] != out.itemsize and out.shape[1] > 1:
            raise ValueError(f"out must have contiguous rows (strides[1] == {out.itemsize}), got strides {out.strides}")
    if _extension is None:
        cols = im2col_numpy(x, kernel_height, kernel_width, stride, pad)
        if out is None:
            return cols
        out[...] = cols
        return out
    # The kernel indexes a C-contiguous buffer; this is a no-op for the usual case.
    return _extension.im2col(np.ascontiguousarray(x), kernel_height, kernel_width, stride, pad, out)


def col2im(cols, x_shape, kernel_height, kernel_width, stride=1, pad=0, out=None):
    """Fold columns back into an image, summing overlaps (adjoint of :func:`im2col`).

    Parameters
    ----------
    cols : ndarray (C*KH*KW, N*OH*OW), float32 or float64
    x_shape : tuple (N, C, H, W)
        Shape of the image that ``im2col`` unfolded.
    out : ndarray (N, C, H, W), optional
        C-contiguous array of the dtype of ``cols`` to overwrite and return.

    Returns
    -------
    x : ndarray (N, C, H, W), dtype of ``cols``
    """
    _check_float_array("cols", cols)
    OH, OW = check_window_arguments(tuple(x_shape), kernel_height, kernel_width, stride, pad)
    N, C, H, W = (int(size) for size in x_shape)
    expected = (C * kernel_height * kernel_width, N * OH * OW)
    if cols.shape != expected:
        raise ValueError(
            f"cols must have shape (C*KH*KW, N*OH*OW) = {expected} for x_shape "
            f"{tuple(x_shape)}, got {cols.shape}"
        )
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != (N, C, H, W)
                            or out.dtype != cols.dtype or not out.flags.c_contiguous):
        raise ValueError(
            f"out must be a C-contiguous {cols.dtype} array of shape {(N, C, H, W)}, got "
            f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}"
        )
    if _extension is None:
        x = col2im_numpy(cols, x_shape, kernel_height, kernel_width, stride, pad)
        if out is None:
            return x
        out[...] = x
        return out
    if cols.shape[1] > 1 and cols.strides[1] != cols.itemsize:
        cols = np.ascontiguousarray(cols)  # the kernel reads rows as contiguous runs
    return _extension.col2im(cols, N, C, H, W, kernel_height, kernel_width, stride, pad, out)


# ----------------------------------------------------------------------------
# The other compiled loops of a training step: max pooling, ReLU, batch norm,
# and the axis swap around the conv GEMM.
# Same pattern: a NumPy reference that states the math, and a dispatch that
# runs the Cython kernel when it is built. Callers (functional.py) validate
# arguments; these functions only check what the kernels rely on.
# ----------------------------------------------------------------------------
def _planes(array):
    """View a C-contiguous (N, C, H, W) array as (N*C, H, W) planes (copies only if not contiguous)."""
    array = np.ascontiguousarray(array)
    return array.reshape(-1, *array.shape[2:])


def max_pool_tiled_forward_numpy(x, size):
    """NumPy reference for windows that tile the input (stride == size, H and W multiples of size).

    x (N, C, H, W) -> out (N, C, H/size, W/size), argmax (N, C, H/size, W/size)
    int32, the index ``i*size + j`` of each window's first maximum.
    """
    N, C, H, W = x.shape
    OH, OW = H // size, W // size
    # windows[n, c, oh, ow, i*size + j] = x[n, c, oh*size + i, ow*size + j]: a reshape, no copy into columns.
    windows = x.reshape(N, C, OH, size, OW, size).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, OH, OW, size * size)
    argmax = windows.argmax(axis=-1)  # the first maximum, the element PyTorch picks
    out = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return out, argmax.astype(np.int32)


def max_pool_tiled_backward_numpy(dout, argmax, size):
    """NumPy reference: dout, argmax (N, C, OH, OW) -> dx (N, C, OH*size, OW*size), each
    window's gradient at its argmax and 0 elsewhere."""
    N, C, OH, OW = dout.shape
    dwindows = np.zeros((N, C, OH, OW, size * size), dtype=dout.dtype)
    np.put_along_axis(dwindows, argmax[..., None].astype(np.intp), dout[..., None], axis=-1)
    return dwindows.reshape(N, C, OH, OW, size, size).transpose(0, 1, 2, 4, 3, 5).reshape(N, C, OH * size, OW * size)


def max_pool_tiled_forward(x, size):
    """Max pool with ``stride == size`` windows that tile ``x`` exactly.

    x (N, C, H, W) float32/float64, H and W multiples of ``size`` ->
    ``(out (N, C, H/size, W/size), argmax (N, C, H/size, W/size) int32)``;
    ``argmax`` holds ``i*size + j``, the first maximum's offset in its window.
    """
    _check_float_array("x", x)
    N, C, H, W = x.shape
    if H % size or W % size:
        raise ValueError(f"size={size} does not tile the spatial size {(H, W)} of x shape {x.shape}")
    if _extension is None:
        return max_pool_tiled_forward_numpy(x, size)
    out = empty((N, C, H // size, W // size), x.dtype)
    argmax = empty(out.shape, np.int32)
    _extension.max_pool_tiled_forward(_planes(x), size, _planes(out), _planes(argmax))
    return out, argmax


def max_pool_tiled_backward(dout, argmax, size):
    """Route each window's gradient to its argmax (windows that tile the input).

    dout (N, C, OH, OW), argmax (N, C, OH, OW) int32 from :func:`max_pool_tiled_forward`
    -> dx (N, C, OH*size, OW*size), dtype of ``dout``.
    """
    _check_float_array("dout", dout)
    if argmax.shape != dout.shape:
        raise ValueError(f"argmax must have dout's shape {dout.shape}, got {argmax.shape}")
    if _extension is None:
        return max_pool_tiled_backward_numpy(dout, argmax, size)
    N, C, OH, OW = dout.shape
    dx = empty((N, C, OH * size, OW * size), dout.dtype)  # every element is written once
    _extension.max_pool_tiled_backward(_planes(dout), _planes(argmax.astype(np.int32, copy=False)), size,
                                       _planes(dx))
    return dx


def relu_backward(dout, x):
    """``dx = dout where x > 0 else 0`` for arrays of one shape and dtype (any shape)."""
    if _extension is None or dout.dtype != x.dtype or dout.dtype not in FLOAT_DTYPES:
        return np.where(x > 0, dout, 0).astype(dout.dtype, copy=False)
    dx = empty(x.shape, x.dtype)
    _extension.relu_backward(np.ascontiguousarray(dout).reshape(-1), np.ascontiguousarray(x).reshape(-1),
                             dx.reshape(-1))
    return dx


def _channels(array):
    """View a contiguous (N, C, H, W) (or (N, C, L)) array as (N, C, L)."""
    array = np.ascontiguousarray(array)
    return array.reshape(array.shape[0], array.shape[1], -1)


def batchnorm_statistics_numpy(x):
    """NumPy reference: x (N, C, ...) -> (mean (C,), biased var (C,)) over every axis but 1."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes)
    return mean, x.var(axis=axes)


def batchnorm_statistics(x):
    """Per-channel batch mean and biased variance of x (N, C, H, W): two (C,) arrays, dtype of x.

    The compiled kernel accumulates in double (one channel per thread), the
    reference in the array's dtype with NumPy's pairwise sums.
    """
    _check_float_array("x", x)
    if _extension is None:
        return batchnorm_statistics_numpy(x)
    mean = np.empty(x.shape[1], dtype=x.dtype)
    var = np.empty(x.shape[1], dtype=x.dtype)
    _extension.batchnorm_statistics(_channels(x), mean, var)
    return mean, var


def _per_channel(vector, ndim):
    """(C,) -> shape (C, 1, ..., 1) that broadcasts against (N, C, ...) with ``ndim`` axes."""
    return vector.reshape((-1,) + (1,) * (ndim - 2))


def batchnorm_normalize_numpy(x, mean, inv_std, gamma, beta):
    """NumPy reference: ``out = gamma * (x - mean) * inv_std + beta`` per channel.

    x (N, C, ...), the others (C,) -> out shaped like x.
    """
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(inv_std, x.ndim)
    return _per_channel(gamma, x.ndim) * xhat + _per_channel(beta, x.ndim)


def batchnorm_normalize(x, mean, inv_std, gamma, beta):
    """x (N, C, H, W), the others (C,) of x's dtype -> out (N, C, H, W) (see the reference)."""
    _check_float_array("x", x)
    if _extension is None:
        return batchnorm_normalize_numpy(x, mean, inv_std, gamma, beta)
    out = empty(x.shape, x.dtype)
    _extension.batchnorm_normalize(_channels(x), mean, inv_std, gamma, beta, _channels(out))
    return out


def batchnorm_backward_numpy(dout, x, mean, inv_std, gamma, training):
    """NumPy reference of the per-channel batch-norm backward (see ``functional.batchnorm_backward``).

    dout, x (N, C, ...) and the forward's mean, inv_std, and gamma (C,) ->
    (dx like dout, dgamma (C,), dbeta (C,)).
    """
    axes = (0,) + tuple(range(2, dout.ndim))
    count = dout.size // dout.shape[1]
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(inv_std, x.ndim)
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * xhat).sum(axis=axes)
    scale = _per_channel(gamma * inv_std, dout.ndim)
    if not training:
        return dout * scale, dgamma, dbeta
    mean_dout = _per_channel(dbeta / count, dout.ndim)
    mean_dout_xhat = _per_channel(dgamma / count, dout.ndim)
    return scale * (dout - mean_dout - xhat * mean_dout_xhat), dgamma, dbeta


def batchnorm_backward(dout, x, mean, inv_std, gamma, training):
    """Per-channel batch-norm backward from the forward's input ``x`` and statistics.

    dout, x (N, C, H, W); mean, inv_std, gamma (C,) -> (dx (N, C, H, W), dgamma (C,),
    dbeta (C,)), dtype of dout. ``xhat = (x - mean) * inv_std`` is recomputed, not stored.
    """
    _check_float_array("dout", dout)
    if _extension is None:
        return batchnorm_backward_numpy(dout, x, mean, inv_std, gamma, training)
    C = dout.shape[1]
    dx = empty(dout.shape, dout.dtype)
    dgamma = np.empty(C, dtype=dout.dtype)
    dbeta = np.empty(C, dtype=dout.dtype)
    _extension.batchnorm_backward(_channels(dout), _channels(x), mean, inv_std, gamma, bool(training),
                                  _channels(dx), dgamma, dbeta)
    return dx, dgamma, dbeta


def batchnorm_max_pool_forward_numpy(x, mean, inv_std, gamma, beta, size):
    return max_pool_tiled_forward_numpy(batchnorm_normalize_numpy(x, mean, inv_std, gamma, beta), size)


def batchnorm_max_pool_forward(x, mean, inv_std, gamma, beta, size):
    """Batch-norm normalisation followed by a max pool over ``size x size`` windows that tile x.

    x (N, C, H, W), H and W multiples of ``size``; mean, inv_std, gamma, beta (C,) of x's dtype
    -> ``(out, argmax)``, both (N, C, H/size, W/size): exactly
    ``max_pool_tiled_forward(batchnorm_normalize(x, ...), size)``, without writing the
    normalised image (the compiled kernel normalises each band of ``size`` rows into a buffer
    and pools it).
    """
    _check_float_array("x", x)
    N, C, H, W = x.shape
    if H % size or W % size:
        raise ValueError(f"size={size} must divide the spatial size {(H, W)} of x shape {x.shape}")
    if _extension is None:
        return batchnorm_max_pool_forward_numpy(x, mean, inv_std, gamma, beta, size)
    out = empty((N, C, H // size, W // size), x.dtype)
    argmax = empty(out.shape, np.int32)
    if _extension.batchnorm_max_pool_forward(_channels(x), mean, inv_std, gamma, beta, size, W, _channels(out),
                                             _channels(argmax)):
        raise MemoryError("batchnorm_max_pool_forward: no memory for a thread's row buffer")
    return out, argmax


def batchnorm_max_pool_backward_numpy(dout, argmax, x, mean, inv_std, gamma, training, size):
    dy = max_pool_tiled_backward_numpy(dout, argmax, size)
    return batchnorm_backward_numpy(dy, x, mean, inv_std, gamma, training)


def batchnorm_max_pool_backward(dout, argmax, x, mean, inv_std, gamma, training, size):
    """The backward of :func:`batchnorm_max_pool_forward`: the pooled gradient ``dout`` and the
    ``argmax`` (N, C, OH, OW), the forward's input ``x`` (N, C, H, W) and statistics -> ``(dx
    (N, C, H, W), dgamma (C,), dbeta (C,))``, i.e. ``batchnorm_backward(max_pool_tiled_backward(
    dout, argmax, size), x, ...)`` without the full-size, mostly-zero pool gradient.
    """
    _check_float_array("dout", dout)
    if _extension is None:
        return batchnorm_max_pool_backward_numpy(dout, argmax, x, mean, inv_std, gamma, training, size)
    N, C, H, W = x.shape
    dx = empty(x.shape, x.dtype)
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    _extension.batchnorm_max_pool_backward(_channels(dout), _channels(argmax.astype(np.int32, copy=False)),
                                           _channels(x), mean, inv_std, gamma, bool(training), size, W,
                                           _channels(dx), dgamma, dbeta)
    return dx, dgamma, dbeta


def swap_leading_axes(source, destination, bias=None):
    """Write ``source (A, B, L)`` into ``destination (B, A, L)`` with the first two axes swapped,
    adding ``bias[a]`` (shape (A,)) to every ``source[a]`` when given.

    The conv layer uses it to turn GEMM rows (F, N, OH*OW) into NCHW (N, F, OH*OW)
    and back. Returns ``destination`` (C-contiguous, same dtype as ``source``).
    """
    _check_float_array("source", source)
    A, B, L = source.shape
    if destination.shape != (B, A, L) or destination.dtype != source.dtype or not destination.flags.c_contiguous:
        raise ValueError(
            f"destination must be a C-contiguous {source.dtype} array of shape {(B, A, L)}, got "
            f"{destination.shape} {destination.dtype}"
        )
    if bias is not None and (bias.shape != (A,) or bias.dtype != source.dtype):
        raise ValueError(f"bias must be a {source.dtype} array of shape ({A},), got {bias.shape} {bias.dtype}")
    if _extension is None:
        np.copyto(destination, source.transpose(1, 0, 2))
        if bias is not None:
            destination += bias[None, :, None]
        return destination
    _extension.swap_leading_axes(np.ascontiguousarray(source), destination,
                                 None if bias is None else np.ascontiguousarray(bias))
    return destination


# ----------------------------------------------------------------------------
# Winograd F(2x2, 3x3) tile transforms (the algorithm and its math: winograd.py)
# ----------------------------------------------------------------------------
#: B^T: the input tile transform, V = B^T d B for a 4x4 input tile d.
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
#: A^T: the output tile transform, y = A^T m A gives a 2x2 output block from a 4x4 product m.
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)


def winograd_tiles(height, width, pad):
    """(TH, TW): rows and columns of 2x2 output tiles of a 3x3, stride-1 convolution with ``pad``
    (the last tile of an odd-sized output is half used)."""
    return -(-(height + 2 * pad - 2) // 2), -(-(width + 2 * pad - 2) // 2)


def winograd_slabs(rows, columns, dtype):
    """An uninitialised (16, rows, columns) array of ``dtype`` for transformed tiles or their products:
    16 slabs of C-contiguous (rows, columns) matrices, the operands of the 16 GEMMs.

    The slabs are not packed back to back: each starts 32 elements after a multiple of 1024
    elements past the previous one. The Winograd kernels write (or read) a row of tiles as 16
    runs, one per slab; packed slabs of a few MiB lie a multiple of 4 KiB apart, so the 16 runs
    would compete for the same few cache sets (measured: the output-gradient transform of the
    default CNN's second conv, one chunk of 10 images, 1.06 ms packed and 0.36 ms padded;
    ``benchmarks/results/winograd-slab-padding-20261203.txt``).
    """
    dtype = np.dtype(dtype)
    size = rows * columns
    stride = -(-size // 1024) * 1024 + 32
    flat = empty((16 * stride,), dtype)
    return np.lib.stride_tricks.as_strided(flat, (16, rows, columns),
                                           (stride * dtype.itemsize, columns * dtype.itemsize, dtype.itemsize),
                                           writeable=True)


def _check_winograd_arrays(images=(), slabs=()):
    """``images``: (name, array) pairs that must be C-contiguous float arrays; ``slabs``: (16, R, T)
    arrays whose every slab is a C-contiguous matrix (any distance between slabs)."""
    for name, array in list(images) + list(slabs):
        if not isinstance(array, np.ndarray) or array.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float32/float64 ndarray, got "
                             f"{getattr(array, 'dtype', type(array).__name__)}")
    for name, array in images:
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    for name, array in slabs:
        check_slabs(name, array)


def winograd_input_transform_numpy(x, pad):
    """x (n, C, H, W) -> V (16, C, n*TH*TW): ``B^T d B`` of every 4x4 input tile ``d`` (tiles start
    every 2 pixels at ``-pad``; zeros outside the image). V[4*r + s, c, t] is entry (r, s) of tile t
    = (image, tile row, tile column) in row-major order."""
    n, C, H, W = x.shape
    TH, TW = winograd_tiles(H, W, pad)
    padded = np.zeros((n, C, 2 * TH + 2, 2 * TW + 2), dtype=x.dtype)
    padded[:, :, pad:pad + H, pad:pad + W] = x
    tiles = sliding_window_view(padded, (4, 4), axis=(2, 3))[:, :, ::2, ::2]  # (n, C, TH, TW, 4, 4)
    BT = WINOGRAD_BT.astype(x.dtype)
    V = BT @ tiles @ BT.T
    return np.ascontiguousarray(V.transpose(4, 5, 1, 0, 2, 3)).reshape(16, C, n * TH * TW)


def winograd_output_transform_numpy(M, n, OH, OW, bias=None):
    """M (16, F, n*TH*TW) -> out (n, F, OH, OW): every 2x2 output block is ``A^T m A`` (+ bias)."""
    F = M.shape[1]
    TH, TW = -(-OH // 2), -(-OW // 2)
    AT = WINOGRAD_AT.astype(M.dtype)
    m = M.reshape(4, 4, F, n, TH, TW).transpose(3, 2, 4, 5, 0, 1)  # (n, F, TH, TW, 4, 4)
    y = AT @ m @ AT.T  # (n, F, TH, TW, 2, 2)
    out = y.transpose(0, 1, 2, 4, 3, 5).reshape(n, F, 2 * TH, 2 * TW)[:, :, :OH, :OW]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return np.ascontiguousarray(out)


def winograd_output_gradient_numpy(dout):
    """dout (n, F, OH, OW) -> (dM (16, F, n*TH*TW), dbias (F,)): ``A dy A^T`` of every 2x2 block dy
    (the adjoint of the output transform), and the bias gradient ``dout.sum((0, 2, 3))``."""
    n, F, OH, OW = dout.shape
    TH, TW = -(-OH // 2), -(-OW // 2)
    padded = np.zeros((n, F, 2 * TH, 2 * TW), dtype=dout.dtype)
    padded[:, :, :OH, :OW] = dout
    dy = padded.reshape(n, F, TH, 2, TW, 2).transpose(0, 1, 2, 4, 3, 5)  # (n, F, TH, TW, 2, 2)
    AT = WINOGRAD_AT.astype(dout.dtype)
    dM = AT.T @ dy @ AT  # (n, F, TH, TW, 4, 4)
    dM = np.ascontiguousarray(dM.transpose(4, 5, 1, 0, 2, 3)).reshape(16, F, n * TH * TW)
    return dM, dout.sum(axis=(0, 2, 3))


def winograd_input_gradient_numpy(dV, x_shape, pad):
    """dV (16, C, n*TH*TW) -> dx (n, C, H, W): every tile adds ``B dv B^T`` back onto the input
    pixels it was read from (the adjoint of the input transform; tiles overlap, so sums add up)."""
    n, C, H, W = x_shape
    TH, TW = winograd_tiles(H, W, pad)
    BT = WINOGRAD_BT.astype(dV.dtype)
    dv = dV.reshape(4, 4, C, n, TH, TW).transpose(3, 2, 4, 5, 0, 1)  # (n, C, TH, TW, 4, 4)
    dd = BT.T @ dv @ BT
    padded = np.zeros((n, C, 2 * TH + 2, 2 * TW + 2), dtype=dV.dtype)
    for r in range(4):
        for s in range(4):
            padded[:, :, r:r + 2 * TH:2, s:s + 2 * TW:2] += dd[..., r, s]
    return np.ascontiguousarray(padded[:, :, pad:pad + H, pad:pad + W])


def winograd_input_transform(x, pad, out, first_tile=0):
    """Write the input tiles' transforms of ``x (n, C, H, W)`` into
    ``out[:, :, first_tile : first_tile + n*TH*TW]`` (``out``: (16, C, T_total) slabs, as from
    :func:`winograd_slabs`). Returns ``out``."""
    _check_winograd_arrays(images=[("x", x)], slabs=[("out", out)])
    n, C, H, W = x.shape
    TH, TW = winograd_tiles(H, W, pad)
    if out.shape[:2] != (16, C) or out.dtype != x.dtype or first_tile + n * TH * TW > out.shape[2]:
        raise ValueError(f"out must be a {x.dtype} array (16, {C}, >= {first_tile + n * TH * TW}), got "
                         f"{out.shape} {out.dtype}")
    if _extension is None:
        out[:, :, first_tile:first_tile + n * TH * TW] = winograd_input_transform_numpy(x, pad)
    else:
        _extension.winograd_input_transform(x, pad, TH, TW, out, first_tile)
    return out


def winograd_output_transform(M, out, bias=None):
    """Write ``A^T m A`` (+ bias) of the products ``M (16, F, n*TH*TW)`` into ``out (n, F, OH, OW)``."""
    _check_winograd_arrays(images=[("out", out)], slabs=[("M", M)])
    n, F, OH, OW = out.shape
    TH, TW = -(-OH // 2), -(-OW // 2)
    if M.shape != (16, F, n * TH * TW) or M.dtype != out.dtype:
        raise ValueError(f"M must be a {out.dtype} array of shape {(16, F, n * TH * TW)}, got {M.shape} {M.dtype}")
    if _extension is None:
        out[...] = winograd_output_transform_numpy(M, n, OH, OW, bias)
    else:
        _extension.winograd_output_transform(M, out, TH, TW, bias)
    return out


def winograd_output_gradient(dout, dM, dbias):
    """Write ``A dy A^T`` of ``dout (n, F, OH, OW)``'s 2x2 blocks into ``dM (16, F, n*TH*TW)`` and
    ``dout.sum((0, 2, 3))`` into ``dbias (F,)``."""
    _check_winograd_arrays(images=[("dout", dout), ("dbias", dbias)], slabs=[("dM", dM)])
    n, F, OH, OW = dout.shape
    TH, TW = -(-OH // 2), -(-OW // 2)
    if dM.shape != (16, F, n * TH * TW) or dbias.shape != (F,) or dM.dtype != dout.dtype or dbias.dtype != dout.dtype:
        raise ValueError(f"dM must be (16, {F}, {n * TH * TW}) and dbias ({F},), {dout.dtype}; got "
                         f"{dM.shape} {dM.dtype}, {dbias.shape} {dbias.dtype}")
    if _extension is None:
        dM[...], dbias[...] = winograd_output_gradient_numpy(dout)
    else:
        _extension.winograd_output_gradient(dout, TH, TW, dM, dbias)
    return dM, dbias


def winograd_input_gradient(dV, pad, out):
    """Overwrite ``out (n, C, H, W)`` with the adjoint of the input transform applied to ``dV``."""
    _check_winograd_arrays(images=[("out", out)], slabs=[("dV", dV)])
    n, C, H, W = out.shape
    TH, TW = winograd_tiles(H, W, pad)
    if dV.shape != (16, C, n * TH * TW) or dV.dtype != out.dtype:
        raise ValueError(f"dV must be a {out.dtype} array of shape {(16, C, n * TH * TW)}, got {dV.shape} {dV.dtype}")
    if _extension is None:
        out[...] = winograd_input_gradient_numpy(dV, out.shape, pad)
    else:
        _extension.winograd_input_gradient(dV, pad, TH, TW, out)
    return out


# ----------------------------------------------------------------------------
# Row-sparse products of the hierarchical head (the math: heads/hierarchical.py)
# ----------------------------------------------------------------------------
def _check_indices(name, indices, size, bound):
    """``indices`` as a contiguous (size,) np.intp array with every entry in [0, bound)."""
    indices = np.asarray(indices)
    if indices.shape != (size,) or indices.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape ({size},), got {indices.shape} {indices.dtype}")
    if size and (indices.min() < 0 or indices.max() >= bound):
        raise ValueError(f"{name} must lie in [0, {bound}), got values in "
                         f"[{indices.min()}, {indices.max()}]")
    return np.ascontiguousarray(indices, dtype=np.intp)


def _check_row_tables(table, features):
    _check_float_array("table", table)
    _check_float_array("features", features)
    if table.ndim != 2 or features.ndim != 2 or features.shape[1] != table.shape[1] or features.dtype != table.dtype:
        raise ValueError(f"table (R, D) and features (N, D) must be 2-D arrays of one dtype and D, got "
                         f"{table.shape} {table.dtype} and {features.shape} {features.dtype}")


def gathered_row_dots_numpy(table, rows, features, samples):
    return np.einsum("cd,cd->c", table[rows], features[samples])


def gathered_row_dots(table, rows, features, samples):
    """``scores (C,)``: ``scores[c] = table[rows[c]] . features[samples[c]]``.

    ``table (R, D)`` (a head's weight rows), ``features (N, D)`` of one float dtype; ``rows`` and
    ``samples`` are (C,) indices into them. The compiled kernel reads both rows in place, where
    NumPy first copies the C pairs of D-vectors (two (C, D) gathers).
    """
    _check_row_tables(table, features)
    rows = _check_indices("rows", rows, np.size(rows), table.shape[0])
    samples = _check_indices("samples", samples, rows.size, features.shape[0])
    if _extension is None:
        return gathered_row_dots_numpy(table, rows, features, samples)
    out = np.empty(rows.size, dtype=table.dtype)
    _extension.gathered_row_dots(np.ascontiguousarray(table), rows, np.ascontiguousarray(features), samples, out)
    return out


def scatter_row_products_numpy(weights, table, rows, features, samples, slots, n_slots):
    dfeatures = np.zeros_like(features)
    np.add.at(dfeatures, samples, weights[:, None] * table[rows])
    dslots = np.zeros((n_slots, table.shape[1]), dtype=table.dtype)
    np.add.at(dslots, slots, weights[:, None] * features[samples])
    return dfeatures, dslots


def scatter_row_products(weights, table, rows, features, samples, slots, n_slots):
    """The adjoint of :func:`gathered_row_dots` for upstream gradients ``weights (C,)``.

    Returns ``(dfeatures (N, D), dslots (n_slots, D))`` with, summed over the pairs c,
    ``dfeatures[samples[c]] += weights[c] * table[rows[c]]`` (the gradient of the scores with
    respect to ``features``) and ``dslots[slots[c]] += weights[c] * features[samples[c]]`` (with
    respect to the rows, one output row per distinct row: ``slots`` maps each pair to it, as
    ``np.unique(rows, return_inverse=True)`` does).
    """
    _check_row_tables(table, features)
    rows = _check_indices("rows", rows, np.size(rows), table.shape[0])
    samples = _check_indices("samples", samples, rows.size, features.shape[0])
    n_slots = check_int(n_slots, "n_slots", minimum=0)
    slots = _check_indices("slots", slots, rows.size, n_slots)
    weights = np.asarray(weights)
    if weights.shape != rows.shape or weights.dtype != table.dtype:
        raise ValueError(f"weights must be a {table.dtype} array of shape {rows.shape}, got "
                         f"{weights.shape} {weights.dtype}")
    if _extension is None:
        return scatter_row_products_numpy(weights, table, rows, features, samples, slots, n_slots)
    dfeatures = np.zeros_like(features, order="C")
    dslots = np.empty((n_slots, table.shape[1]), dtype=table.dtype)
    if _extension.scatter_row_products(np.ascontiguousarray(weights), np.ascontiguousarray(table), rows,
                                       np.ascontiguousarray(features), samples, slots, dfeatures, dslots):
        raise MemoryError("scatter_row_products: no memory to sort the pairs by slot")
    return dfeatures, dslots


def tree_paths_numpy(y, leaf_parent, leaf_position, node_parent, node_position):
    # One level per iteration for the whole batch at once (-1 marks samples already at the root).
    nodes, positions = [leaf_parent[y]], [leaf_position[y]]
    while True:
        current = nodes[-1]
        has_parent = node_parent[np.maximum(current, 0)] >= 0
        has_parent &= current >= 0
        if not has_parent.any():
            break
        safe = np.where(has_parent, current, 0)
        nodes.append(np.where(has_parent, node_parent[safe], -1))
        positions.append(np.where(has_parent, node_position[safe], -1))
    path_nodes, path_positions = np.stack(nodes, axis=1), np.stack(positions, axis=1)
    on_path = path_nodes >= 0  # (N, L); row-major nonzero keeps steps sample-major
    return np.nonzero(on_path)[0], path_nodes[on_path], path_positions[on_path]


def tree_paths(y, depth, leaf_parent, leaf_position, node_parent, node_position):
    """Every decision on the paths from the classes ``y (N,)`` up to the root of a tree.

    The tree is given by parent pointers (``heads/trees.py``'s ``Tree`` arrays): class k hangs
    below internal node ``leaf_parent[k]`` as its child ``leaf_position[k]``, ``depth[k]`` steps
    below the root; internal node m below ``node_parent[m]`` (-1 for the root) as its child
    ``node_position[m]``. The arrays must describe one tree (a ``Tree``'s do); only ``y`` is
    checked here, once per call.

    Returns ``(sample, node, position)``, each (S,) with S = ``depth[y].sum()``: step s is sample
    ``sample[s]`` taking child ``position[s]`` at internal node ``node[s]``; the steps are
    sample-major (``sample`` sorted) and leaf-to-root within a sample.
    """
    y = _check_indices("y", y, np.size(y), leaf_parent.size)
    if _extension is None:
        return tree_paths_numpy(y, leaf_parent, leaf_position, node_parent, node_position)
    lengths = depth[y]
    step_first = np.zeros(y.size + 1, dtype=np.intp)
    np.cumsum(lengths, out=step_first[1:])
    nodes = np.empty(step_first[-1], dtype=np.intp)
    positions = np.empty(step_first[-1], dtype=np.intp)
    mismatched = _extension.tree_paths(y, step_first, leaf_parent, leaf_position, node_parent, node_position,
                                       nodes, positions)
    if mismatched:
        raise ValueError(f"tree_paths: depth disagrees with the parent pointers for {mismatched} of the "
                         f"{y.size} classes")
    return np.repeat(np.arange(y.size), lengths), nodes, positions
