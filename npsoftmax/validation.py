"""Argument checks shared by the kernels, layers and heads: one wording for every error.

Each check returns the normalised value (a python int, a numpy dtype, the
Generator) or raises ``TypeError`` (wrong kind of value) / ``ValueError`` (right
kind, wrong range) with a message that names the argument and what it received.
"""

import math
import numbers

import numpy as np

#: The dtypes everything computes in: float32 for training, float64 for gradient checks.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_int(value, name, minimum=1):
    """Return ``value`` as a python int >= ``minimum``; bools and floats are rejected."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dtype(dtype):
    """Return ``dtype`` as a numpy dtype, which must be float32 or float64 (TypeError otherwise)."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from error
    if resolved not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def check_generator(rng):
    """Require a ``numpy.random.Generator`` (nothing in npsoftmax touches global random state)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(0)), got {type(rng).__name__}"
        )
    return rng


def check_real(value, name, minimum=None, minimum_inclusive=True, maximum=None, maximum_inclusive=True):
    """Return ``value`` as a python float after checking it is real, finite and in range.

    Python floats (not NumPy float64 scalars) keep float32 arithmetic in float32 under
    NumPy's promotion rules, which is why every hyperparameter goes through here.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got bool {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number!r}")
    if minimum is not None and (number < minimum or (number == minimum and not minimum_inclusive)):
        bound = ">=" if minimum_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {minimum}, got {number!r}")
    if maximum is not None and (number > maximum or (number == maximum and not maximum_inclusive)):
        bound = "<=" if maximum_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {maximum}, got {number!r}")
    return number


def check_bool(value, name):
    """Require a bool (``True``/``False`` or a NumPy bool), not a truthy stand-in."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return bool(value)


def check_array(name, value):
    """Require a ``numpy.ndarray`` (lists and scalars are refused, not converted)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")


def check_ndim(name, array, ndim, layout):
    """Require an ndarray with ``ndim`` axes; ``layout`` names them in the message, e.g. "(N, C, H, W)"."""
    check_array(name, array)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {array.shape}")


def check_shape(name, array, expected):
    """Require an ndarray of exactly the shape ``expected``."""
    check_array(name, array)
    if array.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {array.shape}")


def check_same_dtype(name, array, reference_name, reference):
    """Require ``array`` to have the dtype of ``reference`` (no silent casts between float32 and float64)."""
    if array.dtype != reference.dtype:
        raise TypeError(
            f"{name} must have the dtype of {reference_name} ({reference.dtype}), "
            f"got {array.dtype} ({name} shape {array.shape}, {reference_name} shape {reference.shape})"
        )


def check_upstream(dout, shape, dtype):
    """``dout`` must look exactly like the forward output it is the gradient of."""
    check_array("dout", dout)
    if dout.shape != tuple(shape):
        raise ValueError(f"dout must have the forward output's shape {tuple(shape)}, got {dout.shape}")
    if dout.dtype != dtype:
        raise TypeError(f"dout must have the forward output's dtype {np.dtype(dtype)}, got {dout.dtype}")


def check_buffer(name, buffer, shape, dtype):
    """An optional output buffer (None allowed) must be a C-contiguous ndarray of this shape and dtype."""
    if buffer is None:
        return
    check_array(name, buffer)
    if buffer.shape != tuple(shape) or buffer.dtype != dtype or not buffer.flags.c_contiguous:
        raise ValueError(
            f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {tuple(shape)}, got "
            f"{'C-contiguous' if buffer.flags.c_contiguous else 'non-contiguous'} {buffer.dtype} {buffer.shape}"
        )


def check_slabs(name, array):
    """``array`` must be a (16, R, T) stack of slabs (``kernels.winograd_slabs``): every slab a
    C-contiguous (R, T) matrix, slabs any distance apart but not overlapping."""
    if (array.ndim != 3 or array.shape[0] != 16
            or (array.shape[2] > 1 and array.strides[2] != array.itemsize)
            or (array.shape[1] > 1 and array.strides[1] != array.shape[2] * array.itemsize)
            or array.strides[0] < array.shape[1] * array.shape[2] * array.itemsize):
        raise ValueError(f"{name} must be 16 slabs of C-contiguous matrices (kernels.winograd_slabs), got "
                         f"shape {array.shape} strides {array.strides}")


def check_slab_buffer(name, buffer, shape, dtype):
    """An optional (None allowed) Winograd buffer: a ``dtype`` array of this (16, R, T) shape laid
    out as :func:`check_slabs` requires."""
    if buffer is None:
        return
    check_array(name, buffer)
    if buffer.shape != tuple(shape) or buffer.dtype != dtype:
        raise ValueError(f"{name} must be a {np.dtype(dtype)} array of shape {tuple(shape)} made of 16 "
                         f"C-contiguous slabs (kernels.winograd_slabs), got {buffer.dtype} {buffer.shape}")
    check_slabs(name, buffer)


def check_uint8_images(images, name="images"):
    """Require uint8 images in NHWC layout, ``(N, H, W, C)`` (how data sets are stored)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        found = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
            else type(images).__name__
        raise TypeError(f"{name} must be a uint8 array of shape (N, H, W, C), got {found}")


def check_nchw(x, name="x"):
    """Require a 4-D array in the network's NCHW layout."""
    if not isinstance(x, np.ndarray) or x.ndim != 4:
        found = f"array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{name} must be an array of shape (N, C, H, W), got {found}")
