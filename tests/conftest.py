"""Shared fixtures. Tests run on CPU in float32 unless they ask for ``x64``."""

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Enables float64 for one test only, so the rest of the suite stays float32."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)
