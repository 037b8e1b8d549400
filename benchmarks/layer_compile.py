"""One layer's compile time and kernel count: SwitchNorm against Flax BatchNorm.

    python -m benchmarks.layer_compile                            # 128x8x8x128 and 1024x512
    python -m benchmarks.layer_compile --shapes 32x32x32x64 --repeats 9

For each shape, three jitted functions of the Linen layers of
:mod:`benchmarks.layer` (training forward, training forward + backward of
``sum(y * dy)`` w.r.t. x and every parameter, inference forward) are lowered
and compiled afresh every repeat, SwitchNorm and ``flax.linen.BatchNorm``
interleaved; the medians are printed with their ratio. The kernel count is the
number of fusions, custom calls and other launches in the compiled ENTRY
computation, as fewest-most where a ``lax.cond``'s branches differ
(:func:`kernel_count`): on a CPU each costs a few microseconds to
run whatever its size, and tens of milliseconds for XLA to compile, so it is
what the small-shape ratios and the compile-time ratio follow.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.layer import build, parse_shape, shape_str
from benchmarks.ratios import bn_inference

KERNEL = re.compile(
    r"= (?:\([^=]*\)|\S+) (fusion|custom-call|reduce|reduce-window|conditional|copy|while|sort|dot)\("
)
"""An instruction of the ENTRY computation that runs as a kernel of its own."""

FUNCTIONS = {  # name -> (variant of benchmarks.layer for sn and bn, mode)
    "fwd": ("sn", "bn", "fwd"),
    "fwd+bwd": ("sn", "bn", "fwdbwd"),
    "inference": ("sn_infer", "bn_infer", "fwd"),
}


def _computation(text: str, name: str) -> str:
    """The body of the named computation in an HLO module's text."""
    start = text.index(f"\n{name} ") if f"\n{name} " in text else text.index(f"\n{name}.")
    return text[start : text.index("\n}", start)]


def kernel_count(compiled_text: str) -> tuple[int, int]:
    """Kernels launched by a compiled executable: the launching instructions of its ENTRY computation.

    A ``conditional`` runs one of its branches: it counts as one launch plus the
    kernels of one branch (one level deep), its smallest for the first number
    returned and its largest for the second: the fewest and the most that run.
    """
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    fewest = most = len(KERNEL.findall(entry))
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", entry):
        counts = [len(KERNEL.findall(_computation(compiled_text, b.strip()))) for b in branches.split(",")]
        fewest, most = fewest + min(counts), most + max(counts)
    return fewest, most


def compile_once(variant: str, mode: str, x: jax.Array, dy: jax.Array) -> tuple[float, tuple[int, int]]:
    """(seconds to lower and compile a freshly built function, its :func:`kernel_count`).

    Each call clears JAX's caches and builds a new module and a new jitted closure, so nothing
    is reused (the layer's cell graph is a nested jit whose trace JAX would otherwise keep).
    """
    jax.clear_caches()
    fn, args = bn_inference(x) if variant == "bn_infer" else build(variant, mode, x, dy)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return time.perf_counter() - start, kernel_count(compiled.as_text())


def measure(shape: tuple[int, ...], repeats: int) -> list[dict]:
    """Median compile seconds and kernel counts of every function of one shape, sn and bn."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) + 1.0
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    rows = []
    for name, (sn, bn, mode) in FUNCTIONS.items():
        samples: dict[str, list[float]] = {sn: [], bn: []}
        kernels: dict[str, tuple[int, int]] = {}
        for r in range(repeats):
            for variant in (sn, bn) if r % 2 == 0 else (bn, sn):
                seconds, kernels[variant] = compile_once(variant, mode, x, dy)
                samples[variant].append(seconds)
        sn_s, bn_s = statistics.median(samples[sn]), statistics.median(samples[bn])
        rows.append(
            {
                "shape": shape_str(shape),
                "function": name,
                "sn_s": sn_s,
                "bn_s": bn_s,
                "sn_kernels": kernels[sn],
                "bn_kernels": kernels[bn],
            }
        )
    return rows


def _span(kernels: tuple[int, int]) -> str:
    """``n`` or ``fewest-most`` (a conditional's branches differ)."""
    return str(kernels[0]) if kernels[0] == kernels[1] else f"{kernels[0]}-{kernels[1]}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(128, 8, 8, 128), (1024, 512)])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; medians of {args.repeats} compiles")
    print(
        "| shape | function | SwitchNorm s | BatchNorm s | ratio | SwitchNorm kernels | BatchNorm kernels |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    rows = []
    for shape in args.shapes:
        for row in measure(shape, args.repeats):
            rows.append(row)
            print(
                f"| {row['shape']} | {row['function']} | {row['sn_s']:.3f} | {row['bn_s']:.3f} "
                f"| {row['sn_s'] / row['bn_s']:.2f} | {_span(row['sn_kernels'])} | {_span(row['bn_kernels'])} |",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
