"""benchmarks.weights_cost: its kernel count and its table (timings are not asserted)."""

import jax
import jax.numpy as jnp

from benchmarks import weights_cost


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_kernel_count_counts_the_kernels_not_the_parameters_or_the_tuple():
    x = jnp.ones((64, 32))
    assert weights_cost.kernel_count(compiled(lambda x: x * 2 + 1, x)) == 1  # one fused loop
    # Two outputs XLA does not fuse into one kernel: an elementwise loop and a matrix product.
    assert weights_cost.kernel_count(compiled(lambda x: (x * 2 + 1, x @ x.T), x)) == 2


def test_the_table_has_a_row_per_shape_and_pass_and_the_command():
    report = weights_cost.main(
        ["--shapes", "4x3x3x8", "--modes", "fwd", "--repeats", "1", "--min-sample-ms", "0"]
    )
    rows = [line for line in report.splitlines() if line.startswith("| 4x3x3x8 | float32 |")]
    assert [row.split(" | ")[2] for row in rows] == ["fwd"]
    assert "`python -m benchmarks.weights_cost --shapes 4x3x3x8" in report
