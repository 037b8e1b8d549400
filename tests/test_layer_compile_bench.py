"""benchmarks.layer_compile: its kernel count and its table (compile times are not asserted)."""

import jax
import jax.numpy as jnp

from benchmarks import layer_compile


def kernels(f, *args) -> tuple[int, int]:
    """The kernel count with the fusion emitters a user's program gets (conftest turns them off)."""
    compiled = jax.jit(f).lower(*args).compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
    return layer_compile.kernel_count(compiled.as_text())


def test_kernel_count_counts_the_launches_of_the_entry_computation():
    x = jnp.ones((64, 32))
    assert kernels(lambda x: x * 2 + 1, x) == (1, 1)  # one elementwise fusion
    # sin, cos * 3, and XLA:CPU's two-stage sum (a reduce-window, then a reduce); a tuple out.
    two_outputs = lambda x: (jnp.sum(jnp.sin(x), axis=0), jnp.cos(x) * 3)  # noqa: E731
    assert kernels(two_outputs, x) == (4, 4)
    # A conditional: its predicate, itself, and one branch: (sum, x * 2) or the one above.
    cond = lambda x: jax.lax.cond(x[0, 0] > 0, lambda x: (jnp.sum(x, 0), x * 2), two_outputs, x)  # noqa: E731
    fewest, most = kernels(cond, x)
    assert most == 1 + 1 + 4 and 1 + 1 + 2 <= fewest < most


def test_the_table_has_a_row_per_shape_and_function():
    rows = layer_compile.main(["--shapes", "4x3x3x4", "8x4", "--repeats", "1"])
    assert [(r["shape"], r["function"]) for r in rows] == [
        (s, f) for s in ("4x3x3x4", "8x4") for f in ("fwd", "fwd+bwd", "inference")
    ]
    assert all(r["sn_s"] > 0 and r["bn_s"] > 0 and r["bn_kernels"][0] >= 1 for r in rows)
    # SwitchNorm computes several normalizers' statistics where BatchNorm computes one.
    assert all(r["sn_kernels"][1] > r["bn_kernels"][1] for r in rows)
