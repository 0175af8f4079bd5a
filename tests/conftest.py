"""Shared pytest fixtures."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded Generator: every test sees the same random numbers on every run."""
    return np.random.default_rng(1234)
