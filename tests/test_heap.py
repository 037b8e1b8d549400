"""benchmarks.heap: with freed memory kept, repeated XLA:CPU calls stop page-faulting."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Each call returns a fresh 25.7 MB float32 array (8x56x56x256), dropped before the next. The
# heap grows to its high-water mark over the first calls; then, with freed memory kept, a call
# faults in no page. Without it, on the idle machine, most calls fault their whole output in
# again (163 of 240 calls in one measurement); how many depends on which thread XLA runs a call
# on, and under the test suite's own load it can be none, so that half is not asserted here.
_PROBE = """
import resource, statistics
from benchmarks.heap import keep_freed_memory
said = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((8, 56, 56, 256))
faults = []
for _ in range(60):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(said)
print(statistics.median(faults[-20:]))
"""


def _faults_per_call() -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],  # the repository root, where `benchmarks` is
    ).stdout.splitlines()
    return out[-2], float(out[-1])


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_kept_memory_takes_the_page_faults_out_of_repeated_calls():
    said, kept = _faults_per_call()
    assert said.startswith("glibc malloc keeping freed memory"), said
    # One output is 6,272 pages of 4 KiB: a call that faults it in again counts thousands.
    assert kept < 100, kept
