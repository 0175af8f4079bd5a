"""3x3 convolutions with Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, 2016).

The idea in one dimension. Two outputs of a 3-tap filter g over inputs d0..d3,

    y0 = d0 g0 + d1 g1 + d2 g2,        y1 = d1 g0 + d2 g1 + d3 g2,

take 6 multiplications directly, but only 4 this way:

    m1 = (d0 - d2) g0                  m2 = (d1 + d2) (g0 + g1 + g2) / 2
    m3 = (d2 - d1) (g0 - g1 + g2) / 2  m4 = (d1 - d3) g2
    y0 = m1 + m2 + m3,                 y1 = m2 - m3 - m4.

In matrix form ``y = A^T [(G g) * (B^T d)]`` (``*`` elementwise) with

    B^T = [[1, 0, -1, 0],   G = [[1,    0,   0],   A^T = [[1, 1,  1,  0],
           [0, 1,  1, 0],        [1/2, 1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1, 1, 0],        [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]       [0,    0,   1]]

and nesting it over rows and columns gives a 2x2 block of outputs from a 4x4 input tile:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        16 multiplications instead of 36.

A convolution sums this over input channels, and the sum commutes with ``A^T . A``: with
``U[k] = (G g G^T)[k]`` (16, F, C) for every filter and ``V[k] = (B^T d B)[k]`` (16, C, T)
for every tile t of every image, entry k of every output tile is one matrix product,

    M[k] = U[k] @ V[k]      (F, C) @ (C, T) -> (F, T),   k = 0..15,

and ``Y = A^T M A`` per tile. The 16 products have 36/16 = 2.25 times fewer multiply-adds
than the im2col GEMM ``(F, 9C) @ (9C, 4T)``; the transforms are additions only.

Backward is the chain rule through the same four linear steps, each run backwards:

    dM[k] = (A dY A^T)[k]        output gradient, one 4x4 tile per 2x2 block of dY
    dU[k] = dM[k] @ V[k]^T       (F, T) @ (T, C): the filter gradient, summed over tiles
    dV[k] = U[k]^T @ dM[k]       (C, F) @ (F, T)
    dx   += B dV B^T             per tile, added back onto its 4x4 input pixels
    dw    = G^T dU G             per filter and channel

so the gradients are the exact gradients of the computed forward pass (as with im2col, they
differ from the direct formula only by rounding). The tile transforms are the Cython
kernels in ``_im2col.pyx`` (NumPy references in ``kernels.py``); here are the filter
transforms and the chunked forward/backward that ``functional.conv_forward`` /
``conv_backward`` run for 3x3, stride-1 kernels (``algorithm="auto"`` picks it when the
layer has at least ``MIN_CHANNELS`` input channels and an output of at least
``MIN_OUTPUT_SIZE`` pixels a side: with 3 input channels, as in a first layer, the products
are too thin to gain over one im2col GEMM, and on tiny images the transforms' per-row
overheads dominate).

Rounding: the transforms add and subtract up to 9 values and halve, so float32 results
differ from im2col's by a few units in the last place of the largest terms (2e-7 to 5e-7
relative to the largest output on small random layers; the tests bound the error on 32
channels of O(1) data at 2e-5 and at 4x im2col's own).
"""

from typing import NamedTuple, Optional

import numpy as np

from . import kernels, parallel
from .sections import section

#: ``algorithm="auto"`` uses Winograd for 3x3, stride-1 kernels with at least this many input channels
#: and outputs of at least MIN_OUTPUT_SIZE x MIN_OUTPUT_SIZE pixels (the digits CNN's 4x4 and 2x2
#: layers took its whole step 10-30% longer with Winograd: benchmarks/results/winograd-layer-sizes-20261203.txt).
MIN_CHANNELS = 16
MIN_OUTPUT_SIZE = 8

#: G: the filter transform, U = G g G^T for a 3x3 filter g.
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)


class WinogradCache(NamedTuple):
    """What :func:`forward` keeps for :func:`backward`. Training keeps ``V`` (the transformed
    tiles of the batch); inference keeps ``x`` and a backward recomputes ``V`` a chunk at a time."""
    x_shape: tuple               # (N, C, H, W)
    V: Optional[np.ndarray]      # (16, C, N*TH*TW) or None
    U: np.ndarray                # (16, F, C), the transformed filters
    w: np.ndarray                # (F, C, 3, 3)
    pad: int
    has_bias: bool
    x: Optional[np.ndarray]      # (N, C, H, W) or None


def applies(w_shape, stride):
    """True when a kernel of shape ``w_shape`` (F, C, KH, KW) with ``stride`` can use F(2x2, 3x3)."""
    return tuple(w_shape[2:]) == (3, 3) and stride == 1


def filter_transform(w):
    """w (F, C, 3, 3) -> U (16, F, C), ``U[4*a + b, f, c] = (G w[f, c] G^T)[a, b]``."""
    U = G.astype(w.dtype) @ w @ G.T.astype(w.dtype)  # (F, C, 4, 4)
    return np.ascontiguousarray(U.transpose(2, 3, 0, 1)).reshape(16, *w.shape[:2])


def filter_transform_backward(dU):
    """dU (16, F, C) -> dw (F, C, 3, 3): the adjoint of :func:`filter_transform`, ``G^T dU G``."""
    F, C = dU.shape[1:]
    dU = dU.reshape(4, 4, F, C).transpose(2, 3, 0, 1)
    return np.ascontiguousarray(G.T.astype(dU.dtype) @ dU @ G.astype(dU.dtype))


def buffer_shape(x_shape, pad):
    """Shape (16, C, N*TH*TW) of the transformed tiles that training keeps for the backward pass."""
    N, C, H, W = x_shape
    TH, TW = kernels.winograd_tiles(H, W, pad)
    return (16, C, N * TH * TW)


def _chunk_size(x_shape, F, pad, itemsize):
    """Images per chunk: about ``functional.CONV_CHUNK_BYTES`` of transformed tiles and products
    (16 rows per input and per output channel, one column per tile), as the im2col path sizes
    its columns."""
    from .functional import _images_per_chunk  # here: functional imports this module

    N, C, H, W = x_shape
    TH, TW = kernels.winograd_tiles(H, W, pad)
    return parallel.chunk_size(N, _images_per_chunk(N, TH * TW, 16 * (C + F), itemsize))


def forward(x, w, b, pad, *, V_out=None, keep_tiles=True):
    """Forward pass of a 3x3, stride-1 convolution (arguments already validated by
    ``functional.conv_forward``): x (N, C, H, W) -> out (N, F, H + 2*pad - 2, W + 2*pad - 2).

    ``V_out`` is an optional buffer of :func:`buffer_shape` from ``kernels.winograd_slabs`` to keep
    the tiles in (the caller must not reuse it before the matching backward). Returns ``(out, cache)``.
    """
    N, C, H, W = x.shape
    F = w.shape[0]
    OH, OW = H + 2 * pad - 2, W + 2 * pad - 2
    TH, TW = kernels.winograd_tiles(H, W, pad)
    T = TH * TW  # tiles per image
    U = filter_transform(w)
    V = None
    if keep_tiles:
        V = kernels.winograd_slabs(C, N * T, x.dtype) if V_out is None else V_out
    out = kernels.empty((N, F, OH, OW), x.dtype)

    # Chunks of images, as in the im2col path: each chunk's tiles are transformed, multiplied
    # and transformed back while they are in cache, one chunk per task of the thread pool.
    def forward_chunk(start, stop):
        images = stop - start
        if keep_tiles:
            tiles, first = V, start * T
        else:  # inference: this chunk's tiles only
            tiles, first = kernels.winograd_slabs(C, images * T, x.dtype), 0
        with section("winograd transforms"):
            kernels.winograd_input_transform(x[start:stop], pad, tiles, first)
        with section("conv GEMM"):
            products = np.matmul(U, tiles[:, :, first:first + images * T],
                                 out=kernels.winograd_slabs(F, images * T, x.dtype))
        with section("winograd transforms"):
            kernels.winograd_output_transform(products, out[start:stop], b)

    parallel.map_chunks(forward_chunk, N, _chunk_size(x.shape, F, pad, x.itemsize))
    return out, WinogradCache(x.shape, V, U, w, pad, b is not None, None if keep_tiles else x)


def backward(dout, cache, input_gradient=True):
    """Backward pass of :func:`forward`: dout (N, F, OH, OW) (validated by the caller) ->
    (dx (N, C, H, W) or None, dw (F, C, 3, 3), db (F,) or None)."""
    x_shape, V, U, w, pad, has_bias, x = cache
    N, C, H, W = x_shape
    F = w.shape[0]
    TH, TW = kernels.winograd_tiles(H, W, pad)
    T = TH * TW
    dout = np.ascontiguousarray(dout)
    dx = kernels.empty(x_shape, w.dtype) if input_gradient else None
    U_t = U.transpose(0, 2, 1)  # (16, C, F) view: BLAS reads it transposed, nothing is copied

    def backward_chunk(start, stop):
        images = stop - start
        d_products = kernels.winograd_slabs(F, images * T, w.dtype)
        db_part = np.empty(F, dtype=w.dtype)
        with section("winograd transforms"):
            kernels.winograd_output_gradient(dout[start:stop], d_products, db_part)
            if V is None:  # inference forward: recompute this chunk's tiles
                tiles = kernels.winograd_input_transform(x[start:stop], pad,
                                                         kernels.winograd_slabs(C, images * T, w.dtype))
            else:
                tiles = V[:, :, start * T:stop * T]
        with section("conv GEMM"):
            dU_part = np.matmul(d_products, tiles.transpose(0, 2, 1))  # (16, F, C), summed over tiles
            d_tiles = (np.matmul(U_t, d_products, out=kernels.winograd_slabs(C, images * T, w.dtype))
                       if input_gradient else None)
        if input_gradient:
            with section("winograd transforms"):
                kernels.winograd_input_gradient(d_tiles, pad, dx[start:stop])
        return dU_part, db_part

    parts = parallel.map_chunks(backward_chunk, N, _chunk_size(x_shape, F, pad, w.itemsize))
    # The batch sums, added in chunk order (the same result whichever thread ran which chunk).
    dU, db = parts[0]
    for dU_part, db_part in parts[1:]:
        dU += dU_part
        db += db_part
    return dx, filter_transform_backward(dU), (db if has_bias else None)
