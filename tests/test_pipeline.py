"""The value tests once more, compiled as a user's program is, and with the compiler seam off.

The suite compiles with XLA:CPU's faster-to-compile settings (tests/conftest.py):
optimizations off and the older fusion emitters. Users get JAX's defaults, whose
machine code differs (the MLIR fusion emitters, LLVM's optimizations, fused
multiply-adds). The files that test values most closely against float64 and
float32 references, float32 stability and half precision, run again here in a
subprocess with those defaults, so a difference in the user's pipeline fails a test.

The same files, the core's and the mask's run again with every workaround of
``switchnorm._xla_cpu`` switched off (the plain forms other platforms get): the
workarounds change what XLA:CPU compiles, never the values.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pytest subprocesses, about 50 s and 90 s of CPU

VALUE_FILES = ("test_numerics.py", "test_values.py")


def default_pipeline_env() -> dict[str, str]:
    """This environment without the suite's fast-compile settings."""
    env = {**os.environ, "SWITCHNORM_TEST_COMPILE": "default", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "fusion_emitters" not in f)
    return env


def run_tests(files: list[str], env: dict[str, str], script: str = "") -> subprocess.CompletedProcess:
    """pytest on ``files`` in a subprocess with ``env``, ``script`` run after the session."""
    code = f"import os, sys, jax, pytest; status = pytest.main(sys.argv[1:]); {script}sys.exit(status)"
    return subprocess.run(
        [sys.executable, "-c", code, "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *files],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_value_tests_pass_with_jaxs_default_compilation():
    tests = Path(__file__).parent
    script = (  # after the session (conftest has run): the settings were JAX's own
        "assert not jax.config.read('jax_disable_most_optimizations'); "
        "assert 'fusion_emitters' not in os.environ.get('XLA_FLAGS', ''); "
    )
    done = run_tests([str(tests / name) for name in VALUE_FILES], default_pipeline_env(), script)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_the_value_tests_pass_with_the_compiler_seam_off():
    tests = Path(__file__).parent
    files = [str(tests / name) for name in (*VALUE_FILES, "test_core.py", "test_mask.py")]
    script = "from switchnorm import _xla_cpu; assert not _xla_cpu.ENABLED; "
    done = run_tests(files, {**os.environ, "SWITCHNORM_TEST_SEAM": "off", "JAX_PLATFORMS": "cpu"}, script)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
