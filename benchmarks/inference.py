"""Inference time of a collapsed Sparse SwitchNorm network against BatchNorm and the uncollapsed one.

    python -m benchmarks.inference                   # batch 64 of 32x32x3, 41 repeats
    python -m benchmarks.inference --batch 256 --repeats 61

One network, the example ``resnet2d`` of :mod:`switchnorm.train.models` (widths 32, 64), in
inference mode, forward pass only, jitted; in one process, interleaved (every repeat runs
every variant once, alternating the order), reporting the median and lower quartile of the
seconds per call and their ratios:

* ``bn``          the same network with ``flax.nnx.BatchNorm`` in every norm slot;
* ``ssn``         ``--norm ssn`` at radius 1, every layer's weights one-hot on bn;
* ``collapsed``   ``switchnorm.collapse(ssn)``: every layer a folded ``ChannelAffine``;
* ``ssn_mixed``   the same at weights one-hot on a mix (ln/ln, in/bn, gn/gn, bn/bn, ...);
* ``collapsed_mixed``  its collapse: ``CollapsedNorm`` layers and folded bn layers.

Beside the times, XLA's cost analysis of each compiled forward (flops, bytes accessed), which
no other process on the machine can disturb.

The target: collapsed / bn <= 1.05 (the fold is what a folded BatchNorm computes).
Prints a table; ``--json PATH`` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import switchnorm
from benchmarks.heap import keep_freed_memory
from benchmarks.layer import calibrate, timed
from switchnorm.train import models

CYCLE = (("ln", "ln"), ("in", "bn"), ("gn", "gn"), ("bn", "bn"), ("bn", "ln"))
"""The mixed network's choices, layer after layer (mean, var)."""


def _one_hot(layer: switchnorm.SwitchNorm, mean: str, var: str) -> None:
    layer.mean_logits[...] = jnp.array([3.0 if n == mean else 0.0 for n in layer.normalizers])
    layer.var_logits[...] = jnp.array([3.0 if n == var else 0.0 for n in layer.normalizers])


def _ssn_network(input_shape: tuple[int, ...], mixed: bool, seed: int) -> nnx.Module:
    """resnet2d with sparsestmax layers one-hot at radius 1, random running averages, in eval mode."""
    model = models.build_model("resnet2d", input_shape, 10, norm="ssn", seed=seed)
    rng = np.random.default_rng(seed)
    norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, switchnorm.SwitchNorm)]
    for i, layer in enumerate(norms):
        _one_hot(layer, *(CYCLE[i % len(CYCLE)] if mixed else ("bn", "bn")))
        c = layer.num_features
        layer.mean[...] = jnp.asarray(rng.normal(0, 0.1, c), jnp.float32)
        layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    switchnorm.set_radius(model, 1.0)
    model.eval()
    return model


def _batch_norm_network(ssn: nnx.Module) -> nnx.Module:
    """A copy of ``ssn`` with an ``nnx.BatchNorm`` (same running averages) in every norm slot."""
    model = nnx.merge(*nnx.split(ssn))
    for path, layer in list(nnx.iter_graph(model)):
        if not isinstance(layer, switchnorm.SwitchNorm):
            continue
        norm = nnx.BatchNorm(layer.num_features, use_running_average=True, rngs=nnx.Rngs(0))
        norm.mean[...], norm.var[...] = layer.mean[...], layer.var[...]
        norm.scale[...], norm.bias[...] = layer.scale[...], layer.bias[...]
        parent: Any = model
        for step in path[:-1]:
            parent = parent[step] if isinstance(step, int) else getattr(parent, step)
        if isinstance(path[-1], int):
            parent[path[-1]] = norm
        else:
            setattr(parent, path[-1], norm)
    return model


def _jitted_forward(model: nnx.Module) -> tuple[Any, Any]:
    """(jitted fn(state, x), state): the model's forward with its arrays as arguments."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def variants(input_shape: tuple[int, ...], seed: int = 0) -> dict[str, nnx.Module]:
    ssn = _ssn_network(input_shape, mixed=False, seed=seed)
    mixed = _ssn_network(input_shape, mixed=True, seed=seed)
    return {
        "bn": _batch_norm_network(ssn),
        "ssn": ssn,
        "collapsed": switchnorm.collapse(ssn)[0],
        "ssn_mixed": mixed,
        "collapsed_mixed": switchnorm.collapse(mixed)[0],
    }


def _cost(fn: Any, args: tuple) -> dict[str, float]:
    """XLA's own estimate of the compiled forward's flops and bytes accessed: free of timing noise."""
    analysis = fn.lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis or {}
    return {"flops": float(analysis.get("flops", -1)), "bytes": float(analysis.get("bytes accessed", -1))}


def measure(models_by_name: dict[str, nnx.Module], x: jax.Array, repeats: int, min_sample_s: float):
    """Median and lower quartile of seconds per call, interleaved; XLA's cost; each output's max |diff|."""
    fns = {}
    for name, model in models_by_name.items():
        fn, state = _jitted_forward(model)
        fns[name] = (fn, (state, x))
    inner = {k: calibrate(fn, args, min_sample_s) for k, (fn, args) in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            samples[k].append(timed(*fns[k], inner[k]))
    outputs = {k: np.asarray(fn(*args)) for k, (fn, args) in fns.items()}
    return {
        k: {
            "median_s": statistics.median(v),
            "lower_quartile_s": float(np.percentile(v, 25)),
            "calls_per_sample": inner[k],
            **_cost(*fns[k]),
            "max_abs_diff_vs_uncollapsed": float(
                np.max(np.abs(outputs[k] - outputs["ssn_mixed" if "mixed" in k else "ssn"]))
            ),
        }
        for k, v in samples.items()
    }


RATIOS = (("collapsed", "bn"), ("collapsed", "ssn"), ("ssn", "bn"), ("collapsed_mixed", "ssn_mixed"))


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'variant':<16} {'median ms':>10} {'q25 ms':>8} {'GFLOP':>7} {'MB moved':>9}  max |y - uncollapsed|"
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<16} {r['median_s'] * 1e3:>10.3f} {r['lower_quartile_s'] * 1e3:>8.3f} "
            f"{r['flops'] / 1e9:>7.3f} {r['bytes'] / 1e6:>9.2f}  {r['max_abs_diff_vs_uncollapsed']:.3g}"
        )
    for a, b in RATIOS:
        median = results[a]["median_s"] / results[b]["median_s"]
        quartile = results[a]["lower_quartile_s"] / results[b]["lower_quartile_s"]
        lines.append(f"{a} / {b}: {median:.3f} (median), {quartile:.3f} (lower quartile)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--min-sample-s", type=float, default=0.05)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    shape = (args.size, args.size, 3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, *shape)), jnp.float32)
    results = measure(variants(shape), x, args.repeats, args.min_sample_s)
    device = jax.devices()[0]
    print(f"{device.device_kind} ({jax.default_backend()}), {platform.machine()}; x {tuple(x.shape)}; {heap}")
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "shape": list(x.shape), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
