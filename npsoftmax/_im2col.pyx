# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled kernels of a training step (see ``npsoftmax/kernels.py`` for the dispatch
and the NumPy reference of each).

* im2col / col2im (the layout is explained in ``kernels.py``). im2col gives one
  row of ``cols`` (one channel c and kernel offset (i, j)) at a time to each OpenMP
  thread (``prange`` over the rows) and fills it image after image, so every thread
  writes one long contiguous run; col2im gives one channel at a time to each thread:
  the channel's planes of every image are written by that thread only, so no two
  threads write the same memory and col2im needs no atomics. (Looping over images
  outermost instead scatters each image's short blocks over all C*KH*KW rows: 3.5x
  slower for 64 channels of 8x8 images, where a block is 64 values.)
* the four tile transforms of Winograd's F(2x2, 3x3) (``npsoftmax/winograd.py``), one
  channel per task, their vectorised row loops in ``_winograd_rows.h``;
* max pooling over windows that tile the input, with the argmax recorded in the
  forward pass and used to route the gradient in the backward pass;
* ReLU backward; batch-norm statistics, normalisation and backward, per channel
  on NCHW arrays; the axis swap that turns GEMM rows into NCHW and back;
* the hierarchical head's tree paths (a walk up the parent pointers per sample) and its
  row-sparse products (dot products of gathered rows, read in place, and their adjoint).

The loops are typed (``Py_ssize_t`` indices, fused float/double memoryviews) and
run without the GIL; no Python object is touched inside them. Callers (the
dispatch in ``kernels.py``) validate shapes and pass contiguous arrays.
"""

import numpy as np
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

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




cdef inline void _im2col_same_width_block(const floating_t* plane, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                          Py_ssize_t i, Py_ssize_t j, Py_ssize_t pad,
                                          floating_t* destination) noexcept nogil:
    """Kernel offset (i, j) of one image channel, when stride is 1 and OW == W.

    Then destination[k] = plane[k + shift] with shift = (i - pad)*W + (j - pad)
    for every pixel k = oh*W + ow whose source is inside the image: the whole
    block is ONE contiguous copy instead of OH short row copies (rows of 8 or
    16 values are mostly loop overhead). The copy also carries values from the
    neighbouring row into the columns that should read the left/right padding;
    those few are overwritten with zeros afterwards.
    """
    cdef Py_ssize_t oh, ow, first, last, low, high, shift = (i - pad) * W + (j - pad)
    cdef Py_ssize_t oh_start = _first_valid(i, pad, 1), oh_end = _end_valid(i, pad, 1, H, OH)
    cdef Py_ssize_t ow_start = _first_valid(j, pad, 1), ow_end = _end_valid(j, pad, 1, W, W)
    if oh_start >= oh_end or ow_start >= ow_end:
        memset(destination, 0, OH * W * sizeof(floating_t))
        return
    memset(destination, 0, oh_start * W * sizeof(floating_t))  # rows that read the top padding
    memset(destination + oh_end * W, 0, (OH - oh_end) * W * sizeof(floating_t))  # ... the bottom padding
    first = oh_start * W
    last = oh_end * W
    # Never read outside the plane: the skipped ends are padding columns, zeroed below.
    low = first if first + shift >= 0 else -shift
    high = last if last + shift <= H * W else H * W - shift
    memcpy(destination + low, plane + low + shift, (high - low) * sizeof(floating_t))
    # Padding columns, one strided pass each (a short loop per row would become a
    # memset call per row: a function call to write one or two values).
    for ow in range(ow_start):
        for oh in range(oh_start, oh_end):
            destination[oh * W + ow] = 0
    for ow in range(ow_end, W):
        for oh in range(oh_start, oh_end):
            destination[oh * W + ow] = 0


def im2col(floating_t[:, :, :, ::1] x, Py_ssize_t kernel_height, Py_ssize_t kernel_width,
           Py_ssize_t stride, Py_ssize_t pad, out=None):
    """x (N, C, H, W) C-contiguous -> cols (C*KH*KW, N*OH*OW), same dtype.

    ``out``, if given, is an array of that shape and dtype whose rows are
    contiguous (it may be a column block of a bigger buffer); it is overwritten
    and returned. Reusing one buffer avoids page-faulting a fresh allocation of
    several MiB on every call.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = (H + 2 * pad - kernel_height) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kernel_width) // stride + 1
    dtype = np.float32 if floating_t is float else np.float64
    if out is None:
        out = np.empty((C * kernel_height * kernel_width, N * OH * OW), dtype=dtype)
    cdef floating_t[:, :] cols = out
    if cols.shape[0] != C * kernel_height * kernel_width or cols.shape[1] != N * OH * OW:
        raise ValueError(
            f"out must have shape {(C * kernel_height * kernel_width, N * OH * OW)}, "
            f"got {(cols.shape[0], cols.shape[1])}"
        )
    if cols.shape[1] > 1 and cols.strides[1] != sizeof(floating_t):
        raise ValueError(f"out must have contiguous rows, got strides {tuple(out.strides)}")
    cdef Py_ssize_t n, c, i, j, oh, ow, row, h, w0, ow_start, ow_end, KK = kernel_height * kernel_width
    cdef floating_t* destination
    cdef const floating_t* source
    # "Same" convolutions (stride 1, output as wide as the input) take the block path below.
    cdef bint same_width = stride == 1 and OW == W
    for row in prange(C * KK, nogil=True, schedule="dynamic"):
        # row = (c * KH + i) * KW + j: channel c, kernel offset (i, j).
        c = row // KK
        i = (row - c * KK) // kernel_width
        j = row - c * KK - i * kernel_width
        # Columns whose input pixel (h, w) is inside the image; the rest read the zero padding.
        ow_start = _first_valid(j, pad, stride)
        ow_end = _end_valid(j, pad, stride, W, OW)
        w0 = j - pad
        for n in range(N):
            if same_width:
                _im2col_same_width_block(&x[n, c, 0, 0], H, W, OH, i, j, pad, &cols[row, n * OH * OW])
                continue
            for oh in range(OH):
                # This row's OW columns of output row oh of image n: contiguous.
                destination = &cols[row, (n * OH + oh) * OW]
                h = oh * stride + i - pad
                if h < 0 or h >= H or ow_start >= ow_end:
                    for ow in range(OW):
                        destination[ow] = 0
                    continue
                for ow in range(ow_start):
                    destination[ow] = 0
                source = &x[n, c, h, 0]
                if stride == 1:
                    # Unit stride: a plain contiguous copy the compiler vectorises.
                    for ow in range(ow_start, ow_end):
                        destination[ow] = source[ow + w0]
                else:
                    for ow in range(ow_start, ow_end):
                        destination[ow] = source[ow * stride + w0]
                for ow in range(ow_end, OW):
                    destination[ow] = 0
    return out


def col2im(floating_t[:, :] cols, Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
           Py_ssize_t kernel_height, Py_ssize_t kernel_width, Py_ssize_t stride, Py_ssize_t pad, out=None):
    """cols (C*KH*KW, N*OH*OW), rows contiguous -> x (N, C, H, W), overlaps summed.

    ``out``, if given, is a C-contiguous (N, C, H, W) array of the same dtype that
    is overwritten and returned (each thread zeroes its own channels first).
    """
    cdef Py_ssize_t OH = (H + 2 * pad - kernel_height) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kernel_width) // stride + 1
    dtype = np.float32 if floating_t is float else np.float64
    if out is None:
        out = np.empty((N, C, H, W), dtype=dtype)
    cdef floating_t[:, :, :, ::1] x = out
    if x.shape[0] != N or x.shape[1] != C or x.shape[2] != H or x.shape[3] != W:
        raise ValueError(f"out must have shape {(N, C, H, W)}, got {tuple(out.shape)}")
    if cols.shape[0] != C * kernel_height * kernel_width or cols.shape[1] != N * OH * OW:
        raise ValueError(
            f"cols must have shape {(C * kernel_height * kernel_width, N * OH * OW)}, "
            f"got {(cols.shape[0], cols.shape[1])}"
        )
    if cols.shape[1] > 1 and cols.strides[1] != sizeof(floating_t):
        raise ValueError(f"cols must have contiguous rows, got strides {tuple(cols.strides)}")
    cdef Py_ssize_t n, c, i, j, oh, ow, row, column, h, w0, ow_start, ow_end
    cdef floating_t* destination
    cdef const floating_t* source
    for c in prange(C, nogil=True, schedule="dynamic"):
        # Channel c of every image belongs to this thread: zero it, then add the
        # KH*KW rows of cols that were copied from it (in (i, j) order, as before).
        for n in range(N):
            memset(&x[n, c, 0, 0], 0, H * W * sizeof(floating_t))
        for i in range(kernel_height):
            for j in range(kernel_width):
                row = (c * kernel_height + i) * kernel_width + j
                ow_start = _first_valid(j, pad, stride)
                ow_end = _end_valid(j, pad, stride, W, OW)
                w0 = j - pad
                for n in range(N):
                    for oh in range(OH):
                        h = oh * stride + i - pad
                        if h < 0 or h >= H:
                            continue  # gradient of a padding zero is discarded
                        column = (n * OH + oh) * OW
                        if stride == 1:
                            # Unit stride: a contiguous add the compiler vectorises.
                            if ow_start < ow_end:
                                destination = &x[n, c, h, ow_start + w0]
                                source = &cols[row, column + ow_start]
                                for ow in range(ow_end - ow_start):
                                    destination[ow] += source[ow]
                        else:
                            for ow in range(ow_start, ow_end):
                                x[n, c, h, ow * stride + w0] += cols[row, column + ow]
    return out


# ----------------------------------------------------------------------------
# Max pooling over windows that tile the input (stride == size)
#
# The elementwise kernels below share one shape: ``prange`` over independent
# blocks (planes, rows, chunks), and a plain C loop over raw pointers inside,
# written without data-dependent branches (a select, not an ``if``): on random
# activations a branch is mispredicted half the time, which costs more than
# the memory traffic.
#
# Scheduling is "dynamic": threads take tasks of about CHUNK elements from a
# shared counter as they become free, so a thread that starts late (the OS ran
# something else on its core) does less of the work instead of a fixed half.
# Every parallel region still ends by waiting for all its threads, which is why
# idle threads must not spin (see OMP_WAIT_POLICY in kernels.py).
# ----------------------------------------------------------------------------
cdef enum:
    CHUNK = 16384  # elements per parallel task of the elementwise loops (64 KiB of float32)


cdef inline Py_ssize_t _rows_per_task(Py_ssize_t row_length) noexcept nogil:
    """How many rows of ``row_length`` elements make one task of about CHUNK elements."""
    return CHUNK // row_length if row_length < CHUNK else 1


cdef inline void _max_pool_output_row(const floating_t* x, Py_ssize_t W, Py_ssize_t size, Py_ssize_t OW,
                                      floating_t* out, int* argmax) noexcept nogil:
    """One output row: x points at the first of the ``size`` input rows it covers."""
    cdef Py_ssize_t ow, i, j, k
    cdef const floating_t* corner
    cdef floating_t best, value
    cdef int best_index, take
    cdef bint nan_seen
    for ow in range(OW):
        corner = x + ow * size
        best = corner[0]
        best_index = 0
        nan_seen = False
        for i in range(size):
            for j in range(size):
                value = corner[i * W + j]
                # Strictly greater keeps the first maximum. Written as arithmetic on the
                # comparison (0 or 1) and a "value > best ? value : best" (one maxss
                # instruction), so the compiler emits no branch to mispredict.
                take = value > best
                best_index += take * (<int>(i * size + j) - best_index)
                best = value if value > best else best
                nan_seen = nan_seen | (value != value)
        if nan_seen:
            # Rare, so this branch is predicted: the first NaN is the max (numpy.argmax).
            for k in range(size * size - 1, -1, -1):
                value = corner[(k // size) * W + k % size]
                if value != value:
                    best_index = <int>k
                    best = value
        out[ow] = best
        argmax[ow] = best_index


cdef inline bint _max_pool_2x2_output_row(const floating_t* top, const floating_t* bottom, Py_ssize_t OW,
                                          floating_t* out, int* argmax) noexcept nogil:
    """The common 2x2 case of one output row, as a tournament the compiler vectorises
    across ``ow``: max(a, b) and max(c, d), then the larger of the two. Every
    comparison is strict, so ties keep the earlier element, as the sequential scan
    does. Returns True if the rows held a NaN (the caller then redoes the row with
    the general loop, which follows numpy.argmax for NaN)."""
    cdef Py_ssize_t ow
    cdef floating_t a, b, c, d, top_best, bottom_best
    cdef int top_index, bottom_index, take
    cdef bint nan_seen = False
    for ow in range(OW):
        a = top[2 * ow]
        b = top[2 * ow + 1]
        c = bottom[2 * ow]
        d = bottom[2 * ow + 1]
        nan_seen = nan_seen | (a != a) | (b != b) | (c != c) | (d != d)
        top_index = b > a
        top_best = b if b > a else a
        bottom_index = 2 + (d > c)
        bottom_best = d if d > c else c
        take = bottom_best > top_best
        out[ow] = bottom_best if bottom_best > top_best else top_best
        argmax[ow] = top_index + take * (bottom_index - top_index)
    return nan_seen


def max_pool_tiled_forward(floating_t[:, :, ::1] x, Py_ssize_t size, floating_t[:, :, ::1] out,
                           int[:, :, ::1] argmax):
    """x (P, H, W) planes (P = N*C), H and W multiples of ``size`` -> fills
    out (P, H/size, W/size) with each window's max and argmax with its index
    ``i*size + j`` inside the window (the first maximum in row-major order; a NaN
    counts as the maximum, as in ``numpy.argmax``)."""
    cdef Py_ssize_t P = x.shape[0], W = x.shape[2], OH = out.shape[1], OW = out.shape[2]
    cdef Py_ssize_t row, p, oh
    for row in prange(P * OH, nogil=True, schedule="dynamic", chunksize=_rows_per_task(size * W)):
        p = row // OH
        oh = row - p * OH
        if size != 2 or _max_pool_2x2_output_row(&x[p, 2 * oh, 0], &x[p, 2 * oh + 1, 0], OW, &out[p, oh, 0],
                                                 &argmax[p, oh, 0]):
            _max_pool_output_row(&x[p, oh * size, 0], W, size, OW, &out[p, oh, 0], &argmax[p, oh, 0])


cdef inline void _max_pool_gradient_band(const floating_t* dout, const int* argmax, Py_ssize_t size,
                                         Py_ssize_t OW, Py_ssize_t W, floating_t* dx) noexcept nogil:
    """One band of ``size`` rows of dx under one output row: zero it, then put each
    window's gradient at its argmax (a store at a computed address, no branch)."""
    cdef Py_ssize_t k, ow
    cdef int offset
    for k in range(size * W):
        dx[k] = 0
    for ow in range(OW):
        offset = argmax[ow]
        dx[(offset // size) * W + ow * size + offset % size] = dout[ow]


def max_pool_tiled_backward(floating_t[:, :, ::1] dout, int[:, :, ::1] argmax, Py_ssize_t size,
                            floating_t[:, :, ::1] dx):
    """dout, argmax (P, OH, OW) -> fills dx (P, OH*size, OW*size): each window's
    gradient goes to its argmax, the other elements get 0. The windows tile dx,
    so each band of rows is finished by one thread (no atomics, no second pass)."""
    cdef Py_ssize_t P = dout.shape[0], OH = dout.shape[1], OW = dout.shape[2], W = dx.shape[2]
    cdef Py_ssize_t row, p, oh
    for row in prange(P * OH, nogil=True, schedule="dynamic", chunksize=_rows_per_task(size * W)):
        p = row // OH
        oh = row - p * OH
        _max_pool_gradient_band(&dout[p, oh, 0], &argmax[p, oh, 0], size, OW, W, &dx[p, oh * size, 0])


# ----------------------------------------------------------------------------
# ReLU backward
# ----------------------------------------------------------------------------
cdef inline void _relu_backward_run(const floating_t* dout, const floating_t* x, floating_t* dx,
                                    Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating_t gradient, value
    for i in range(n):
        gradient = dout[i]
        value = x[i]
        dx[i] = gradient if value > 0 else 0


def relu_backward(floating_t[::1] dout, floating_t[::1] x, floating_t[::1] dx):
    """Flat arrays of one length: dx = dout where x > 0, else 0 (also for NaN x)."""
    cdef Py_ssize_t n = x.shape[0], chunk, start
    for chunk in prange((n + CHUNK - 1) // CHUNK, nogil=True, schedule="dynamic"):
        start = chunk * CHUNK
        _relu_backward_run(&dout[start], &x[start], &dx[start], min(CHUNK, n - start))


# ----------------------------------------------------------------------------
# Batch norm over (N, L) per channel, arrays viewed as (N, C, L), L = H*W
# ----------------------------------------------------------------------------
# Per-channel sums over LANES independent accumulators: lane k sums elements
# k, k + LANES, k + 2*LANES, ... of a row. The lanes never depend on each other,
# so the compiler turns the fixed-size inner loop into vector adds (reordering a
# single floating-point sum is not allowed without -ffast-math). Each lane adds
# at most L / LANES values of one (n, c) row in the array's dtype; the row totals
# are then accumulated in double, so even a million float32 values sum accurately.
cdef enum:
    LANES = 16
    HALF_LANES = 8


cdef inline double _total(floating_t* lanes) noexcept nogil:
    """Pairwise sum of the LANES accumulators, in double."""
    cdef double pairs[HALF_LANES]
    cdef Py_ssize_t k, width = HALF_LANES
    for k in range(width):
        pairs[k] = <double>lanes[k] + <double>lanes[k + width]
    while width > 1:
        width //= 2
        for k in range(width):
            pairs[k] = pairs[k] + pairs[k + width]
    return pairs[0]


cdef inline double _channel_sum(floating_t[:, :, ::1] a, Py_ssize_t c, floating_t shift) noexcept nogil:
    """sum over n, l of (a[n, c, l] - shift)."""
    cdef Py_ssize_t N = a.shape[0], L = a.shape[2], n, l, k
    cdef floating_t lanes[LANES]
    cdef const floating_t* row
    cdef double total = 0
    for n in range(N):
        row = &a[n, c, 0]
        for k in range(LANES):
            lanes[k] = 0
        l = 0
        while l + LANES <= L:
            for k in range(LANES):
                lanes[k] += row[l + k] - shift
            l += LANES
        while l < L:
            lanes[0] += row[l] - shift
            l += 1
        total += _total(lanes)
    return total


cdef inline double _channel_sum_of_squares(floating_t[:, :, ::1] a, Py_ssize_t c, floating_t shift) noexcept nogil:
    """sum over n, l of (a[n, c, l] - shift)**2."""
    cdef Py_ssize_t N = a.shape[0], L = a.shape[2], n, l, k
    cdef floating_t lanes[LANES]
    cdef floating_t deviation
    cdef const floating_t* row
    cdef double total = 0
    for n in range(N):
        row = &a[n, c, 0]
        for k in range(LANES):
            lanes[k] = 0
        l = 0
        while l + LANES <= L:
            for k in range(LANES):
                deviation = row[l + k] - shift
                lanes[k] += deviation * deviation
            l += LANES
        while l < L:
            deviation = row[l] - shift
            lanes[0] += deviation * deviation
            l += 1
        total += _total(lanes)
    return total


cdef inline void _channel_sum_and_dot(floating_t[:, :, ::1] a, floating_t[:, :, ::1] b, Py_ssize_t c,
                                     floating_t shift, double* sum_a, double* dot_ab) noexcept nogil:
    """sum over n, l of a[n, c, l], and of a[n, c, l] * (b[n, c, l] - shift), in one pass over memory."""
    cdef Py_ssize_t N = a.shape[0], L = a.shape[2], n, l, k
    cdef floating_t sums[LANES]
    cdef floating_t dots[LANES]
    cdef const floating_t* row_a
    cdef const floating_t* row_b
    cdef double total_sum = 0, total_dot = 0
    for n in range(N):
        row_a = &a[n, c, 0]
        row_b = &b[n, c, 0]
        for k in range(LANES):
            sums[k] = 0
            dots[k] = 0
        l = 0
        while l + LANES <= L:
            for k in range(LANES):
                sums[k] += row_a[l + k]
                dots[k] += row_a[l + k] * (row_b[l + k] - shift)
            l += LANES
        while l < L:
            sums[0] += row_a[l]
            dots[0] += row_a[l] * (row_b[l] - shift)
            l += 1
        total_sum += _total(sums)
        total_dot += _total(dots)
    sum_a[0] = total_sum
    dot_ab[0] = total_dot


def batchnorm_statistics(floating_t[:, :, ::1] x, floating_t[::1] mean, floating_t[::1] var):
    """x (N, C, L) -> fills mean (C,) and the biased variance var (C,) over (N, L).

    Two passes per channel (mean, then the mean squared deviation from it),
    accumulated in double: no cancellation as in E[x^2] - E[x]^2. One thread
    per channel; the channel's N*L values are reread from cache, not memory.
    """
    cdef Py_ssize_t C = x.shape[1], c
    cdef double count = <double>x.shape[0] * x.shape[2], channel_mean
    for c in prange(C, nogil=True, schedule="dynamic"):
        channel_mean = _channel_sum(x, c, 0) / count
        mean[c] = <floating_t>channel_mean
        # Deviations from the mean rounded to x's dtype: exact enough, and the
        # squares of small deviations are where the variance's precision lives.
        var[c] = <floating_t>(_channel_sum_of_squares(x, c, <floating_t>channel_mean) / count)


cdef inline void _normalize_run(const floating_t* x, floating_t mean, floating_t inv_std, floating_t gamma,
                                floating_t beta, floating_t* out, Py_ssize_t L) noexcept nogil:
    cdef Py_ssize_t l
    for l in range(L):
        out[l] = gamma * ((x[l] - mean) * inv_std) + beta


def batchnorm_normalize(floating_t[:, :, ::1] x, floating_t[::1] mean, floating_t[::1] inv_std,
                        floating_t[::1] gamma, floating_t[::1] beta, floating_t[:, :, ::1] out):
    """x (N, C, L) -> fills out = gamma * xhat + beta with xhat = (x - mean) * inv_std (per channel).

    xhat itself is not stored: the backward pass recomputes it from x, which
    reads as much memory as reading a stored xhat and saves writing one.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2], row, n, c
    for row in prange(N * C, nogil=True, schedule="dynamic", chunksize=_rows_per_task(L)):
        n = row // C
        c = row - n * C
        _normalize_run(&x[n, c, 0], mean[c], inv_std[c], gamma[c], beta[c], &out[n, c, 0], L)


cdef inline void _batchnorm_gradient_run(const floating_t* dout, const floating_t* x, floating_t scale,
                                         bint training, floating_t mean, floating_t mean_dout,
                                         floating_t slope, floating_t* dx, Py_ssize_t L) noexcept nogil:
    cdef Py_ssize_t l
    if training:
        for l in range(L):
            dx[l] = scale * (dout[l] - mean_dout - (x[l] - mean) * slope)
    else:
        for l in range(L):
            dx[l] = scale * dout[l]


cdef inline void _parameter_gradients(double* sum_dout, double* sum_dout_xhat, floating_t inv_std,
                                      floating_t* dbeta, floating_t* dgamma) noexcept nogil:
    """One channel's dbeta = sum dout and dgamma = sum dout * xhat from sum dout and
    sum dout * (x - mean): the second sum is scaled by inv_std in place (the dx pass uses it)."""
    sum_dout_xhat[0] = sum_dout_xhat[0] * inv_std
    dbeta[0] = <floating_t>sum_dout[0]
    dgamma[0] = <floating_t>sum_dout_xhat[0]


def batchnorm_backward(floating_t[:, :, ::1] dout, floating_t[:, :, ::1] x, floating_t[::1] mean,
                       floating_t[::1] inv_std, floating_t[::1] gamma, bint training,
                       floating_t[:, :, ::1] dx, floating_t[::1] dgamma, floating_t[::1] dbeta):
    """dout, x (N, C, L) with the forward's mean and inv_std (C,) -> fills dx (N, C, L),
    dgamma and dbeta (C,).

    With xhat = (x - mean) * inv_std: dbeta = sum dout, dgamma = sum dout * xhat
    (over N and L). In training (M = N*L values per channel, see
    ``functional.batchnorm_backward``)::

        dx = gamma * inv_std * (dout - dbeta / M - xhat * dgamma / M)

    and in eval, where mean and inv_std are constants, dx = gamma * inv_std * dout.
    """
    cdef Py_ssize_t N = dout.shape[0], C = dout.shape[1], L = dout.shape[2], row, n, c
    cdef double count = <double>N * L
    cdef double[::1] sum_dout = np.empty(C), sum_dout_xhat = np.empty(C)
    for c in prange(C, nogil=True, schedule="dynamic"):
        _channel_sum_and_dot(dout, x, c, mean[c], &sum_dout[c], &sum_dout_xhat[c])
        _parameter_gradients(&sum_dout[c], &sum_dout_xhat[c], inv_std[c], &dbeta[c], &dgamma[c])
    for row in prange(N * C, nogil=True, schedule="dynamic", chunksize=_rows_per_task(L)):
        n = row // C
        c = row - n * C
        # xhat * dgamma / M = (x - mean) * (inv_std * dgamma / M): one multiply per element.
        _batchnorm_gradient_run(
            &dout[n, c, 0], &x[n, c, 0], gamma[c] * inv_std[c], training, mean[c],
            <floating_t>(sum_dout[c] / count), <floating_t>(inv_std[c] * sum_dout_xhat[c] / count), &dx[n, c, 0], L,
        )


# ----------------------------------------------------------------------------
# Batch norm followed by a tiled max pool, as one pass each way
# ----------------------------------------------------------------------------
# The default CNN's blocks are conv -> batch norm -> 2x2 max pool -> ReLU. Run apart, the
# batch norm writes its full-size output y and the pool reads it back; backward, the pool
# writes a full-size gradient that is zero in 3 of every 4 places and the batch norm reads
# it twice. Fused: the forward normalises the `size` input rows under one output row into a
# small per-thread buffer and pools that (the same formula and the same row functions as the
# two kernels apart: identical numbers); the backward takes the pooled gradient and argmax and
# never builds the sparse full-size gradient.

def batchnorm_max_pool_forward(floating_t[:, :, ::1] x, floating_t[::1] mean, floating_t[::1] inv_std,
                               floating_t[::1] gamma, floating_t[::1] beta, Py_ssize_t size, Py_ssize_t W,
                               floating_t[:, :, ::1] out, int[:, :, ::1] argmax):
    """x (N, C, H*W) -> out, argmax (N, C, OH*OW) with OH = H/size, OW = W/size: the max pool of
    gamma * (x - mean) * inv_std + beta (per channel) over size x size windows that tile the
    image, and each window's argmax i*size + j (batchnorm_normalize then max_pool_tiled_forward,
    without storing the normalised image). Returns 1 if a thread found no memory for its buffer."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], OW = W // size, OH = x.shape[2] // (size * W)
    cdef Py_ssize_t plane, n, c, oh, i
    cdef floating_t* band
    cdef const floating_t* image
    cdef floating_t* pooled
    cdef int* where
    cdef int failed = 0
    with nogil, parallel():
        band = <floating_t*>malloc(size * W * sizeof(floating_t))
        for plane in prange(N * C, schedule="dynamic", chunksize=_rows_per_task(x.shape[2])):
            if band == NULL:
                failed += 1
                continue
            n = plane // C
            c = plane - n * C
            for oh in range(OH):
                image = &x[n, c, oh * size * W]
                pooled = &out[n, c, oh * OW]
                where = &argmax[n, c, oh * OW]
                for i in range(size):
                    _normalize_run(image + i * W, mean[c], inv_std[c], gamma[c], beta[c], band + i * W, W)
                if size != 2 or _max_pool_2x2_output_row(band, band + W, OW, pooled, where):
                    _max_pool_output_row(band, W, size, OW, pooled, where)
        free(band)
    return 1 if failed else 0


cdef enum:
    MAX_WINDOW = 64  # the fused backward's offset table: windows up to 8 x 8


cdef inline void _pooled_sum_and_dot(floating_t[:, :, ::1] dout, int[:, :, ::1] argmax,
                                     floating_t[:, :, ::1] x, Py_ssize_t c, Py_ssize_t size, Py_ssize_t W,
                                     const Py_ssize_t* window_offset, floating_t mean, double* sum_dout,
                                     double* sum_dout_x) noexcept nogil:
    """sum of dout and of dout * (x - mean) at each window's argmax, over one channel.
    window_offset[i*size + j] = i*W + j: where a window's element lies from its corner."""
    cdef Py_ssize_t N = dout.shape[0], OW = W // size, OH = dout.shape[2] // OW, n, oh, ow
    cdef double total = 0, total_dot = 0
    cdef floating_t row_total, row_dot
    cdef const floating_t* g
    cdef const int* where
    cdef const floating_t* band
    for n in range(N):
        for oh in range(OH):
            g = &dout[n, c, oh * OW]
            where = &argmax[n, c, oh * OW]
            band = &x[n, c, oh * size * W]
            row_total = 0
            row_dot = 0
            for ow in range(OW):
                row_total = row_total + g[ow]
                row_dot = row_dot + g[ow] * (band[ow * size + window_offset[where[ow]]] - mean)
            total += row_total
            total_dot += row_dot
    sum_dout[0] = total
    sum_dout_x[0] = total_dot


def batchnorm_max_pool_backward(floating_t[:, :, ::1] dout, int[:, :, ::1] argmax, floating_t[:, :, ::1] x,
                                floating_t[::1] mean, floating_t[::1] inv_std, floating_t[::1] gamma,
                                bint training, Py_ssize_t size, Py_ssize_t W,
                                floating_t[:, :, ::1] dx, floating_t[::1] dgamma, floating_t[::1] dbeta):
    """The backward of batchnorm_max_pool_forward from the pooled gradient dout and argmax
    (N, C, OH*OW) and the forward's x (N, C, H*W): fills dx (N, C, H*W), dgamma, dbeta (C,).
    Windows of at most 8 x 8 (MAX_WINDOW elements).

    The full-size gradient the pool would pass on is d = dout at each window's argmax, 0 elsewhere,
    so batchnorm_backward's sums over d are sums over dout (one term per window), and its
    dx = gamma * inv_std * (d - dbeta / M - xhat * dgamma / M) is written band by band: first with
    d = 0 everywhere, then the argmax element of each window again with d = dout.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], L = dx.shape[2], OW = W // size, OH = L // (size * W)
    cdef Py_ssize_t plane, n, c, oh, ow, k
    cdef Py_ssize_t window_offset[MAX_WINDOW]
    cdef double count = <double>N * L
    cdef double[::1] sum_dout = np.empty(C), sum_dout_xhat = np.empty(C)
    cdef floating_t scale, mean_dout, slope, shift
    cdef floating_t* band
    cdef const floating_t* image
    cdef const floating_t* g
    cdef const int* where
    if size * size > MAX_WINDOW:
        raise ValueError(f"batchnorm_max_pool_backward: windows of at most 8 x 8, got size={size}")
    for k in range(size * size):
        window_offset[k] = (k // size) * W + k % size
    for c in prange(C, nogil=True, schedule="dynamic"):
        _pooled_sum_and_dot(dout, argmax, x, c, size, W, window_offset, mean[c], &sum_dout[c], &sum_dout_xhat[c])
        _parameter_gradients(&sum_dout[c], &sum_dout_xhat[c], inv_std[c], &dbeta[c], &dgamma[c])
    for plane in prange(N * C, nogil=True, schedule="dynamic", chunksize=_rows_per_task(L)):
        n = plane // C
        c = plane - n * C
        scale = gamma[c] * inv_std[c]
        shift = mean[c]
        mean_dout = <floating_t>(sum_dout[c] / count)
        slope = <floating_t>(inv_std[c] * sum_dout_xhat[c] / count)
        for oh in range(OH):
            band = &dx[n, c, oh * size * W]
            image = &x[n, c, oh * size * W]
            g = &dout[n, c, oh * OW]
            where = &argmax[n, c, oh * OW]
            if training:
                for k in range(size * W):
                    band[k] = scale * (<floating_t>0 - mean_dout - (image[k] - shift) * slope)
                for ow in range(OW):
                    k = ow * size + window_offset[where[ow]]
                    band[k] = scale * (g[ow] - mean_dout - (image[k] - shift) * slope)
            else:
                for k in range(size * W):
                    band[k] = 0
                for ow in range(OW):
                    band[ow * size + window_offset[where[ow]]] = scale * g[ow]


# ----------------------------------------------------------------------------
# Layout change around the conv GEMM
# ----------------------------------------------------------------------------
def swap_leading_axes(floating_t[:, :, ::1] source, floating_t[:, :, ::1] destination,
                      floating_t[::1] bias=None):
    """source (A, B, L) -> destination (B, A, L): destination[b, a, :] = source[a, b, :] (+ bias[a]).

    Each (a, b) pair is a contiguous run of L values in both arrays, so this is
    A*B short memcpy-like loops, one destination block per thread; the optional
    bias add rides along instead of costing its own pass over memory.
    """
    cdef Py_ssize_t A = source.shape[0], B = source.shape[1], L = source.shape[2], a, b, l
    cdef bint has_bias = bias is not None
    cdef floating_t shift
    cdef floating_t* target
    cdef const floating_t* origin
    for b in prange(B, nogil=True, schedule="dynamic", chunksize=_rows_per_task(A * L)):
        for a in range(A):
            target = &destination[b, a, 0]
            origin = &source[a, b, 0]
            if has_bias:
                shift = bias[a]
                for l in range(L):
                    target[l] = origin[l] + shift
            else:
                memcpy(target, origin, L * sizeof(floating_t))


# ----------------------------------------------------------------------------
# Winograd F(2x2, 3x3) tile transforms (the math is in npsoftmax/winograd.py)
# ----------------------------------------------------------------------------
# Tile t = (n*TH + ty)*TW + tx of image n reads the 4x4 input pixels at rows 2*ty - pad ..
# 2*ty - pad + 3 (likewise columns) and gives output rows 2*ty, 2*ty + 1 (likewise columns).
# Transformed arrays are 16 "slabs" (k, channel, tile): entry k = 4*r + s of a tile's 4x4
# transform lies in slab k, and the tiles of one row of tiles are consecutive there. Every
# kernel gives one channel at a time to each OpenMP thread and works on a zero-padded copy of
# one image plane (or two output rows), so no loop checks bounds; a row of TW tiles is
# transformed at once by the C functions of _winograd_rows.h, whose loops over tx the compiler
# vectorises (16 runs of TW values, one per slab; the slabs are padded apart, see
# kernels.winograd_slabs).

cdef extern from "_winograd_rows.h" nogil:
    void winograd_input_row_f(const float* rows, Py_ssize_t stride, Py_ssize_t TW, float* slabs, Py_ssize_t ss)
    void winograd_input_row_d(const double* rows, Py_ssize_t stride, Py_ssize_t TW, double* slabs, Py_ssize_t ss)
    void winograd_output_row_f(const float* slabs, Py_ssize_t ss, Py_ssize_t TW, float shift, float* rows,
                               Py_ssize_t stride)
    void winograd_output_row_d(const double* slabs, Py_ssize_t ss, Py_ssize_t TW, double shift, double* rows,
                               Py_ssize_t stride)
    void winograd_output_gradient_row_f(const float* rows, Py_ssize_t stride, Py_ssize_t TW, float* slabs,
                                        Py_ssize_t ss)
    void winograd_output_gradient_row_d(const double* rows, Py_ssize_t stride, Py_ssize_t TW, double* slabs,
                                        Py_ssize_t ss)
    void winograd_input_gradient_row_f(const float* slabs, Py_ssize_t ss, Py_ssize_t TW, float* part,
                                       float* rows, Py_ssize_t stride)
    void winograd_input_gradient_row_d(const double* slabs, Py_ssize_t ss, Py_ssize_t TW, double* part,
                                       double* rows, Py_ssize_t stride)
    double winograd_sum_f(const float* values, Py_ssize_t n)
    double winograd_sum_d(const double* values, Py_ssize_t n)


cdef int _input_transform_channel(floating_t[:, :, :, ::1] x, Py_ssize_t c, Py_ssize_t pad, Py_ssize_t TH,
                                  Py_ssize_t TW, floating_t* V, Py_ssize_t slab_stride) noexcept nogil:
    """Channel c of every image: V[k * slab_stride + t] = entry k of B^T d B of tile t (from 0).
    Returns 1 if its scratch memory could not be allocated, else 0."""
    cdef Py_ssize_t N = x.shape[0], H = x.shape[2], W = x.shape[3], PW = 2 * TW + 2, PH = 2 * TH + 2
    cdef Py_ssize_t n, h, ty, first = 0
    cdef floating_t* padded = <floating_t*>malloc(PH * PW * sizeof(floating_t))
    if padded == NULL:
        return 1
    memset(padded, 0, PH * PW * sizeof(floating_t))  # the border stays zero: it is the padding
    for n in range(N):
        for h in range(H):
            memcpy(padded + (h + pad) * PW + pad, &x[n, c, h, 0], W * sizeof(floating_t))
        for ty in range(TH):
            if floating_t is float:
                winograd_input_row_f(padded + 2 * ty * PW, PW, TW, V + first, slab_stride)
            else:
                winograd_input_row_d(padded + 2 * ty * PW, PW, TW, V + first, slab_stride)
            first = first + TW
    free(padded)
    return 0


def winograd_input_transform(floating_t[:, :, :, ::1] x, Py_ssize_t pad, Py_ssize_t TH, Py_ssize_t TW,
                             floating_t[:, :, :] V, Py_ssize_t first_tile):
    """x (n, C, H, W) -> V[:, :, first_tile : first_tile + n*TH*TW] = B^T d B of every 4x4 input tile d.
    Needs 2*TH + 2 >= H + 2*pad (likewise W): every pixel lies in some tile."""
    cdef Py_ssize_t c, slab_stride = V.strides[0] // sizeof(floating_t)
    cdef int failed = 0
    for c in prange(x.shape[1], nogil=True, schedule="dynamic"):
        failed += _input_transform_channel(x, c, pad, TH, TW, &V[0, c, first_tile], slab_stride)
    if failed:
        raise MemoryError("winograd_input_transform: no memory for a padded image plane")


cdef int _output_transform_channel(const floating_t* M, Py_ssize_t slab_stride, floating_t[:, :, :, ::1] out,
                                   Py_ssize_t f, Py_ssize_t TH, Py_ssize_t TW, floating_t shift) noexcept nogil:
    """Output channel f of every image from its products M[k * slab_stride + t]."""
    cdef Py_ssize_t N = out.shape[0], OH = out.shape[2], OW = out.shape[3], RW = 2 * TW
    cdef Py_ssize_t n, ty, first = 0
    cdef floating_t* rows = <floating_t*>malloc(2 * RW * sizeof(floating_t))
    if rows == NULL:
        return 1
    for n in range(N):
        for ty in range(TH):
            if floating_t is float:
                winograd_output_row_f(M + first, slab_stride, TW, shift, rows, RW)
            else:
                winograd_output_row_d(M + first, slab_stride, TW, shift, rows, RW)
            # the valid part of the two rows (an odd-sized output drops the last row/column)
            memcpy(&out[n, f, 2 * ty, 0], rows, OW * sizeof(floating_t))
            if 2 * ty + 1 < OH:
                memcpy(&out[n, f, 2 * ty + 1, 0], rows + RW, OW * sizeof(floating_t))
            first = first + TW
    free(rows)
    return 0


def winograd_output_transform(floating_t[:, :, :] M, floating_t[:, :, :, ::1] out, Py_ssize_t TH,
                              Py_ssize_t TW, floating_t[::1] bias=None):
    """M (16, F, n*TH*TW) -> out (n, F, OH, OW): every 2x2 output block is A^T m A (+ bias[f])."""
    cdef Py_ssize_t f, slab_stride = M.strides[0] // sizeof(floating_t)
    cdef bint has_bias = bias is not None
    cdef int failed = 0
    for f in prange(out.shape[1], nogil=True, schedule="dynamic"):
        failed += _output_transform_channel(&M[0, f, 0], slab_stride, out, f, TH, TW, bias[f] if has_bias else 0)
    if failed:
        raise MemoryError("winograd_output_transform: no memory for two output rows")


cdef int _output_gradient_channel(floating_t[:, :, :, ::1] dout, Py_ssize_t f, Py_ssize_t TH, Py_ssize_t TW,
                                  floating_t* dM, Py_ssize_t slab_stride, floating_t* dbias) noexcept nogil:
    """Channel f of every image: dM[k * slab_stride + t] = entry k of A dy A^T; *dbias = sum of dout[:, f]."""
    cdef Py_ssize_t N = dout.shape[0], OH = dout.shape[2], OW = dout.shape[3], RW = 2 * TW
    cdef Py_ssize_t n, ty, first = 0
    cdef double total = 0
    cdef floating_t* rows = <floating_t*>malloc(2 * RW * sizeof(floating_t))
    cdef const floating_t* plane
    if rows == NULL:
        return 1
    memset(rows, 0, 2 * RW * sizeof(floating_t))  # past the last valid row/column: zeros
    for n in range(N):
        plane = &dout[n, f, 0, 0]
        if floating_t is float:
            total += winograd_sum_f(plane, OH * OW)
        else:
            total += winograd_sum_d(plane, OH * OW)
        for ty in range(TH):
            memcpy(rows, plane + 2 * ty * OW, OW * sizeof(floating_t))
            if 2 * ty + 1 < OH:
                memcpy(rows + RW, plane + (2 * ty + 1) * OW, OW * sizeof(floating_t))
            else:
                memset(rows + RW, 0, RW * sizeof(floating_t))
            if floating_t is float:
                winograd_output_gradient_row_f(rows, RW, TW, dM + first, slab_stride)
            else:
                winograd_output_gradient_row_d(rows, RW, TW, dM + first, slab_stride)
            first = first + TW
    free(rows)
    dbias[0] = <floating_t>total
    return 0


def winograd_output_gradient(floating_t[:, :, :, ::1] dout, Py_ssize_t TH, Py_ssize_t TW,
                             floating_t[:, :, :] dM, floating_t[::1] dbias):
    """dout (n, F, OH, OW) -> dM (16, F, n*TH*TW) = A dy A^T of every 2x2 block dy (zero past the
    output's edge), and dbias[f] = the sum of dout[:, f] (the bias gradient of these images)."""
    cdef Py_ssize_t f, slab_stride = dM.strides[0] // sizeof(floating_t)
    cdef int failed = 0
    for f in prange(dout.shape[1], nogil=True, schedule="dynamic"):
        failed += _output_gradient_channel(dout, f, TH, TW, &dM[0, f, 0], slab_stride, &dbias[f])
    if failed:
        raise MemoryError("winograd_output_gradient: no memory for two gradient rows")


cdef int _input_gradient_channel(const floating_t* dV, Py_ssize_t slab_stride, Py_ssize_t pad, Py_ssize_t TH,
                                 Py_ssize_t TW, floating_t[:, :, :, ::1] dx, Py_ssize_t c) noexcept nogil:
    """Channel c of every image of dx from dV[k * slab_stride + t]."""
    cdef Py_ssize_t N = dx.shape[0], H = dx.shape[2], W = dx.shape[3], PW = 2 * TW + 2, PH = 2 * TH + 2
    cdef Py_ssize_t n, h, ty, first = 0
    cdef floating_t* padded = <floating_t*>malloc((PH * PW + 16 * TW) * sizeof(floating_t))
    cdef floating_t* part = padded + PH * PW  # scratch of the row function: 16 x TW
    if padded == NULL:
        return 1
    for n in range(N):
        memset(padded, 0, PH * PW * sizeof(floating_t))
        for ty in range(TH):
            # rows 2*ty .. 2*ty + 3 of the padded image; the next row of tiles adds onto the
            # last two of them again (tiles overlap by 2 rows)
            if floating_t is float:
                winograd_input_gradient_row_f(dV + first, slab_stride, TW, part, padded + 2 * ty * PW, PW)
            else:
                winograd_input_gradient_row_d(dV + first, slab_stride, TW, part, padded + 2 * ty * PW, PW)
            first = first + TW
        for h in range(H):  # the image's pixels; the padding's gradient is dropped
            memcpy(&dx[n, c, h, 0], padded + (h + pad) * PW + pad, W * sizeof(floating_t))
    free(padded)
    return 0


def winograd_input_gradient(floating_t[:, :, :] dV, Py_ssize_t pad, Py_ssize_t TH, Py_ssize_t TW,
                            floating_t[:, :, :, ::1] dx):
    """dV (16, C, n*TH*TW) -> dx (n, C, H, W), overwritten: every tile adds B dv B^T back onto the
    4x4 input pixels it was read from. Adjoint of winograd_input_transform."""
    cdef Py_ssize_t c, slab_stride = dV.strides[0] // sizeof(floating_t)
    cdef int failed = 0
    for c in prange(dx.shape[1], nogil=True, schedule="dynamic"):
        failed += _input_gradient_channel(&dV[0, c, 0], slab_stride, pad, TH, TW, dx, c)
    if failed:
        raise MemoryError("winograd_input_gradient: no memory for a padded image plane")


# ----------------------------------------------------------------------------
# Row-sparse products of the hierarchical head (huge trees; see kernels.py)
# ----------------------------------------------------------------------------
# A step of a hierarchical head over K = 10^5 .. 10^6 classes touches a few thousand
# (sample, weight row) pairs of a table of K - 1 rows. Each pair is one D-vector dot
# product forward and two D-vector multiply-adds backward: ~1 MFLOP in all, less than
# NumPy's gathers of (C, D) copies or a dense (N, U) GEMM of mostly zeros cost.

cdef inline floating_t _row_dot(const floating_t* a, const floating_t* b, Py_ssize_t D) noexcept nogil:
    """a . b over D values, in LANES independent accumulators (vectorised, see _total)."""
    cdef floating_t lanes[LANES]
    cdef Py_ssize_t d = 0, k
    cdef floating_t total
    for k in range(LANES):
        lanes[k] = 0
    while d + LANES <= D:
        for k in range(LANES):
            lanes[k] += a[d + k] * b[d + k]
        d += LANES
    total = <floating_t>_total(lanes)
    while d < D:
        total += a[d] * b[d]
        d += 1
    return total


def gathered_row_dots(const floating_t[:, ::1] table, const Py_ssize_t[::1] rows, const floating_t[:, ::1] features,
                      const Py_ssize_t[::1] samples, floating_t[::1] out):
    """out[c] = table[rows[c]] . features[samples[c]] for every pair c (no (C, D) copies)."""
    cdef Py_ssize_t C = rows.shape[0], D = table.shape[1], c
    with nogil:
        for c in range(C):
            out[c] = _row_dot(&table[rows[c], 0], &features[samples[c], 0], D)


def scatter_row_products(const floating_t[::1] weights, const floating_t[:, ::1] table, const Py_ssize_t[::1] rows,
                         const floating_t[:, ::1] features, const Py_ssize_t[::1] samples, const Py_ssize_t[::1] slots,
                         floating_t[:, ::1] dfeatures, floating_t[:, ::1] dslots):
    """The adjoint of gathered_row_dots: for every pair c, dfeatures[samples[c]] += weights[c] *
    table[rows[c]] (dfeatures zeroed by the caller) and dslots[slots[c]] = sum of weights[c] *
    features[samples[c]] over the pairs of that slot (slots[c]: the pair's row among the distinct
    rows; dslots is overwritten, 0 for a slot without pairs). One thread: two pairs may share a
    sample or a slot, so the adds of one output row must not race. The dslots rows are summed slot
    by slot (a counting sort of the pairs), so each is finished in cache and written once.
    Returns 1 if there was no memory for the sort."""
    cdef Py_ssize_t C = rows.shape[0], D = table.shape[1], U = dslots.shape[0], c, d, u, k
    cdef floating_t weight
    cdef floating_t* target
    cdef const floating_t* source
    cdef Py_ssize_t* first = <Py_ssize_t*>malloc((U + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t* order = <Py_ssize_t*>malloc((C + 1) * sizeof(Py_ssize_t))
    if first == NULL or order == NULL:
        free(first)
        free(order)
        return 1
    with nogil:
        for c in range(C):
            weight = weights[c]
            target = &dfeatures[samples[c], 0]
            source = &table[rows[c], 0]
            for d in range(D):
                target[d] += weight * source[d]
        # pairs of slot u: order[first[u] .. first[u + 1] - 1]
        for u in range(U + 1):
            first[u] = 0
        for c in range(C):
            first[slots[c] + 1] += 1
        for u in range(U):
            first[u + 1] += first[u]
        for c in range(C):
            order[first[slots[c]]] = c
            first[slots[c]] += 1
        k = 0
        for u in range(U):  # first[u] is now where slot u's pairs end
            target = &dslots[u, 0]
            if k == first[u]:  # a slot without pairs
                memset(target, 0, D * sizeof(floating_t))
                continue
            c = order[k]
            weight = weights[c]
            source = &features[samples[c], 0]
            for d in range(D):
                target[d] = weight * source[d]
            k += 1
            while k < first[u]:
                c = order[k]
                weight = weights[c]
                source = &features[samples[c], 0]
                for d in range(D):
                    target[d] += weight * source[d]
                k += 1
    free(first)
    free(order)
    return 0


def tree_paths(const Py_ssize_t[::1] y, const Py_ssize_t[::1] step_first, const Py_ssize_t[::1] leaf_parent,
               const Py_ssize_t[::1] leaf_position, const Py_ssize_t[::1] node_parent,
               const Py_ssize_t[::1] node_position,
               Py_ssize_t[::1] nodes, Py_ssize_t[::1] positions):
    """Every decision on the paths of the classes y (N,), leaf to root: sample i's steps are
    entries step_first[i] .. step_first[i + 1] - 1 (step_first has N + 1 entries) of nodes (the
    internal node) and positions (the child taken there). Returns the number of samples whose
    path did not end at the root (node_parent -1) after exactly their number of steps (0 for a
    consistent tree; nothing is written past a sample's own entries either way)."""
    cdef Py_ssize_t N = y.shape[0], i, s, end, node, position
    cdef Py_ssize_t mismatched = 0
    with nogil:
        for i in range(N):
            s = step_first[i]
            end = step_first[i + 1]
            node = leaf_parent[y[i]]
            position = leaf_position[y[i]]
            while s < end and node >= 0:
                nodes[s] = node
                positions[s] = position
                s += 1
                position = node_position[node]
                node = node_parent[node]
            if s != end or node >= 0:
                mismatched += 1
    return mismatched
