"""Shared fixtures. Tests run on CPU in float32 unless they ask for ``x64``.

The subprocesses the tests start (``switchnorm train`` runs, the multi-device
checks) share one JAX persistent compilation cache, so the same small training
step, compiled by a dozen runs, is compiled once (a warm two-epoch run: 8.7 s
of CPU instead of 18.3 s). It is a fresh temporary folder, removed when the
session ends. The cache key is the compiled program with its compile options,
XLA flags, device count and JAX version, so a hit returns what a compile would.
The size limit only turns on JAX's file lock, so that runs writing and reading
the same entry at once (the kill-and-resume tests start identical runs side by
side) never see half an entry; with it, each write scans every entry, which
made the pytest processes themselves (thousands of small jits) slower, so they
stay uncached.

Every process of the suite, pytest's and the subprocesses', compiles with
``jax_disable_most_optimizations`` and XLA:CPU's older LLVM-IR fusion emitters
(``--xla_cpu_use_fusion_emitters=false``). The tests compile thousands of small
programs and run each a few times; with optimizations off, the MLIR-based emitters
cost about twice the compile time of the older ones (tests/test_vjp.py and
tests/test_linen.py: 206 s of CPU against 94 s). XLA's graph passes still run, but
the older emitters fuse a little differently (they do not split a long reduction in
two), so the kernel-count tests ask for the user's emitters, and test_pipeline.py
runs the value tests again with JAX's defaults (``SWITCHNORM_TEST_COMPILE=default``
turns the fast settings off for a whole run). ``SWITCHNORM_TEST_SEAM=off`` traces the
plain forms of every pass on the CPU as well (``switchnorm._xla_cpu.ENABLED``).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from checkpoint_files import finished_run

FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib's XLA knows the flag: an unknown one aborts the process that reads it."""
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


def _compile_fast() -> None:
    """Sets the fast-compile settings (module docstring) in the environment, before JAX starts.

    Subprocesses inherit them; a test that sets ``XLA_FLAGS`` for a subprocess keeps
    what is already there (``JAX_NUM_CPU_DEVICES`` gives a subprocess its devices). A
    jaxlib whose XLA has dropped the emitter flag runs the suite without it, slower.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    # xdist workers inherit the controller's environment: only the first process probes
    if FAST_COMPILE_FLAG not in flags.split() and _xla_accepts(FAST_COMPILE_FLAG):
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"  # for the subprocesses, read at import
    jax.config.update("jax_disable_most_optimizations", True)  # for this process, imported above


if os.environ.get("SWITCHNORM_TEST_COMPILE") != "default":  # the user's pipeline: see test_pipeline.py
    _compile_fast()  # XLA reads its flags when the backend starts (the first computation), not at import

if os.environ.get("SWITCHNORM_TEST_SEAM") == "off":  # the plain forms on the CPU too: see test_pipeline.py
    from switchnorm import _xla_cpu

    _xla_cpu.ENABLED = False

_CACHE_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tests' programs compile fast
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",  # every entry, however small
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),  # turns on the file lock (needs filelock)
}


def _share_compilation_cache() -> str | None:
    """Points the subprocesses to come at a fresh cache; returns its path, None if none made.

    Without the filelock package (a dev dependency) the suite runs uncached: slower, same results.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # set by the caller, or by the xdist controller
        return None
    if importlib.util.find_spec("filelock") is None:
        return None
    path = tempfile.mkdtemp(prefix="switchnorm-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path, **_CACHE_SETTINGS)
    return path


_OWN_CACHE = _share_compilation_cache()
jax.config.update("jax_compilation_cache_dir", None)  # xdist workers read it at import: not here


def pytest_configure(config) -> None:
    """Makes xdist hand out files in the collection order below, not by their number of tests.

    By default ``--dist loadfile`` starts the files with the most tests first, so
    the one-test files that run for minutes (SIGKILL at every write point,
    kill-and-resume) were handed out last and ran alone while the other worker idled.
    """
    if hasattr(config.option, "loadscopereorder"):  # xdist is loaded
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items) -> None:
    """Puts the files holding slow tests (training subprocesses) first, in their own order.

    xdist hands out whole files in this order (see ``pytest_configure``): the
    long subprocess files start at once, and the short files fill the other
    worker around them.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within stays


def pytest_unconfigure(config) -> None:
    """Removes the session's compilation cache, in the process that made it."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
