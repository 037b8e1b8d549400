"""Shared fixtures. Tests run on CPU in float32 unless they ask for ``x64``."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from checkpoint_files import finished_run


@pytest.fixture
def x64():
    """Enables float64 for one test only, so the rest of the suite stays float32."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def run(tmp_path_factory) -> Path:
    """A finished two-epoch run on the synthetic set (trained once per session: do not change it)."""
    return finished_run(tmp_path_factory)


@pytest.fixture
def workspace(run, tmp_path) -> Path:
    """A scratch directory: a copy of the finished run (`tiny`) and an `outside` folder with a file."""
    shutil.copytree(run, tmp_path / "tiny", symlinks=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("not switchnorm's")
    return tmp_path
