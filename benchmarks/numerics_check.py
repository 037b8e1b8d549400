"""Numerics of the core on whatever backend JAX runs on (for a GPU machine).

    PYTHONPATH=. python -m benchmarks.numerics_check

Float32 input with mean 1e4 and std 1 through every single normalizer and a
random blend of all four, against the float64 NumPy reference of the test
suite (tests/reference.py) on the same float32-rounded input; the layer's
stability guarantee is 1e-3 absolute. Also the custom VJP against plain autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from switchnorm import default_num_groups, switch_norm
from switchnorm._core import switch_norm_autodiff
from tests import reference


def main() -> None:
    print("backend", jax.default_backend(), jax.devices()[0].device_kind)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 8, 8, 32)) + 1e4, jnp.float32)
    x64 = np.asarray(x, np.float64)
    groups = default_num_groups(32)
    cases = [((n,), np.zeros(1), np.zeros(1)) for n in ("bn", "in", "ln", "gn")]
    cases.append((("bn", "in", "ln", "gn"), rng.normal(size=4), rng.normal(size=4)))
    worst = 0.0
    for normalizers, ml, vl in cases:
        y = jax.jit(lambda x, ml, vl, ns=normalizers: switch_norm(x, ml, vl, normalizers=ns)[0])(
            x, jnp.asarray(ml, jnp.float32), jnp.asarray(vl, jnp.float32)
        )
        ref, _, _ = reference.switch_norm(x64, ml, vl, normalizers=normalizers, num_groups=groups)
        err = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
        worst = max(worst, err)
        print(f"mean 1e4 / std 1, float32 {'+'.join(normalizers):>11}: max abs error {err:.2e}")
    print(f"worst {worst:.2e} (bound 1e-3): {'ok' if worst < 1e-3 else 'FAILED'}")

    xs = jnp.asarray(rng.normal(size=(8, 16, 16, 32)) * 2 + 3, jnp.float32)
    ml, vl = (jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.normal(size=xs.shape), jnp.float32)
    grads = [
        jax.jit(jax.grad(lambda x, m, v, f=f: jnp.sum(f(x, m, v)[0] * dy), argnums=(0, 1, 2)))(xs, ml, vl)
        for f in (switch_norm, switch_norm_autodiff)
    ]
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(*grads, strict=True)]
    print("custom VJP vs autodiff, max |difference| for x, mean_logits, var_logits:", diffs)


if __name__ == "__main__":
    main()
