"""Compile time of one training step: the training wing's ResNet with SwitchNorm vs with BatchNorm.

    python -m benchmarks.compile_time                  # 5 repeats, batch 8 of 8x8x1 (digits)
    python -m benchmarks.compile_time --repeats 9 --batch 32 --size 32

The step is ``switchnorm train``'s (``nnx.value_and_grad``, running averages
updated in place, one optax update) on ``resnet2d`` of :mod:`switchnorm.train.models`
with three normalizations:

* ``sn``        SwitchNorm with its four default normalizers (``--norm sn``);
* ``sn_bn``     SwitchNorm restricted to bn (``--norm bn``: the same custom VJP, one normalizer);
* ``flax_bn``   ``flax.nnx.BatchNorm`` in the same places (plain autodiff).

For each, a fresh function is traced and lowered (``jax.jit(step).lower``: tracing and
StableHLO) and then compiled by XLA (``.compile()``), and each phase is timed separately.
Repeats interleave the variants, so a slow spell on a shared machine hits all of them; the
medians are printed, with their ratios to ``flax_bn``. JAX's persistent compilation cache is
off, and every repeat traces a new function, so nothing is reused between repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from switchnorm.train import models

VARIANTS = ("sn", "sn_bn", "flax_bn")


def _flax_batchnorm(
    norm: str, features: int, *, spatial: bool, dtype: Any = None, weights: str = "layer", rngs: nnx.Rngs
):
    """``models.make_norm`` with Flax's own BatchNorm in every place (``weights`` is SwitchNorm's only)."""
    return nnx.BatchNorm(features, dtype=dtype, rngs=rngs)


def build(variant: str, batch: int, size: int) -> tuple[Any, tuple]:
    """A new (not yet traced) train-step function of the variant's model, and its arguments."""
    norm = "bn" if variant == "sn_bn" else "sn"
    if variant == "flax_bn":
        with mock.patch.object(models, "make_norm", _flax_batchnorm):
            model = models.resnet2d((size, size, 1), 10, norm="bn", rngs=nnx.Rngs(0))
    else:
        model = models.resnet2d((size, size, 1), 10, norm=norm, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(3e-3)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 1), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def step(params, rest, opt_state, x, labels):
        model = nnx.merge(graphdef, params, rest)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step, (params, rest, tx.init(params), x, labels)


def time_compile(variant: str, batch: int, size: int) -> tuple[float, float]:
    """(seconds to trace and lower, seconds for XLA to compile) of a fresh step function.

    JAX's caches are cleared first: the layer's cell graph is a nested jit whose
    trace a second step function of the same process would reuse, where a user's
    program traces it afresh.
    """
    jax.clear_caches()
    step, args = build(variant, batch, size)
    start = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step_arguments(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """``--repeats``, ``--batch`` and ``--size`` of a compile-time benchmark; JAX's persistent cache turned off."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=8)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = step_arguments(argv, __doc__)
    time_compile("sn", args.batch, args.size)  # warm JAX's own imports and caches once, untimed
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            samples[variant].append(time_compile(variant, args.batch, args.size))
    medians = {
        v: {
            "lower_s": statistics.median(s[0] for s in samples[v]),
            "compile_s": statistics.median(s[1] for s in samples[v]),
            "total_s": statistics.median(s[0] + s[1] for s in samples[v]),
        }
        for v in VARIANTS
    }
    device = jax.devices()[0].device_kind
    print(
        f"compile time of one resnet2d train step, batch {args.batch} of {args.size}x{args.size}x1, "
        f"median of {args.repeats}; jax {jax.__version__}, {device}, {platform.machine()}, commit {_commit()}"
    )
    print(
        f"{'variant':<8} {'trace+lower s':>14} {'XLA compile s':>14} {'total s':>9} {'total / flax_bn':>16}"
    )
    base = medians["flax_bn"]["total_s"]
    for v, m in medians.items():
        print(
            f"{v:<8} {m['lower_s']:>14.3f} {m['compile_s']:>14.3f} {m['total_s']:>9.3f} "
            f"{m['total_s'] / base:>16.2f}"
        )
    return medians


if __name__ == "__main__":
    main()
