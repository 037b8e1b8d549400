"""What a call-time mask costs: SwitchNorm's forward and backward with a padding mask over without.

    python -m benchmarks.mask_cost                      # three shapes, 15 repeats
    python -m benchmarks.mask_cost --shapes 8x256x64 --repeats 31 --dtype bfloat16

For each shape, the gradient of ``sum(sin(y))`` with respect to x and the logits
(all default normalizers, training mode), jitted, with and without a mask that
keeps a random prefix of each sample's positions (half to all of them, as padded
sequences), of shape (N, L, 1, ...): one value per position, for every channel.
Every repeat times the two back to back and the ratio masked / unmasked is taken
per repeat, so a slow spell on a shared machine hits both; the median and lower
quartile of the ratios are printed, with each compiled step's temporary memory
over x's bytes (from XLA's memory analysis, every ``lax.cond`` branch included).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import switchnorm
from benchmarks.heap import keep_freed_memory

SHAPES = ("32x32x32x64", "8x256x64", "128x8x8x128")


def padding_mask(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """(N, L, 1, ..., 1) booleans keeping a random prefix of at least half of each sample's axis 1."""
    lengths = np.random.default_rng(seed).integers(shape[1] // 2, shape[1] + 1, shape[0])
    keep = np.arange(shape[1])[None, :] < lengths[:, None]
    return jnp.asarray(keep.reshape(shape[0], shape[1], *([1] * (len(shape) - 2))))


class Step(NamedTuple):
    """One compiled gradient step, ready to run, and its temporary memory over x's bytes."""

    run: Callable[[], jax.Array]
    temporaries: float


def steps(shape: tuple[int, ...], dtype: str = "float32") -> tuple[Step, Step]:
    """The unmasked and the masked gradient step on one input, compiled and run once."""
    normalizers = switchnorm.default_normalizers(len(shape))
    x = (jax.random.normal(jax.random.key(0), shape) + 3.0).astype(dtype)
    logits = jnp.zeros(len(normalizers))
    mask = padding_mask(shape)

    def loss(x, logits, mask):
        y, _ = switchnorm.switch_norm(x, logits, logits, normalizers=normalizers, mask=mask)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    def step(fn: Callable, *args: jax.Array) -> Step:
        compiled = jax.jit(fn).lower(*args).compile()
        compiled(*args)
        temporaries = compiled.memory_analysis().temp_size_in_bytes / x.nbytes
        return Step(lambda: jax.block_until_ready(compiled(*args)), temporaries)

    plain = step(jax.grad(lambda x, logits: loss(x, logits, None), (0, 1)), x, logits)
    return plain, step(jax.grad(loss, (0, 1)), x, logits, mask)


def ratios(plain: Step, masked: Step, repeats: int) -> list[float]:
    """Per repeat: masked time over unmasked time, the two run back to back."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain.run()
        middle = time.perf_counter()
        masked.run()
        out.append((time.perf_counter() - middle) / (middle - start))
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="shapes such as 8x256x64")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtype", default="float32", help="x's dtype, e.g. bfloat16")
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    lines = [
        f"{args.dtype}: masked / unmasked fwd+bwd time (median, lower quartile); temporaries / x, masked (unmasked)",
    ]
    for text in args.shapes:
        plain, masked = steps(tuple(int(n) for n in text.split("x")), args.dtype)
        r = ratios(plain, masked, args.repeats)
        lines.append(
            f"{text:<16} {statistics.median(r):>6.2f} {np.percentile(r, 25):>6.2f}"
            f"   {masked.temporaries:.3f} ({plain.temporaries:.3f})"
        )
    report = "\n".join([*lines, f"heap: {heap}"])
    print(report)
    return report


if __name__ == "__main__":
    main()
