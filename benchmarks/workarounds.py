"""What each compiler workaround of :mod:`switchnorm._xla_cpu` buys: the layer with it and without it.

    python -m benchmarks.workarounds                        # the five benchmark shapes, float32
    python -m benchmarks.workarounds --dtypes float32 bfloat16 --repeats 21

For each shape, dtype and mode (forward, forward + backward, inference), one process
compiles Flax's Linen BatchNorm, SwitchNorm as it is, SwitchNorm with each workaround
switched off alone (``_xla_cpu.DISABLED``), and with all off (``_xla_cpu.ENABLED =
False``, the form every other platform runs), then times them interleaved. Printed:
each variant's time over SwitchNorm's as it is (lower quartile and median of the
per-repeat ratios): a ratio above 1 is what switching that workaround off costs. Also
the compiled temporaries over x's bytes, which two of the workarounds are for.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.heap import keep_freed_memory
from benchmarks.layer import build, parse_shape, temp_bytes
from benchmarks.ratios import _interleaved, bn_inference
from switchnorm import _xla_cpu

SHAPES = ("32x32x32x64", "8x56x56x256", "128x8x8x128", "64x256x64", "1024x512")
MODES = {"fwd": ("sn", "fwd"), "fwdbwd": ("sn", "fwdbwd"), "inference": ("sn_infer", "fwd")}


@contextlib.contextmanager
def switched_off(names: tuple[str, ...] | None) -> Iterator[None]:
    """The layer traced with ``names`` off (None: every workaround, the plain form), JAX's caches cleared."""
    saved = _xla_cpu.ENABLED, _xla_cpu.DISABLED
    if names is None:
        _xla_cpu.ENABLED = False
    else:
        _xla_cpu.DISABLED = frozenset(names)
    jax.clear_caches()
    try:
        yield
    finally:
        _xla_cpu.ENABLED, _xla_cpu.DISABLED = saved
        jax.clear_caches()


def variants() -> dict[str, tuple[str, ...] | None]:
    """Every variant measured: as it is, each workaround off alone, all off."""
    return {"as is": (), **{f"no {name}": (name,) for name in _xla_cpu.WORKAROUNDS}, "plain": None}


def measure(shape: tuple[int, ...], dtype: str, mode: str, repeats: int, min_sample_s: float) -> dict:
    """Each variant's ratio to SwitchNorm as it is, and its temporaries over x's bytes."""
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float32) + 1.0).astype(dtype)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    variant, kind = MODES[mode]
    fns = {}
    fn, args = bn_inference(x) if mode == "inference" else build("bn", kind, x, dy)
    fns["BatchNorm"] = (fn.lower(*args).compile(), args)
    for name, off in variants().items():
        with switched_off(off):
            fn, args = build(variant, kind, x, dy)
            fns[name] = (fn.lower(*args).compile(), args)
    samples = _interleaved(fns, repeats, min_sample_s)
    as_is = samples["as is"]
    row = {}
    for k, v in samples.items():
        ratio = v / as_is
        temp = temp_bytes(fns[k][0])
        row[k] = (
            float(np.percentile(ratio, 25)),
            float(np.median(ratio)),
            None if temp is None else temp / x.nbytes,
        )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-sample-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.machine()}; heap: {heap}")
    names = list(variants())
    print("time over SwitchNorm as it is: lower quartile / median; (temporaries / x)")
    print("| shape | dtype | mode | " + " | ".join(["BatchNorm", *names]) + " |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for shape in args.shapes:
        for dtype in args.dtypes:
            for mode in args.modes:
                row = measure(parse_shape(shape), dtype, mode, args.repeats, args.min_sample_ms / 1e3)
                cells = [
                    f"{q:.2f} / {m:.2f} ({t:.2f})" for q, m, t in (row[k] for k in ["BatchNorm", *names])
                ]
                print(f"| {shape} | {dtype} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
