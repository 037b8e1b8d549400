"""What a call-time mask costs: SwitchNorm's forward and backward with a padding mask over without.

    python -m benchmarks.mask_cost                      # three shapes, 15 repeats
    python -m benchmarks.mask_cost --shapes 8x256x64 --repeats 31

For each shape, the gradient of ``sum(sin(y))`` with respect to x and the logits
(all default normalizers, training mode), jitted, with and without a mask that
keeps a random prefix of each sample's positions (half to all of them, as padded
sequences), broadcast over the channels. Every repeat times the two back to back
and the ratio masked / unmasked is taken per repeat, so a slow spell on a shared
machine hits both; the median and lower quartile of the ratios are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import switchnorm

SHAPES = ("32x32x32x64", "8x256x64", "128x8x8x128")


def padding_mask(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """(N, L, 1, ..., 1) booleans keeping a random prefix of at least half of each sample's axis 1."""
    lengths = np.random.default_rng(seed).integers(shape[1] // 2, shape[1] + 1, shape[0])
    keep = np.arange(shape[1])[None, :] < lengths[:, None]
    return jnp.asarray(keep.reshape(shape[0], shape[1], *([1] * (len(shape) - 2))))


def steps(shape: tuple[int, ...]) -> tuple[Callable[[], jax.Array], Callable[[], jax.Array]]:
    """The unmasked and the masked gradient step on one input, compiled and run once."""
    normalizers = switchnorm.default_normalizers(len(shape))
    x = jax.random.normal(jax.random.key(0), shape) + 3.0
    logits = jnp.zeros(len(normalizers))
    mask = padding_mask(shape)

    def loss(x, logits, mask):
        y, _ = switchnorm.switch_norm(x, logits, logits, normalizers=normalizers, mask=mask)
        return jnp.sum(jnp.sin(y))

    plain = jax.jit(jax.grad(lambda x, logits: loss(x, logits, None), (0, 1)))
    masked = jax.jit(jax.grad(loss, (0, 1)))
    runs = (
        lambda: jax.block_until_ready(plain(x, logits)),
        lambda: jax.block_until_ready(masked(x, logits, mask)),
    )
    for run in runs:
        run()
    return runs


def ratios(shape: tuple[int, ...], repeats: int) -> list[float]:
    """Per repeat: masked time over unmasked time, the two run back to back."""
    plain, masked = steps(shape)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        middle = time.perf_counter()
        masked()
        out.append((time.perf_counter() - middle) / (middle - start))
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="shapes such as 8x256x64")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    lines = ["shape            masked / unmasked fwd+bwd: median  lower quartile"]
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        r = ratios(shape, args.repeats)
        lines.append(f"{text:<16} {statistics.median(r):>31.2f}  {np.percentile(r, 25):>14.2f}")
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
