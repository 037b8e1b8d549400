"""What finer mixing weights cost: SwitchNorm with weights="channel" and "sample" over "layer".

    python -m benchmarks.weights_cost                           # every harness shape, float32, fwd+bwd
    python -m benchmarks.weights_cost --shapes 32x32x32x64 --repeats 9 --modes fwd fwdbwd

For each shape: the time of SwitchNorm (all default normalizers, training mode)
with ``weights="channel"`` and ``weights="sample"`` over the same layer with
``weights="layer"``, timed in one process with :mod:`benchmarks.ratios`'s
interleaving (every repeat runs the three back to back, order alternating; a
sample is >= ``--min-sample-ms`` of calls), reported as lower quartile / median
(range) of the per-repeat ratios. ``fwdbwd`` is the gradient of ``sum(y * dy)``
with respect to x and every parameter, as in :mod:`benchmarks.layer`.

Beside the times, the number of kernels of each compiled function (the ENTRY
computation's instructions less parameters, constants, tuples and bitcasts):
on a CPU the cell graph's (N, C) kernels cost ~10 us each whatever their size,
so this count, unlike the times, does not move with the machine's load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.heap import keep_freed_memory
from benchmarks.layer import SHAPES, WEIGHTS_VARIANTS, build, compile_ahead, parse_shape, shape_str
from benchmarks.ratios import _interleaved, _ratio, _spread

VARIANTS = ("sn", *WEIGHTS_VARIANTS)  # "sn" is weights="layer", the baseline of every ratio
_NOT_KERNELS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def kernel_count(compiled) -> int:
    """Instructions of a compiled function's ENTRY computation that run as kernels (fusions, reductions, calls)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY ") :].split("\n}\n", 1)[0].splitlines()[1:]
    opcodes = [re.search(r"([a-z][\w-]*)\(", line.split(" = ", 1)[1]) for line in entry if " = " in line]
    return sum(1 for op in opcodes if op and op.group(1) not in _NOT_KERNELS)


def measure_shape(shape: tuple[int, ...], dtype: str, mode: str, repeats: int, min_sample_s: float) -> dict:
    """The ratios channel / layer and sample / layer of one shape, dtype and mode, and kernel counts."""
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float32) + 1.0).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    built = {v: build(v, mode, x, dy) for v in VARIANTS}
    fns = {v: (compile_ahead(fn, args), args) for v, (fn, args) in built.items()}  # timed and counted
    samples = _interleaved(fns, repeats, min_sample_s)
    return {
        "shape": shape_str(shape),
        "dtype": dtype,
        "mode": mode,
        "layer_ms": float(np.percentile(samples["sn"], 25) * 1e3),
        "channel": _ratio(samples, "sn_channel", "sn"),
        "sample": _ratio(samples, "sn_sample", "sn"),
        "kernels": {v: kernel_count(compiled) for v, (compiled, _) in fns.items()},
    }


def table(rows: list[dict]) -> str:
    """Markdown: per shape, dtype and mode both ratios, the baseline's time and the kernel counts."""
    lines = [
        "| shape | dtype | pass | channel / layer | sample / layer | layer ms (q1) | kernels layer, channel, sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["kernels"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['mode']} | {_spread(r['channel'])} | {_spread(r['sample'])} "
            f"| {r['layer_ms']:.3f} | {k['sn']}, {k['sn_channel']}, {k['sn_sample']} |"
        )
    return "\n".join(lines)


def provenance(argv: list[str] | None, heap: str) -> str:
    """Command, date, machine with its load average, commit, versions and the heap setting."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    args = " ".join(argv if argv is not None else os.sys.argv[1:])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return "\n".join(
        [
            f"- command: `python -m benchmarks.weights_cost {args}`".rstrip(),
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average at the end {load}",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{jax.devices()[0].device_kind}; commit {commit.strip() or 'unknown'}, jax {jax.__version__}",
            f"- heap: {heap}",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--modes", nargs="+", default=["fwdbwd"], choices=["fwd", "fwdbwd"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--min-sample-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    rows = []
    for dtype in args.dtypes:
        for shape in args.shapes:
            for mode in args.modes:
                rows.append(measure_shape(shape, dtype, mode, args.repeats, args.min_sample_ms / 1e3))
                print(f"measured {rows[-1]['shape']} {dtype} {mode}", flush=True)
    report = provenance(argv, heap) + "\n\n" + table(rows)
    print(report)
    return report


if __name__ == "__main__":
    main()
