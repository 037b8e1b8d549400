"""Compile and eager-init time of Flax's ImageNet ResNet-18 (Linen) with SwitchNorm vs BatchNorm.

    python -m benchmarks.resnet_compile                     # 5 repeats
    python -m benchmarks.resnet_compile --repeats 9 --eager-repeats 3

The model is ``examples/linen_resnet.py``'s (the structure of Flax's ImageNet example) at
ResNet-18's stages ``[2, 2, 2, 2]``, 32 filters, ImageNet's stem, on a batch of 8 images
of 64x64x3; ``norm`` is ``switchnorm.linen.SwitchNorm`` (its four default normalizers)
or ``flax.linen.BatchNorm`` with the same arguments. Two measurements:

* **compile**: the example's train step (``value_and_grad``, running averages, one
  SGD update), a fresh function traced, lowered and compiled by XLA for each variant,
  variants interleaved; medians and the ratio to BatchNorm.
* **eager init**: ``model.init`` un-jitted, as users call it, each variant in fresh
  processes (so that nothing is cached): the first call in the process and the next
  one (a new key); medians over the processes and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VARIANTS = ("switchnorm", "batchnorm")
SHAPE = (8, 64, 64, 3)


def _example() -> Any:
    sys.path.insert(0, str(EXAMPLES))
    import linen_resnet

    return linen_resnet


def model(variant: str) -> tuple[Any, Any]:
    """The ResNet-18 and the patch that gives it ``variant``'s norm (a context manager)."""
    example = _example()
    net = example.ResNet(stage_sizes=[2, 2, 2, 2], num_classes=10, num_filters=32, stem="imagenet")
    norm = nn.BatchNorm if variant == "batchnorm" else example.snn.SwitchNorm
    return net, mock.patch.object(example.snn, "SwitchNorm", norm)


def compile_seconds(variant: str) -> float:
    """Seconds to trace, lower and compile a fresh train step of the variant."""
    net, patch = model(variant)
    x = jnp.ones(SHAPE)
    labels = jnp.zeros(SHAPE[0], jnp.int32)
    with patch:
        variables = jax.jit(lambda: net.init(jax.random.key(0), x))()  # outside the timing
        tx = optax.sgd(0.1, momentum=0.9)
        step, _ = _example().make_steps(net, tx)
        step = jax.jit(step.__wrapped__)  # a new function: nothing cached from an earlier repeat
        start = time.perf_counter()
        step.lower(
            variables["params"], variables["batch_stats"], tx.init(variables["params"]), x, labels
        ).compile()
        return time.perf_counter() - start


def eager_init(variant: str) -> list[float]:
    """This process's un-jitted ``model.init`` times: the first call and the next."""
    net, patch = model(variant)
    x = jnp.ones(SHAPE)
    times = []
    with patch:
        for key in range(2):
            start = time.perf_counter()
            jax.block_until_ready(net.init(jax.random.key(key), x))
            times.append(time.perf_counter() - start)
    return times


def _eager_in_fresh_process(variant: str) -> list[float]:
    code = f"import json; from benchmarks.resnet_compile import eager_init; print(json.dumps(eager_init({variant!r})))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    compile_seconds("batchnorm")  # JAX's own first-use costs, untimed
    compiled: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            jax.clear_caches()
            compiled[variant].append(compile_seconds(variant))
    eager: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for r in range(args.eager_repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            eager[variant].append(_eager_in_fresh_process(variant))
    print(
        f"Linen ResNet-18 (32 filters, ImageNet stem), batch {SHAPE}; jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, commit {_commit()}"
    )
    print("| measurement | SwitchNorm s | BatchNorm s | ratio |")
    print("|---|---|---|---|")
    rows = {"train step: trace + lower + compile": {v: statistics.median(s) for v, s in compiled.items()}}
    for i, name in enumerate(("eager model.init, first in the process", "eager model.init, the next call")):
        rows[name] = {v: statistics.median(t[i] for t in eager[v]) for v in VARIANTS}
    for name, row in rows.items():
        sn, bn = row["switchnorm"], row["batchnorm"]
        print(f"| {name} | {sn:.3f} | {bn:.3f} | {sn / bn:.2f} |")
    return rows


if __name__ == "__main__":
    main()
