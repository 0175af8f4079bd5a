"""Stateless layers: every layer is a ``forward -> (out, cache)`` / ``backward(dout, cache)`` pair.

The forward pass returns its output and a ``cache`` of whatever the backward
pass needs; the backward pass takes the upstream gradient ``dout = dL/dout``
and returns the gradients of the loss with respect to every input (CS231n
style). The modules in :mod:`npsoftmax.layers` are thin stateful wrappers that
call these pairs and keep the cache.

Contract shared by every pair:

* ``forward`` never writes into its inputs. The one deliberate exception is
  batch norm in training mode, which updates the *running statistics buffers*
  in place (exactly like PyTorch's ``running_mean``/``running_var``).
* ``backward`` never writes into ``dout`` or into anything the cache refers to.
* dtypes are preserved: float32 in gives float32 out and float32 gradients.
  ``dout`` must have the dtype and shape of the forward output; a mismatch is
  a ``TypeError``/``ValueError`` rather than a silent cast.
"""

import numbers
from typing import NamedTuple, Optional

import numpy as np

from . import kernels, parallel, winograd
from .kernels import col2im, conv_output_size, im2col
from .sections import section
from .validation import (check_array, check_bool, check_buffer, check_int, check_ndim, check_same_dtype,
                         check_shape, check_slab_buffer, check_upstream)

__all__ = [
    "affine_forward",
    "affine_backward",
    "relu_forward",
    "relu_backward",
    "conv_forward",
    "conv_backward",
    "max_pool_forward",
    "max_pool_forward_reshape",
    "max_pool_forward_im2col",
    "max_pool_backward",
    "batchnorm_forward",
    "batchnorm_backward",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "dropout_forward",
    "dropout_backward",
    "flatten_forward",
    "flatten_backward",
]


# ----------------------------------------------------------------------------
# Caches: what each forward pass keeps for its backward pass (named, not positional)
# ----------------------------------------------------------------------------
class AffineCache(NamedTuple):
    x: np.ndarray            # (N, d_1, ..., d_k) input
    w: np.ndarray            # (D_in, D_out)
    has_bias: bool


class ConvCache(NamedTuple):
    """Training keeps ``cols`` (the im2col columns of the batch, ``x`` None); inference-mode
    forwards (``keep_cols=False``) keep ``x`` instead (``cols`` None) and a backward recomputes
    the columns from it. Exactly one of the two is set."""
    x_shape: tuple           # (N, C, H, W)
    cols: Optional[np.ndarray]   # (C*KH*KW, N*OH*OW) or None
    w: np.ndarray            # (F, C, KH, KW)
    stride: int
    pad: int
    has_bias: bool
    x: Optional[np.ndarray]  # (N, C, H, W) or None


class MaxPoolCache(NamedTuple):
    path: str                # "reshape" (windows tile the input) or "im2col" (general windows)
    x_shape: tuple           # (N, C, H, W)
    dtype: np.dtype
    size: int
    stride: int
    argmax: np.ndarray       # position of each window's max


class BatchNormCache(NamedTuple):
    xhat: np.ndarray         # (N, D) normalised input
    gamma: np.ndarray        # (D,)
    inv_std: np.ndarray      # (D,) 1 / sqrt(var + eps)
    training: bool


class SpatialBatchNormCache(NamedTuple):
    x: np.ndarray            # (N, C, H, W); xhat is recomputed from it
    mean: np.ndarray         # (C,) the statistics used (a copy: in eval they are live buffers)
    inv_std: np.ndarray      # (C,)
    gamma: np.ndarray        # (C,)
    training: bool


class BatchNormMaxPoolCache(NamedTuple):
    x: np.ndarray            # (N, C, H, W), the batch norm's input
    mean: np.ndarray         # (C,) as in SpatialBatchNormCache
    inv_std: np.ndarray      # (C,)
    gamma: np.ndarray        # (C,)
    training: bool
    size: int                # pool window and stride
    argmax: np.ndarray       # (N, C, H/size, W/size) int32, as MaxPoolCache's on the "reshape" path


class DropoutCache(NamedTuple):
    shape: tuple
    dtype: np.dtype
    mask: Optional[np.ndarray]   # keep / (1 - p), or None (eval mode or p = 0: identity)


class FlattenCache(NamedTuple):
    shape: tuple             # the input's shape, restored by the backward pass
    dtype: np.dtype


# ----------------------------------------------------------------------------
# Argument checks (every message names the argument and what it received)
# ----------------------------------------------------------------------------
def _check_kernel_fits(x_shape, kernel_height, kernel_width, pad, kernel_source):
    padded = (x_shape[2] + 2 * pad, x_shape[3] + 2 * pad)
    if kernel_height > padded[0] or kernel_width > padded[1]:
        raise ValueError(
            f"kernel ({kernel_height}, {kernel_width}) from {kernel_source} is larger than the "
            f"padded input {padded} of x shape {tuple(x_shape)} with pad={pad}"
        )


# ----------------------------------------------------------------------------
# Affine (fully connected)
# ----------------------------------------------------------------------------
def affine_forward(x, w, b):
    """Fully connected layer ``out = x.reshape(N, D_in) @ w + b``.

    Parameters
    ----------
    x : ndarray (N, D_in) or (N, d_1, ..., d_k) with d_1*...*d_k == D_in
    w : ndarray (D_in, D_out), same dtype as ``x``
    b : ndarray (D_out,) or None (no bias)

    Returns
    -------
    out : ndarray (N, D_out)
    cache : AffineCache (x, w, has_bias)
    """
    check_array("x", x)
    check_ndim("w", w, 2, "(D_in, D_out)")
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (N, D_in), got shape {x.shape}")
    check_same_dtype("x", x, "w", w)
    in_features = int(np.prod(x.shape[1:]))
    if in_features != w.shape[0]:
        raise ValueError(
            f"x has {in_features} features per row (x shape {x.shape}) but w expects "
            f"D_in = {w.shape[0]} (w shape {w.shape})"
        )
    out = x.reshape(x.shape[0], in_features) @ w
    if b is not None:
        check_shape("b", b, (w.shape[1],))
        check_same_dtype("b", b, "w", w)
        out += b
    return out, AffineCache(x, w, b is not None)


def affine_backward(dout, cache):
    """Backward pass of :func:`affine_forward`.

    Parameters
    ----------
    dout : ndarray (N, D_out)

    Returns
    -------
    dx : ndarray, shape of ``x``
    dw : ndarray (D_in, D_out)
    db : ndarray (D_out,), or None when the forward pass had no bias
    """
    x, w, has_bias = cache
    check_upstream(dout, (x.shape[0], w.shape[1]), w.dtype)
    x_rows = x.reshape(x.shape[0], w.shape[0])
    # out_nk = sum_i x_ni w_ik + b_k  =>  dx = dout w^T, dw = x^T dout, db = sum_n dout
    dx = (dout @ w.T).reshape(x.shape)
    dw = x_rows.T @ dout
    db = dout.sum(axis=0) if has_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------
def relu_forward(x):
    """Rectified linear unit ``out = max(x, 0)``, elementwise; any shape.

    Returns ``(out, cache)`` with ``out`` of the shape and dtype of ``x``.
    """
    check_array("x", x)
    return np.maximum(x, 0, out=kernels.empty(x.shape, x.dtype)), x


def relu_backward(dout, cache):
    """Backward pass of :func:`relu_forward`: ``dx = dout * (x > 0)``, shape of ``x``.

    The derivative at exactly 0 is taken as 0 (the PyTorch convention).
    """
    x = cache
    check_upstream(dout, x.shape, x.dtype)
    # One pass over dout and x (compiled), instead of a boolean temporary and a select.
    return kernels.relu_backward(dout, x)


# ----------------------------------------------------------------------------
# Convolution: im2col + one GEMM
# ----------------------------------------------------------------------------
#: Bytes of im2col columns processed per chunk of images by conv_forward/conv_backward.
#: A chunk's columns are written by im2col and read by the GEMM right away, while
#: they are still in the CPU cache; the gradient columns of a chunk never leave it.
#: (The whole batch's columns are tens of MiB: more than the last-level cache.)
CONV_CHUNK_BYTES = 4 * 2**20


def _images_per_chunk(N, columns_per_image, rows, itemsize):
    """How many images of the batch make one chunk of about CONV_CHUNK_BYTES of columns."""
    return max(1, min(N, CONV_CHUNK_BYTES // max(rows * columns_per_image * itemsize, 1)))


CONV_ALGORITHMS = ("auto", "im2col", "winograd")


def conv_algorithm(w_shape, stride, algorithm="auto", *, output_size=None):
    """The algorithm :func:`conv_forward` runs for a kernel of shape ``w_shape`` (F, C, KH, KW):
    ``"winograd"`` (:mod:`npsoftmax.winograd`, 3x3 kernels with stride 1 only) or ``"im2col"``.
    ``"auto"`` picks Winograd for 3x3, stride-1 kernels with at least ``winograd.MIN_CHANNELS``
    input channels (2.25x fewer multiply-adds; with few input channels its 16 thin products
    gain nothing over one im2col GEMM) whose output ``output_size`` (OH, OW), when given, is at
    least ``winograd.MIN_OUTPUT_SIZE`` on each side (on smaller images the per-tile-row
    overheads outweigh the saved multiply-adds)."""
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {CONV_ALGORITHMS}, got {algorithm!r}")
    fits = winograd.applies(w_shape, stride)
    if algorithm == "winograd" and not fits:
        raise ValueError(f"algorithm='winograd' needs a 3x3 kernel and stride 1, got kernel "
                         f"{tuple(w_shape[2:])} and stride {stride}")
    if algorithm == "auto":
        large = output_size is None or min(output_size) >= winograd.MIN_OUTPUT_SIZE
        return "winograd" if fits and w_shape[1] >= winograd.MIN_CHANNELS and large else "im2col"
    return algorithm


def conv_buffer_shape(x_shape, w_shape, stride, pad, algorithm):
    """Shape of the array a training forward keeps for the backward pass (``cols_out``):
    the im2col columns (C*KH*KW, N*OH*OW), or Winograd's transformed tiles (16, C, N*TH*TW)."""
    if algorithm == "winograd":
        return winograd.buffer_shape(x_shape, pad)
    N, C, H, W = x_shape
    _, _, KH, KW = w_shape
    return (C * KH * KW, N * conv_output_size(H, KH, stride, pad) * conv_output_size(W, KW, stride, pad))


def conv_forward(x, w, b, stride=1, pad=0, *, cols_out=None, keep_cols=True, algorithm="auto"):
    """2-D convolution (cross-correlation, as in PyTorch) via im2col and one matrix product
    (computed a chunk of images at a time, see ``CONV_CHUNK_BYTES``), or for 3x3 kernels with
    stride 1 via Winograd's F(2x2, 3x3) (:mod:`npsoftmax.winograd`; see ``algorithm``).

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    w : ndarray (F, C, KH, KW), same dtype; the kernel may be non-square
    b : ndarray (F,) or None (no bias)
    stride : int >= 1
    pad : int >= 0, zeros added on every side
    cols_out : ndarray of shape ``conv_buffer_shape(...)``, optional
        Buffer (dtype of ``x``) that the forward pass overwrites instead of
        allocating: im2col's columns, C-contiguous (C*KH*KW, N*OH*OW), or Winograd's
        tiles (16, C, N*TH*TW) from ``kernels.winograd_slabs``. The cache refers to it,
        so the caller must not reuse it before the matching backward. ``Conv2d``
        passes the same buffer every step: a fresh allocation of tens of MiB costs
        page faults every call.
    keep_cols : bool
        True (training): the cache keeps the whole batch's columns (or tiles) for
        the backward pass. False (inference): only one chunk of them exists at a
        time and the cache keeps a reference to ``x`` instead; a backward pass
        then recomputes them (slower, but possible).
    algorithm : "auto" (default), "im2col" or "winograd"; see :func:`conv_algorithm`.
        Both compute the same convolution (up to rounding) and its exact gradients.

    Returns
    -------
    out : ndarray (N, F, OH, OW) with ``OH = (H + 2*pad - KH) // stride + 1``
        (likewise OW). When the stride does not tile the padded input the last
        partial window is dropped (floor division, as PyTorch does), so the
        last rows/columns of ``x`` may receive no gradient.
    cache : ConvCache (``cols`` kept when ``keep_cols``, else ``x``), or a
        ``winograd.WinogradCache``
    """
    check_ndim("x", x, 4, "(N, C, H, W)")
    check_ndim("w", w, 4, "(F, C, KH, KW)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"channel mismatch: x has C = {x.shape[1]} channels (x shape {x.shape}) but w "
            f"expects C = {w.shape[1]} (w shape {w.shape})"
        )
    check_same_dtype("x", x, "w", w)
    stride = check_int(stride, "stride", 1)
    pad = check_int(pad, "pad", 0)
    F, _, KH, KW = w.shape
    _check_kernel_fits(x.shape, KH, KW, pad, f"w shape {w.shape}")
    N = x.shape[0]
    OH = conv_output_size(x.shape[2], KH, stride, pad)
    OW = conv_output_size(x.shape[3], KW, stride, pad)
    P = OH * OW  # output pixels per image = columns per image
    if b is not None:
        check_shape("b", b, (F,))
        check_same_dtype("b", b, "w", w)
    check_bool(keep_cols, "keep_cols")
    algorithm = conv_algorithm(w.shape, stride, algorithm, output_size=(OH, OW))
    if cols_out is not None and not keep_cols:
        raise ValueError("cols_out is only used with keep_cols=True (the cache keeps the columns)")
    x = np.ascontiguousarray(x)
    if algorithm == "winograd":
        check_slab_buffer("cols_out", cols_out, winograd.buffer_shape(x.shape, pad), x.dtype)
        return winograd.forward(x, w, b, pad, V_out=cols_out, keep_tiles=keep_cols)
    check_buffer("cols_out", cols_out, (w[0].size, N * P), x.dtype)
    chunk = parallel.chunk_size(N, _images_per_chunk(N, P, w[0].size, x.itemsize))
    if keep_cols:
        cols = kernels.empty((w[0].size, N * P), x.dtype) if cols_out is None else cols_out
    w_rows = w.reshape(F, -1)
    out = kernels.empty((N, F, OH, OW), x.dtype)  # page-aligned: see kernels.empty

    # cols[(c*KH + i)*KW + j, (n*OH + oh)*OW + ow] = x_padded[n, c, oh*stride + i, ow*stride + j]
    # and the whole convolution is one GEMM: out_rows (F, N*P) = w_rows (F, C*KH*KW) @ cols.
    # The columns of image n are block n of cols, so the GEMM splits by images: it runs
    # chunk by chunk, on columns im2col has just written (still in cache), one chunk per
    # task of the thread pool (npsoftmax.parallel; on the calling thread without a pool).
    def forward_chunk(start, stop):
        images = stop - start
        if keep_cols:
            columns = cols[:, start * P : stop * P]
        else:  # inference: this chunk's columns only, dropped after its GEMM
            columns = kernels.empty((w[0].size, images * P), x.dtype)
        with section("im2col"):
            im2col(x[start:stop], KH, KW, stride, pad, out=columns)
        with section("conv GEMM"):
            out_rows = np.matmul(w_rows, columns, out=kernels.empty((F, images * P), x.dtype))
        # Columns are ordered (n, oh, ow): out_rows is (F, images, OH*OW); move F after n
        # (and add the bias on the way, instead of a separate pass over the output).
        kernels.swap_leading_axes(out_rows.reshape(F, images, P), out[start:stop].reshape(images, F, P), b)

    parallel.map_chunks(forward_chunk, N, chunk)
    if keep_cols:
        return out, ConvCache(x.shape, cols, w, stride, pad, b is not None, None)
    return out, ConvCache(x.shape, None, w, stride, pad, b is not None, x)


def conv_backward(dout, cache, *, input_gradient=True):
    """Backward pass of :func:`conv_forward`.

    Parameters
    ----------
    dout : ndarray (N, F, OH, OW)
    input_gradient : bool
        False skips ``dx`` (returned as None): the first layer of a network
        does not need the gradient of the images, and it costs a GEMM and a
        col2im (PyTorch skips it too, for inputs that do not require grad).

    Returns
    -------
    dx : ndarray (N, C, H, W), or None when ``input_gradient`` is False
    dw : ndarray (F, C, KH, KW)
    db : ndarray (F,), or None when the forward pass had no bias
    """
    check_bool(input_gradient, "input_gradient")
    if isinstance(cache, winograd.WinogradCache):
        x_shape, w = cache.x_shape, cache.w
        check_upstream(dout, (x_shape[0], w.shape[0], conv_output_size(x_shape[2], 3, 1, cache.pad),
                              conv_output_size(x_shape[3], 3, 1, cache.pad)), w.dtype)
        return winograd.backward(dout, cache, input_gradient)
    x_shape, cols, w, stride, pad, has_bias, x = cache
    F, _, KH, KW = w.shape
    N = x_shape[0]
    OH = conv_output_size(x_shape[2], KH, stride, pad)
    OW = conv_output_size(x_shape[3], KW, stride, pad)
    P = OH * OW
    check_upstream(dout, (N, F, OH, OW), w.dtype)
    dout = np.ascontiguousarray(dout)
    w_rows = w.reshape(F, -1)
    dx = kernels.empty(x_shape, w.dtype) if input_gradient else None

    # out_rows = w_rows @ cols + b, so
    #   dw_rows = dout_rows @ cols^T  (a sum over all columns: one partial sum per chunk),
    #   dcols   = w_rows^T @ dout_rows, folded back into dx by col2im.
    # Chunks as in the forward pass: each chunk's dcols is written, folded and
    # reused while in cache; it never exists for the whole batch.
    chunk = parallel.chunk_size(N, _images_per_chunk(N, P, w[0].size, w.itemsize))

    def backward_chunk(start, stop):
        images = stop - start
        # Undo the output layout: rows f, columns (n, oh, ow), matching out_rows in the forward pass.
        dout_rows = kernels.empty((F, images * P), dout.dtype)
        kernels.swap_leading_axes(dout[start:stop].reshape(images, F, P), dout_rows.reshape(F, images, P))
        if cols is None:  # the forward pass kept x instead of the columns: recompute them
            columns = kernels.empty((w[0].size, images * P), w.dtype)
            with section("im2col"):
                im2col(x[start:stop], KH, KW, stride, pad, out=columns)
        else:
            columns = cols[:, start * P : stop * P]
        with section("conv GEMM"):
            # (columns.T is a transposed view: BLAS reads it in place, nothing is copied.)
            dw_part = dout_rows @ columns.T
            dcols = (np.matmul(w_rows.T, dout_rows, out=kernels.empty((w[0].size, images * P), w.dtype))
                     if input_gradient else None)
        if input_gradient:
            # col2im is the adjoint of im2col: it adds each column entry back to the pixel
            # it was copied from, so a pixel seen by several windows sums their gradients.
            with section("col2im"):
                col2im(dcols, (images, *x_shape[1:]), KH, KW, stride, pad, out=dx[start:stop])
        return dw_part, (dout_rows.sum(axis=1) if has_bias else None)

    parts = parallel.map_chunks(backward_chunk, N, chunk)
    # The batch sums, added in chunk order (the same result whichever thread ran which chunk).
    dw_rows = parts[0][0]
    for dw_part, _ in parts[1:]:
        dw_rows += dw_part
    db = None
    if has_bias:
        db = parts[0][1]
        for _, db_part in parts[1:]:
            db += db_part
    return dx, dw_rows.reshape(w.shape), db


# ----------------------------------------------------------------------------
# Max pooling
# ----------------------------------------------------------------------------
def _check_pool_arguments(x, size, stride):
    check_ndim("x", x, 4, "(N, C, H, W)")
    size = check_int(size, "size", 1)
    stride = check_int(stride, "stride", 1)
    if size > x.shape[2] or size > x.shape[3]:
        raise ValueError(
            f"pool size {size} is larger than the input's spatial size {x.shape[2:]} "
            f"(x shape {x.shape})"
        )
    return size, stride


def max_pool_forward_reshape(x, size):
    """Max pooling for windows that tile the input exactly (``stride == size``).

    Every window is a block of ``x`` viewed as (N, C, H/size, size, W/size, size):
    no copy into columns (compiled kernel, or that reshape in NumPy when the
    extension is not built). Raises ``ValueError`` when
    ``size`` does not divide H and W: this path never drops or pads pixels.

    Parameters
    ----------
    x : ndarray (N, C, H, W), with H and W multiples of ``size``
    size : int >= 1, window size and stride

    Returns
    -------
    out : ndarray (N, C, H/size, W/size)
    cache : MaxPoolCache, for :func:`max_pool_backward`
    """
    size, _ = _check_pool_arguments(x, size, size)
    N, C, H, W = x.shape
    if H % size or W % size:
        raise ValueError(
            f"max_pool_forward_reshape needs windows that tile the input: size={size} does not "
            f"divide the spatial size {(H, W)} of x shape {x.shape}; use max_pool_forward"
        )
    # Viewed as (N, C, H/size, size, W/size, size), every window is a block of the
    # array (im2col.max_pool_tiled_forward_numpy does exactly that); the compiled
    # kernel scans the same blocks, a band of rows per thread task. The argmax is
    # recorded here (the first maximum in row-major window order, the element
    # PyTorch picks), so the backward pass routes gradients without searching again.
    out, argmax = kernels.max_pool_tiled_forward(x, size)
    return out, MaxPoolCache("reshape", x.shape, x.dtype, size, size, argmax)


def max_pool_forward_im2col(x, size=2, stride=2):
    """Max pooling for any window and stride (overlapping, gapped, or not tiling).

    Every channel is treated as a one-channel image, unfolded with im2col into
    (size*size, N*C*OH*OW) columns; the max of each column is its output. A
    stride that does not tile the input drops the last partial window (floor,
    as PyTorch does). Arguments and results as :func:`max_pool_forward`.
    """
    size, stride = _check_pool_arguments(x, size, stride)
    N, C, H, W = x.shape
    OH = conv_output_size(H, size, stride, 0)
    OW = conv_output_size(W, size, stride, 0)
    cols = im2col(np.ascontiguousarray(x).reshape(N * C, 1, H, W), size, size, stride, 0)
    argmax = cols.argmax(axis=0)  # row i*size + j of the window: same order as the reshape path
    out = cols[argmax, np.arange(cols.shape[1])].reshape(N, C, OH, OW)
    return out, MaxPoolCache("im2col", x.shape, x.dtype, size, stride, argmax)


def max_pool_forward(x, size=2, stride=2):
    """Max pooling over ``size x size`` windows moved by ``stride``.

    Uses the reshape path when the windows tile the input exactly (``size ==
    stride`` and H, W divisible by ``size``) and the general im2col path
    otherwise; both record the argmax of each window and give the same result.

    Parameters
    ----------
    x : ndarray (N, C, H, W)
    size : int >= 1
    stride : int >= 1

    Returns
    -------
    out : ndarray (N, C, OH, OW), ``OH = (H - size) // stride + 1`` (likewise OW)
    cache : MaxPoolCache, for :func:`max_pool_backward`
    """
    size, stride = _check_pool_arguments(x, size, stride)
    if size == stride and x.shape[2] % size == 0 and x.shape[3] % size == 0:
        return max_pool_forward_reshape(x, size)
    return max_pool_forward_im2col(x, size, stride)


def max_pool_backward(dout, cache):
    """Backward pass of max pooling: each window's gradient goes to its argmax.

    Exactly one element per window receives the gradient (the first maximum,
    as in PyTorch), even when several elements tie. With overlapping windows a
    pixel that is the max of several windows accumulates all their gradients.

    Parameters
    ----------
    dout : ndarray (N, C, OH, OW)

    Returns
    -------
    dx : ndarray (N, C, H, W)
    """
    path, x_shape, dtype, size, stride, argmax = cache
    N, C, H, W = x_shape
    OH = conv_output_size(H, size, stride, 0)
    OW = conv_output_size(W, size, stride, 0)
    check_upstream(dout, (N, C, OH, OW), dtype)
    if path == "reshape":
        # Windows tile the input: every pixel belongs to one window, so one write per pixel.
        return kernels.max_pool_tiled_backward(dout, argmax, size)
    dcols = np.zeros((size * size, N * C * OH * OW), dtype=dout.dtype)
    dcols[argmax, np.arange(dcols.shape[1])] = dout.reshape(-1)
    # col2im sums the columns back into the image: overlapping windows accumulate.
    return col2im(dcols, (N * C, 1, H, W), size, size, stride, 0).reshape(N, C, H, W)


# ----------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------
def _check_batchnorm_arguments(x, gamma, beta, running_mean, running_var, momentum, eps):
    D = x.shape[1]
    for name, array in (
        ("gamma", gamma),
        ("beta", beta),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        check_array(name, array)
        if array.shape != (D,):
            raise ValueError(f"{name} must have shape ({D},) to match x shape {x.shape}, got {array.shape}")
        check_same_dtype(name, array, "x", x)
    if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not isinstance(eps, numbers.Real) or not eps > 0.0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    # Python floats are "weak" scalars in NumPy 2: they never upcast float32 arrays.
    return float(momentum), float(eps)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5):
    """Batch normalisation over the batch axis, with PyTorch semantics.

    ``out = gamma * (x - mean) / sqrt(var + eps) + beta`` per feature.

    * Training: ``mean`` and ``var`` are the batch mean and the *biased* batch
      variance (divide by N). The running buffers are updated **in place** --
      the one deliberate mutation in this module::

          running_mean = (1 - momentum) * running_mean + momentum * mean
          running_var  = (1 - momentum) * running_var  + momentum * var * N / (N - 1)

      (the running variance uses the *unbiased* batch variance, as PyTorch does).
    * Eval: ``mean``/``var`` are the running buffers, which are not changed, so
      each sample's output is independent of the rest of the batch.

    Parameters
    ----------
    x : ndarray (N, D)
    gamma, beta : ndarray (D,), scale and shift, dtype of ``x``
    running_mean, running_var : ndarray (D,), dtype of ``x``
    training : bool
    momentum : float in [0, 1]
    eps : float > 0

    Returns
    -------
    out : ndarray (N, D)
    cache : BatchNormCache, for :func:`batchnorm_backward`
    """
    check_ndim("x", x, 2, "(N, D)")
    momentum, eps = _check_batchnorm_arguments(x, gamma, beta, running_mean, running_var, momentum, eps)
    N = x.shape[0]
    if training:
        if N < 2:
            raise ValueError(
                f"batch norm in training mode needs more than one value per feature, got x shape {x.shape}"
            )
        mean = x.mean(axis=0)
        var = x.var(axis=0)  # biased: divides by N
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += momentum * (var * (N / (N - 1)))
    else:
        mean, var = running_mean, running_var  # read only; the cache keeps derived arrays
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv_std
    out = gamma * xhat + beta
    return out, BatchNormCache(xhat, gamma, inv_std, bool(training))


def batchnorm_backward(dout, cache):
    """Backward pass of :func:`batchnorm_forward`.

    Parameters
    ----------
    dout : ndarray (N, D)

    Returns
    -------
    dx : ndarray (N, D)
    dgamma, dbeta : ndarray (D,)
    """
    xhat, gamma, inv_std, training = cache
    check_upstream(dout, xhat.shape, xhat.dtype)
    N = xhat.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    if not training:
        # Eval mode: mean and inv_std are constants, so the layer is affine per feature.
        return dout * (gamma * inv_std), dgamma, dbeta
    # Training mode, per feature (drop the feature index; sums run over the batch n):
    #   xhat_n = (x_n - mu) * s,   mu = (1/N) sum_n x_n,   s = (var + eps)^(-1/2),
    #   var = (1/N) sum_n (x_n - mu)^2,   out_n = gamma * xhat_n + beta.
    # With g_n = dL/dxhat_n = gamma * dout_n:
    #   dxhat_m/dx_n = s * (delta_mn - 1/N) - xhat_m * s * xhat_n / N
    # (d mu/dx_n = 1/N, d var/dx_n = 2 (x_n - mu) / N, so d s/dx_n = -s^3 (x_n - mu) / N).
    # Summing g_m * dxhat_m/dx_n over m gives the compact form
    #   dx_n = (s / N) * (N g_n - sum_m g_m - xhat_n * sum_m g_m xhat_m).
    # The three terms: the direct path, the path through the mean, the path through the variance.
    dxhat = dout * gamma
    dx = (inv_std / N) * (N * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
    return dx, dgamma, dbeta


def spatial_batchnorm_forward(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5):
    """Batch normalisation of images: one mean/variance per channel, over (N, H, W).

    Same semantics as :func:`batchnorm_forward` (and PyTorch's ``BatchNorm2d``),
    with N*H*W values per channel; in training the running buffers are updated
    in place.

    Parameters
    ----------
    x : ndarray (N, C, H, W)
    gamma, beta, running_mean, running_var : ndarray (C,), dtype of ``x``

    Returns
    -------
    out : ndarray (N, C, H, W)
    cache : SpatialBatchNormCache, for :func:`spatial_batchnorm_backward`
    """
    mean, inv_std = _spatial_batchnorm_statistics(x, gamma, beta, running_mean, running_var, training,
                                                  momentum, eps)
    out = kernels.batchnorm_normalize(x, mean, inv_std, gamma, beta)
    # The cache keeps x (as affine and relu do) and the statistics: backward recomputes
    # xhat = (x - mean) * inv_std on the fly instead of this pass writing it out. The
    # statistics are copied because in eval mode they are the live running buffers.
    return out, SpatialBatchNormCache(x, mean.copy(), inv_std, gamma, bool(training))


def _spatial_batchnorm_statistics(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    """Validate, and return the (mean, inv_std) (C,) a spatial batch norm normalises x with
    (training: the batch's, and the running buffers are updated in place; eval: the buffers')."""
    check_ndim("x", x, 4, "(N, C, H, W)")
    momentum, eps = _check_batchnorm_arguments(x, gamma, beta, running_mean, running_var, momentum, eps)
    N, C, H, W = x.shape
    count = N * H * W
    if training and count < 2:
        raise ValueError(
            f"batch norm in training mode needs more than one value per channel (N*H*W > 1), got x shape {x.shape}"
        )
    # The same formulas as batchnorm_forward with one "feature" per channel and
    # N*H*W values each; the kernels work on NCHW directly (one channel's values
    # are N contiguous runs of H*W), so no transpose to (N*H*W, C) rows and back.
    if training:
        mean, var = kernels.batchnorm_statistics(x)
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += momentum * (var * (count / (count - 1)))  # unbiased, as PyTorch
    else:
        mean, var = running_mean, running_var
    return mean, 1.0 / np.sqrt(var + eps)


def spatial_batchnorm_backward(dout, cache):
    """Backward pass of :func:`spatial_batchnorm_forward`.

    Parameters
    ----------
    dout : ndarray (N, C, H, W)

    Returns
    -------
    dx : ndarray (N, C, H, W)
    dgamma, dbeta : ndarray (C,)
    """
    x, mean, inv_std, gamma, training = cache
    check_upstream(dout, x.shape, x.dtype)
    # batchnorm_backward's compact formula, per channel over (N, H, W).
    return kernels.batchnorm_backward(dout, x, mean, inv_std, gamma, training)


def pool_tiles(x_shape, size, stride):
    """True when ``size x size`` windows moved by ``stride`` tile an (N, C, H, W) input exactly
    (``stride == size``, H and W multiples of it): the pools that
    :func:`spatial_batchnorm_max_pool_forward` fuses (windows up to 8 x 8)."""
    return size == stride and size <= 8 and x_shape[2] % size == 0 and x_shape[3] % size == 0


def spatial_batchnorm_max_pool_forward(x, gamma, beta, running_mean, running_var, size, training=True,
                                       momentum=0.1, eps=1e-5):
    """:func:`spatial_batchnorm_forward` followed by max pooling over ``size x size`` windows
    that tile the image (:func:`max_pool_forward` with ``stride == size``), in one pass.

    The same numbers as the two apart (the normalised values are computed by the same formula
    and pooled by the same comparisons), without writing the normalised (N, C, H, W) image and
    reading it back; the backward never builds the pool's full-size gradient, which is zero in
    all but one element of every window. ``layers.Sequential`` runs a ``BatchNorm2d`` followed by
    a tiling ``MaxPool2d`` this way.

    Parameters
    ----------
    x : ndarray (N, C, H, W), H and W multiples of ``size``
    gamma, beta, running_mean, running_var : ndarray (C,), dtype of ``x``
    size : int, 1 .. 8, window size and stride
    training, momentum, eps : as :func:`spatial_batchnorm_forward`

    Returns
    -------
    out : ndarray (N, C, H/size, W/size)
    cache : BatchNormMaxPoolCache, for :func:`spatial_batchnorm_max_pool_backward`
    """
    size = check_int(size, "size")
    check_ndim("x", x, 4, "(N, C, H, W)")
    if not pool_tiles(x.shape, size, size):
        raise ValueError(f"size must be at most 8 and divide the spatial size {x.shape[2:]} of x shape "
                         f"{x.shape}, got size={size}")
    mean, inv_std = _spatial_batchnorm_statistics(x, gamma, beta, running_mean, running_var, training,
                                                  momentum, eps)
    out, argmax = kernels.batchnorm_max_pool_forward(x, mean, inv_std, gamma, beta, size)
    return out, BatchNormMaxPoolCache(x, mean.copy(), inv_std, gamma, bool(training), size, argmax)


def spatial_batchnorm_max_pool_backward(dout, cache):
    """Backward pass of :func:`spatial_batchnorm_max_pool_forward`.

    Parameters
    ----------
    dout : ndarray (N, C, H/size, W/size), the gradient of the pooled output

    Returns
    -------
    dx : ndarray (N, C, H, W)
    dgamma, dbeta : ndarray (C,)
    """
    x, mean, inv_std, gamma, training, size, argmax = cache
    N, C, H, W = x.shape
    check_upstream(dout, (N, C, H // size, W // size), x.dtype)
    # Each window's gradient goes to its argmax (max_pool_backward), then batchnorm_backward's
    # compact formula per channel; the kernel does both without the full-size pool gradient.
    return kernels.batchnorm_max_pool_backward(np.ascontiguousarray(dout), argmax, x, mean, inv_std, gamma,
                                               training, size)


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------
def _check_dropout_probability(p):
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a number in [0, 1), got {type(p).__name__} ({p!r})")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    return float(p)


def dropout_forward(x, p, training, rng):
    """Inverted dropout: zero each unit with probability ``p``, scale the rest by 1/(1-p).

    Scaling at training time keeps ``E[out] = x``, so evaluation is the identity
    (no rescaling at test time).

    Parameters
    ----------
    x : ndarray, any shape
    p : float in [0, 1), probability of dropping a unit
    training : bool; when False the output is a copy of ``x``
    rng : numpy.random.Generator, draws the mask (needed only in training
        with p > 0); the same seed gives the same mask

    Returns
    -------
    out : ndarray, shape and dtype of ``x``
    cache : DropoutCache; its mask is ``keep / (1 - p)`` in the dtype of ``x`` (None in eval)
    """
    check_array("x", x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    p = _check_dropout_probability(p)
    if not training or p == 0.0:
        return x.copy(), DropoutCache(x.shape, x.dtype, None)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    keep = rng.random(x.shape) >= p  # float64 draws: the same seed gives the same mask in any dtype
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, DropoutCache(x.shape, x.dtype, mask)


def dropout_backward(dout, cache):
    """Backward pass of :func:`dropout_forward`: ``dx = dout * mask`` (shape of ``x``)."""
    shape, dtype, mask = cache
    check_upstream(dout, shape, dtype)
    return dout.copy() if mask is None else dout * mask


# ----------------------------------------------------------------------------
# Flatten
# ----------------------------------------------------------------------------
def flatten_forward(x):
    """Flatten all but the batch axis: (N, d_1, ..., d_k) -> (N, d_1*...*d_k).

    Returns ``(out, cache)``; ``out`` is a view of ``x`` when ``x`` is contiguous.
    """
    check_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (N, ...), got shape {x.shape}")
    return x.reshape(x.shape[0], -1), FlattenCache(x.shape, x.dtype)


def flatten_backward(dout, cache):
    """Backward pass of :func:`flatten_forward`: reshape ``dout`` (N, D) back to ``x``'s shape."""
    shape, dtype = cache
    check_upstream(dout, (shape[0], int(np.prod(shape[1:]))), dtype)
    return dout.reshape(shape)
