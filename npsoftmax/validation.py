"""Argument checks shared by the kernels, layers and heads: one wording for every error.

Each check returns the normalised value (a python int, a numpy dtype, the
Generator) or raises ``TypeError`` (wrong kind of value) / ``ValueError`` (right
kind, wrong range) with a message that names the argument and what it received.
"""

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
