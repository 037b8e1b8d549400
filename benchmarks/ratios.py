"""SwitchNorm over Flax BatchNorm, the ratios the performance targets name, in one table.

    python -m benchmarks.ratios                      # every shape, float32 and bfloat16 (~10 min here)
    python -m benchmarks.ratios --dtypes float32 --repeats 15
    python -m benchmarks.ratios --sweep              # also the sweep figures, docs/figures/sweep-*.png

For each shape and dtype: forward and forward + backward time of SwitchNorm
(all default normalizers, training mode, gradient of ``sum(y * dy)`` w.r.t. x
and every parameter) over ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``;
inference mode (running averages) over Linen BatchNorm's inference; SwitchNorm's
compiled forward + backward temporaries as a fraction of x's size. Then the
peak memory of a compiled full training step (the residual CNN of
:mod:`benchmarks.layer`, SGD with momentum), SwitchNorm over BatchNorm, from
``compiled.memory_analysis()`` (arguments + outputs + temporaries: XLA:CPU's
``peak_memory_in_bytes`` leaves the temporaries out).

Timing: every repeat runs every variant once, in alternating order, so a slow
spell of a shared machine hits all of them; a sample is >= ``--min-sample-ms``
of back-to-back calls. A ratio is reported as the lower quartile and the median
of the per-repeat ratios (sn / baseline in the same repeat) and their range.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.heap import keep_freed_memory
from benchmarks.layer import (
    SHAPES,
    DenseMLP,
    build,
    calibrate,
    mlp_step_fns,
    parse_shape,
    shape_str,
    timed,
    train_step_fns,
)

SWEEPS = {  # name -> shapes: one axis varies, the others stay at 32x32x32x64's
    "batch": [(n, 32, 32, 64) for n in (4, 8, 16, 32, 64)],
    "spatial": [(32, s, s, 64) for s in (4, 8, 16, 32, 48)],
    "channels": [(32, 32, 32, c) for c in (16, 32, 64, 128, 256)],
}


def _nnx_batchnorm(mode: str, x: jax.Array, dy: jax.Array) -> tuple[Callable, tuple]:
    """``flax.nnx.BatchNorm`` in training mode, as a jitted pure function of (state, x[, dy])."""
    layer = nnx.BatchNorm(x.shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params, rest, x):
        layer = nnx.merge(graphdef, params, rest, copy=True)
        return layer(x), nnx.state(layer, nnx.BatchStat)

    if mode == "fwd":
        return jax.jit(forward), (params, rest, x)

    def loss(params, rest, x, dy):
        y, stats = forward(params, rest, x)
        return jnp.sum(y.astype(jnp.float32) * dy), stats

    return jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True)), (params, rest, x, dy)


def bn_inference(x: jax.Array) -> tuple[Callable, tuple]:
    """``flax.linen.BatchNorm(use_running_average=True)``, forward."""
    module = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    variables = module.init(jax.random.key(0), x)
    return jax.jit(module.apply), (variables, x)


def _interleaved(
    fns: dict[str, tuple[Callable, tuple]], repeats: int, min_sample_s: float
) -> dict[str, np.ndarray]:
    """Seconds per call of every fn, ``repeats`` samples each, interleaved."""
    inner = {k: calibrate(f, a, min_sample_s) for k, (f, a) in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys if r % 2 == 0 else keys[::-1]:
            samples[k].append(timed(*fns[k], inner[k]))
    return {k: np.asarray(v) for k, v in samples.items()}


def _ratio(samples: dict[str, np.ndarray], num: str, den: str) -> dict[str, float]:
    """Lower quartile, median, min and max of the per-repeat ratio num / den."""
    r = samples[num] / samples[den]
    return {
        "q1": float(np.percentile(r, 25)),
        "median": float(np.median(r)),
        "min": float(r.min()),
        "max": float(r.max()),
    }


def measure_shape(shape: tuple[int, ...], dtype: str, repeats: int, min_sample_s: float) -> dict:
    """Every ratio of one shape and dtype, and SwitchNorm's fwd+bwd time."""
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float32) + 1.0).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    row: dict = {"shape": shape_str(shape), "dtype": dtype}
    for mode in ("fwd", "fwdbwd"):
        fns = {v: build(v, mode, x, dy) for v in ("sn", "bn")}
        fns["nnx_bn"] = _nnx_batchnorm(mode, x, dy)
        if mode == "fwd":
            fns["sn_infer"] = build("sn_infer", "fwd", x, dy)
            fns["bn_infer"] = bn_inference(x)
        samples = _interleaved(fns, repeats, min_sample_s)
        row[f"{mode}_sn_ms"] = float(np.percentile(samples["sn"], 25) * 1e3)
        row[f"{mode}_bn_ms"] = float(np.percentile(samples["bn"], 25) * 1e3)
        row[f"{mode}/linen"] = _ratio(samples, "sn", "bn")
        row[f"{mode}/nnx"] = _ratio(samples, "sn", "nnx_bn")
        if mode == "fwd":
            row["infer/linen"] = _ratio(samples, "sn_infer", "bn_infer")
        else:
            fn, args = fns["sn"]
            row["temp/x"] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / x.nbytes
    return row


MLP_STEP = {"batch": 1024, "inputs": 256, "width": 512}
"""The (N, C) training step whose memory :func:`train_step_peak_memory` also reports."""


def train_step_peak_memory(batch: int = 32, size: int = 32, features: int = 32) -> dict[str, float]:
    """Memory (bytes) of one compiled training step, sn and bn: arguments + outputs + temporaries.

    Keys "sn" and "bn": the residual CNN of :func:`benchmarks.layer.train_step_fns`, the step
    the harness times; "mlp/sn" and "mlp/bn": :class:`benchmarks.layer.DenseMLP` at
    :data:`MLP_STEP`, whose layers take the (N, C) path.
    """
    steps = dict(train_step_fns(batch, size, features, "float32"))
    steps.update({f"mlp/{k}": v for k, v in mlp_step_fns(**MLP_STEP, dtype="float32").items()})
    peaks = {}
    for name, (step, args) in steps.items():
        memory = step.lower(*args).compile().memory_analysis()
        # XLA:CPU's peak_memory_in_bytes counts arguments and outputs only (1.25 MiB for both
        # here), so the peak is bounded by all buffers the step holds: arguments, outputs and
        # temporaries, less what outputs reuse of the arguments.
        peaks[name] = float(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    return peaks


def _spread(r: dict[str, float]) -> str:
    return f"{r['q1']:.2f} / {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def row_line(r: dict) -> str:
    """One shape and dtype as a row of :func:`table`."""
    return (
        f"| {r['shape']} | {r['dtype']} | {_spread(r['fwd/linen'])} | {_spread(r['fwd/nnx'])} "
        f"| {_spread(r['fwdbwd/linen'])} | {_spread(r['fwdbwd/nnx'])} | {_spread(r['infer/linen'])} "
        f"| {r['temp/x']:.3f} | {r['fwd_sn_ms']:.3f}, {r['fwdbwd_sn_ms']:.3f} |"
    )


def table(rows: list[dict], peaks: dict[str, float]) -> str:
    """The markdown table: per shape and dtype every ratio, then the training-step memory."""
    lines = [
        "Ratios SwitchNorm / baseline: lower quartile / median (range) of the per-repeat ratios.",
        "",
        "| shape | dtype | fwd / linen BN | fwd / nnx BN | fwd+bwd / linen BN | fwd+bwd / nnx BN "
        "| inference / linen BN inference | fwd+bwd temporaries / x | sn fwd, fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row_line(r) for r in rows]
    if peaks:
        lines += [
            "",
            f"Training step (residual CNN, batch 32, 32x32x3, 32 features) memory (arguments + outputs + temporaries): sn {peaks['sn'] / 2**20:.2f} MiB, "
            f"bn {peaks['bn'] / 2**20:.2f} MiB, sn / bn = {peaks['sn'] / peaks['bn']:.3f}.",
            f"Training step (MLP, {DenseMLP.depth} x Dense {MLP_STEP['width']} + norm, batch {MLP_STEP['batch']}, "
            f"{MLP_STEP['inputs']} inputs), the same: sn {peaks['mlp/sn'] / 2**20:.2f} MiB, "
            f"bn {peaks['mlp/bn'] / 2**20:.2f} MiB, sn / bn = {peaks['mlp/sn'] / peaks['mlp/bn']:.3f}.",
        ]
    return "\n".join(lines)


def sweep(out_dir: str, dtype: str, repeats: int, min_sample_s: float) -> list[str]:
    """Forward + backward time of SwitchNorm and Linen BatchNorm along each sweep, drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, shapes in SWEEPS.items():
        sn_ms, bn_ms, ratio = [], [], []
        for shape in shapes:
            x = (jax.random.normal(jax.random.key(0), shape) + 1.0).astype(dtype)
            fns = {v: build(v, "fwdbwd", x, x) for v in ("sn", "bn")}
            samples = _interleaved(fns, repeats, min_sample_s)
            sn_ms.append(np.percentile(samples["sn"], 25) * 1e3)
            bn_ms.append(np.percentile(samples["bn"], 25) * 1e3)
            ratio.append(_ratio(samples, "sn", "bn")["q1"])
            print(
                f"sweep {name} {shape_str(shape)}: sn {sn_ms[-1]:.3f} ms bn {bn_ms[-1]:.3f} ms ratio {ratio[-1]:.2f}"
            )
        axis = {"batch": 0, "spatial": 1, "channels": 3}[name]
        values = [s[axis] for s in shapes]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
        left.plot(values, sn_ms, "o-", label="SwitchNorm")
        left.plot(values, bn_ms, "s-", label="flax.linen.BatchNorm")
        left.set(xlabel=name, ylabel="fwd+bwd ms (lower quartile)", xscale="log", yscale="log")
        left.legend()
        right.plot(values, ratio, "o-")
        right.axhline(1.25, color="grey", linestyle="--", label="target 1.25")
        right.set(
            xlabel=name, ylabel="SwitchNorm / BatchNorm", xscale="log", ylim=(0, max(2.0, max(ratio) * 1.1))
        )
        right.legend()
        fig.suptitle(f"fwd+bwd, {dtype}, around 32x32x32x64 ({name} varies)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"sweep-{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def provenance(argv: list[str] | None, heap: str) -> str:
    """Command, date, machine, commit, versions and the heap setting (:mod:`benchmarks.heap`), one line each."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    import flax

    args = " ".join(argv if argv is not None else os.sys.argv[1:])
    return "\n".join(
        [
            f"- command: `python -m benchmarks.ratios {args}`".rstrip(),
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.1f}",
            f"- commit: {commit}; jax {jax.__version__}, flax {flax.__version__}",
            f"- heap: {heap}",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--min-sample-ms", type=float, default=20.0)
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the training-step memory"
    )
    parser.add_argument("--sweep", action="store_true", help="also draw docs/figures/sweep-*.png")
    parser.add_argument("--figures", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures"))
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    min_sample_s = args.min_sample_ms / 1e3
    rows = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            rows.append(measure_shape(shape, dtype, args.repeats, min_sample_s))
            print("measured", row_line(rows[-1]), flush=True)  # a timeout keeps the rows so far
    peaks = train_step_peak_memory() if args.memory else {}
    report = provenance(argv, heap) + "\n\n" + table(rows, peaks)
    print(report)
    if args.sweep:
        for path in sweep(args.figures, "float32", args.repeats, min_sample_s):
            print("wrote", path)
    return report


if __name__ == "__main__":
    main()
