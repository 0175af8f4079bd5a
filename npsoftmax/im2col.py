"""im2col / col2im: the one dispatch point between the Cython kernels and NumPy.

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

The compiled kernels live in ``_im2col.pyx``; if the extension was not built,
the NumPy reference below is used and a warning is printed once.
"""

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def conv_output_size(size, kernel_size, stride, pad):
    """Number of window positions along one axis: ``(size + 2*pad - kernel) // stride + 1``.

    Like PyTorch, a stride that does not tile the padded input exactly drops the
    last partial window (floor division).
    """
    return (size + 2 * pad - kernel_size) // stride + 1


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
    kernel_height = _check_positive_int("kernel_height", kernel_height)
    kernel_width = _check_positive_int("kernel_width", kernel_width)
    stride = _check_positive_int("stride", stride)
    pad = _check_positive_int("pad", pad, minimum=0)
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


def _check_float_array(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype not in _FLOAT_DTYPES:
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
        C-contiguous buffer of the same dtype to write into and return. A conv
        layer passes the same buffer every step: allocating tens of MiB afresh
        costs page faults comparable to the copy itself.

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
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
    if _extension is None:
        cols = im2col_numpy(x, kernel_height, kernel_width, stride, pad)
        if out is None:
            return cols
        out[...] = cols
        return out
    # The kernel indexes a C-contiguous buffer; this is a no-op for the usual case.
    return _extension.im2col(np.ascontiguousarray(x), kernel_height, kernel_width, stride, pad, out)


def col2im(cols, x_shape, kernel_height, kernel_width, stride=1, pad=0):
    """Fold columns back into an image, summing overlaps (adjoint of :func:`im2col`).

    Parameters
    ----------
    cols : ndarray (C*KH*KW, N*OH*OW), float32 or float64
    x_shape : tuple (N, C, H, W)
        Shape of the image that ``im2col`` unfolded.

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
    if _extension is None:
        return col2im_numpy(cols, x_shape, kernel_height, kernel_width, stride, pad)
    return _extension.col2im(
        np.ascontiguousarray(cols), N, C, H, W, kernel_height, kernel_width, stride, pad
    )
