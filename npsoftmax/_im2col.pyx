# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled im2col / col2im kernels (see ``npsoftmax/im2col.py`` for the layout).

Both kernels give one image to each OpenMP thread (``prange`` over the batch):
image ``n`` owns columns ``n*OH*OW ... (n+1)*OH*OW - 1`` of ``cols`` and its own
slice of ``x``, so threads never write the same memory and col2im needs no atomics.

The loops are typed (``Py_ssize_t`` indices, fused float/double memoryviews) and
run without the GIL; no Python object is touched inside them. Callers (the
dispatch in ``im2col.py``) validate shapes and pass C-contiguous arrays.
"""

import numpy as np
from cython.parallel cimport prange

ctypedef fused floating_t:
    float
    double


cdef inline Py_ssize_t _first_valid(Py_ssize_t offset, Py_ssize_t pad, Py_ssize_t stride) noexcept nogil:
    """Smallest output index o with o*stride + offset - pad >= 0."""
    if offset >= pad:
        return 0
    # ceil((pad - offset) / stride) with positive integers
    return (pad - offset + stride - 1) // stride


cdef inline Py_ssize_t _end_valid(Py_ssize_t offset, Py_ssize_t pad, Py_ssize_t stride,
                                  Py_ssize_t size, Py_ssize_t n_out) noexcept nogil:
    """One past the largest output index o with o*stride + offset - pad <= size - 1."""
    cdef Py_ssize_t last = size - 1 + pad - offset
    if last < 0:
        return 0
    last = last // stride + 1
    return last if last < n_out else n_out




def im2col(floating_t[:, :, :, ::1] x, Py_ssize_t kernel_height, Py_ssize_t kernel_width,
           Py_ssize_t stride, Py_ssize_t pad, out=None):
    """x (N, C, H, W) C-contiguous -> cols (C*KH*KW, N*OH*OW), same dtype.

    ``out``, if given, is a C-contiguous array of that shape and dtype that is
    overwritten and returned (reusing one buffer avoids page-faulting a fresh
    allocation of several MiB on every call).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = (H + 2 * pad - kernel_height) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kernel_width) // stride + 1
    dtype = np.float32 if floating_t is float else np.float64
    if out is None:
        out = np.empty((C * kernel_height * kernel_width, N * OH * OW), dtype=dtype)
    cdef floating_t[:, ::1] cols = out
    if cols.shape[0] != C * kernel_height * kernel_width or cols.shape[1] != N * OH * OW:
        raise ValueError(
            f"out must have shape {(C * kernel_height * kernel_width, N * OH * OW)}, "
            f"got {(cols.shape[0], cols.shape[1])}"
        )
    cdef Py_ssize_t n, c, i, j, oh, ow, row, column, h, w0, ow_start, ow_end
    cdef floating_t* destination
    cdef const floating_t* source
    for n in prange(N, nogil=True, schedule="static"):
        for c in range(C):
            for i in range(kernel_height):
                for j in range(kernel_width):
                    row = (c * kernel_height + i) * kernel_width + j
                    # Columns whose input pixel (h, w) is inside the image; the
                    # rest read the zero padding.
                    ow_start = _first_valid(j, pad, stride)
                    ow_end = _end_valid(j, pad, stride, W, OW)
                    for oh in range(OH):
                        column = (n * OH + oh) * OW
                        h = oh * stride + i - pad
                        if h < 0 or h >= H or ow_start >= ow_end:
                            for ow in range(OW):
                                cols[row, column + ow] = 0
                            continue
                        for ow in range(ow_start):
                            cols[row, column + ow] = 0
                        w0 = j - pad
                        if stride == 1:
                            # Unit stride: a plain contiguous copy the compiler vectorises.
                            destination = &cols[row, column]
                            source = &x[n, c, h, 0]
                            for ow in range(ow_start, ow_end):
                                destination[ow] = source[ow + w0]
                        else:
                            for ow in range(ow_start, ow_end):
                                cols[row, column + ow] = x[n, c, h, ow * stride + w0]
                        for ow in range(ow_end, OW):
                            cols[row, column + ow] = 0
    return out


def col2im(floating_t[:, ::1] cols, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
           Py_ssize_t kernel_height, Py_ssize_t kernel_width, Py_ssize_t stride, Py_ssize_t pad):
    """cols (C*KH*KW, N*OH*OW) C-contiguous -> x (N, C, H, W), overlaps summed."""
    cdef Py_ssize_t OH = (H + 2 * pad - kernel_height) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kernel_width) // stride + 1
    dtype = np.float32 if floating_t is float else np.float64
    out = np.zeros((N, C, H, W), dtype=dtype)
    cdef floating_t[:, :, :, ::1] x = out
    cdef Py_ssize_t n, c, i, j, oh, ow, row, column, h, w0, ow_start, ow_end
    for n in prange(N, nogil=True, schedule="static"):
        for c in range(C):
            for i in range(kernel_height):
                for j in range(kernel_width):
                    row = (c * kernel_height + i) * kernel_width + j
                    ow_start = _first_valid(j, pad, stride)
                    ow_end = _end_valid(j, pad, stride, W, OW)
                    w0 = j - pad
                    for oh in range(OH):
                        h = oh * stride + i - pad
                        if h < 0 or h >= H:
                            continue  # gradient of a padding zero is discarded
                        column = (n * OH + oh) * OW
                        for ow in range(ow_start, ow_end):
                            x[n, c, h, ow * stride + w0] += cols[row, column + ow]
    return out
