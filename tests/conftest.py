"""Shared pytest fixtures."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded Generator: every test sees the same random numbers on every run."""
    return np.random.default_rng(1234)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    """Both supported dtypes: float32 (training) and float64 (gradient checks)."""
    return np.dtype(request.param)


@pytest.fixture
def forward_tolerance(dtype):
    """``assert_allclose`` keyword arguments for a layer's output vs a float64 loop oracle.

    float32 keeps ~7 significant digits; sums of a few dozen O(1) products lose
    about one more, hence 1e-5. float64 results differ from the loops only by
    summation order.
    """
    if dtype == np.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 1e-12, "atol": 1e-12}
