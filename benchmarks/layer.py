"""SwitchNorm against the layers a user would pick instead, on one machine.

    python -m benchmarks.layer                       # the full run (five shapes, three dtypes)
    python -m benchmarks.layer --quick               # one small shape, float32
    python -m benchmarks.layer --shapes 32x32x32x64 --dtypes float32 --repeats 9

Times, in one process and interleaving the variants (every repeat runs every
variant once before the next repeat starts, so a slow spell on a shared machine
hits all of them), the medians after compilation of

* ``sn``        SwitchNorm, all default normalizers, training mode;
* ``sn_infer``  SwitchNorm, inference mode (running averages for bn);
* ``bn``        ``flax.linen.BatchNorm``, training mode;
* ``gn``        ``flax.linen.GroupNorm`` with SwitchNorm's default group count;
* ``naive``     Flax's BatchNorm, InstanceNorm, LayerNorm and GroupNorm run
                separately and blended with softmax weights (the straightforward
                port that reads x once per normalizer);
* ``probe``     ``x * 2 + 1``: one read and one write of x, the bandwidth floor;

for the forward pass (``fwd``) and forward plus backward (``fwdbwd``: gradient
of ``sum(y * dy)`` with respect to x and every parameter, the running-average
update included) on every shape and dtype. Every variant's compiled temporary
memory comes from ``jax.jit(f).lower(...).compile().memory_analysis()``. It
also times one full training step (forward, backward, optax update) of a small
residual CNN with SwitchNorm against the same network with BatchNorm.

Writes ``layer-<device>.json`` (every median and memory figure) and
``layer-<device>.md`` (ratios to SwitchNorm and the performance targets in TARGETS) to
``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.heap import keep_freed_memory
from switchnorm import default_normalizers, default_num_groups
from switchnorm import linen as snn

SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 32, 32, 64),
    (8, 56, 56, 256),
    (128, 8, 8, 128),
    (64, 256, 64),
    (1024, 512),
)
DTYPES = ("float32", "bfloat16")
VARIANTS = ("sn", "sn_infer", "bn", "gn", "naive", "probe")
# SwitchNorm with finer mixing weights, training mode; timed by benchmarks.weights_cost, not the full run.
WEIGHTS_VARIANTS = {"sn_channel": "channel", "sn_sample": "sample"}
MODES = ("fwd", "fwdbwd")

TARGETS = (  # (description, variant, mode, what, bound): ratio variant/sn <= or >= bound
    ("forward: SwitchNorm / Flax BatchNorm <= 1.10", "bn", "fwd", "time", ("inv_le", 1.10)),
    ("fwd+bwd: SwitchNorm / Flax BatchNorm <= 1.25", "bn", "fwdbwd", "time", ("inv_le", 1.25)),
    ("fwd+bwd: naive / SwitchNorm >= 3", "naive", "fwdbwd", "time", ("ge", 3.0)),
    ("fwd+bwd temp memory: SwitchNorm <= 1.1 x BatchNorm", "bn", "fwdbwd", "temp", ("inv_le", 1.10)),
    ("forward: SwitchNorm / bandwidth probe <= 2.0", "probe", "fwd", "time", ("inv_le", 2.0)),
)


# --------------------------------------------------------------------------
# Variants: each is a Linen module, so all pay the same front-end overhead.
# --------------------------------------------------------------------------


class NaiveSwitchNorm(nn.Module):
    """Four Flax layers run separately, outputs blended with softmax weights."""

    @nn.compact
    def __call__(self, x):
        names = default_normalizers(x.ndim)
        groups = default_num_groups(x.shape[-1])
        plain = dict(use_scale=False, use_bias=False, epsilon=1e-5)
        layers = {
            "bn": lambda: nn.BatchNorm(use_running_average=False, **plain),
            "in": lambda: nn.InstanceNorm(**plain),
            "ln": lambda: nn.LayerNorm(reduction_axes=tuple(range(1, x.ndim)), **plain),
            "gn": lambda: nn.GroupNorm(num_groups=groups, **plain),
        }
        logits = self.param("logits", nn.initializers.zeros, (len(names),))
        weights = jax.nn.softmax(logits)
        y = sum(w * layers[n]()(x).astype(jnp.float32) for w, n in zip(weights, names, strict=True))
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (y * scale + bias).astype(x.dtype)


class Probe(nn.Module):
    """x * 2 + 1: one read, one write."""

    @nn.compact
    def __call__(self, x):
        return x * 2 + 1


def make_module(variant: str, x: jax.Array) -> tuple[nn.Module, dict]:
    """The module and the ``apply`` keyword arguments for one variant."""
    groups = default_num_groups(x.shape[-1])
    if variant == "sn":
        return snn.SwitchNorm(use_running_average=False), {}
    if variant == "sn_infer":
        return snn.SwitchNorm(use_running_average=True), {}
    if variant in WEIGHTS_VARIANTS:
        return snn.SwitchNorm(use_running_average=False, weights=WEIGHTS_VARIANTS[variant]), {}
    if variant == "bn":
        return nn.BatchNorm(use_running_average=False, epsilon=1e-5), {}
    if variant == "gn":
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5), {}
    if variant == "naive":
        return NaiveSwitchNorm(), {}
    if variant == "probe":
        return Probe(), {}
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS + tuple(WEIGHTS_VARIANTS)}.")


def build(variant: str, mode: str, x: jax.Array, dy: jax.Array):
    """(jitted function, its arguments) for one variant and mode."""
    module, _ = make_module(variant, x)
    variables = module.init(jax.random.key(0), x)
    params = variables.get("params", {})
    state = {k: v for k, v in variables.items() if k != "params"}
    # Non-trivial logits, so no weight is special-cased away by the compiler.
    params = jax.tree.map(lambda p: p + 0.01 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
    mutable = ["batch_stats"] if "batch_stats" in state and variant != "sn_infer" else False

    def forward(params, state, x):
        out = module.apply({"params": params, **state}, x, mutable=mutable)
        return out if mutable else (out, {})

    if mode == "fwd":
        return jax.jit(forward), (params, state, x)

    def loss(params, state, x, dy):
        y, updates = forward(params, state, x)
        return jnp.sum(y.astype(jnp.float32) * dy), updates

    grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
    return jax.jit(grad), (params, state, x, dy)


def compile_ahead(fn, args):
    """``fn`` compiled for ``args`` once: timed, and asked for its memory."""
    return fn.lower(*args).compile()


def temp_bytes(compiled) -> int | None:
    """Compiled temporary memory, or None if the backend does not report it."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:
        return None
    if analysis is None:
        return None
    return int(getattr(analysis, "temp_size_in_bytes", 0))


def timed(fn, args, inner: int) -> float:
    """Seconds per call over ``inner`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / inner


def calibrate(fn, args, min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s``."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    per_call = min(timed(fn, args, 1) for _ in range(3))
    return max(1, int(np.ceil(min_sample_s / max(per_call, 1e-7))))


def interleaved_medians(
    fns: dict[Any, tuple[Callable, tuple]], repeats: int, min_sample_s: float
) -> dict[Any, dict[str, float]]:
    """Median (and spread) of seconds per call, every repeat running every fn."""
    inner = {k: calibrate(fn, args, min_sample_s) for k, (fn, args) in fns.items()}
    samples: dict[Any, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        order = keys if r % 2 == 0 else keys[::-1]  # cancel drift within a repeat
        for k in order:
            fn, args = fns[k]
            samples[k].append(timed(fn, args, inner[k]))
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "calls_per_sample": inner[k],
        }
        for k, v in samples.items()
    }


# --------------------------------------------------------------------------
# Full training step: a small residual CNN, SwitchNorm vs BatchNorm.
# --------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    features: int
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        h = nn.relu(self.norm()(h))
        h = nn.Conv(self.features, (3, 3), use_bias=False)(h)
        return nn.relu(x + self.norm()(h))


def norm_factory(norm_name: str, train: bool) -> Callable[[], nn.Module]:
    """A maker of the step's normalization layers: SwitchNorm ("sn") or Flax BatchNorm ("bn")."""
    if norm_name == "sn":
        return lambda: snn.SwitchNorm(use_running_average=not train)
    if norm_name == "bn":
        return lambda: nn.BatchNorm(use_running_average=not train, epsilon=1e-5)
    raise ValueError(f"norm_name must be 'sn' or 'bn', got {norm_name!r}.")


class ResidualCNN(nn.Module):
    """Stem conv, three residual blocks, global average pool, dense head."""

    norm_name: str = "sn"
    features: int = 32
    num_blocks: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = norm_factory(self.norm_name, train)
        x = nn.relu(norm()(nn.Conv(self.features, (3, 3), use_bias=False)(x)))
        for _ in range(self.num_blocks):
            x = ResidualBlock(self.features, norm)(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class DenseMLP(nn.Module):
    """Dense layers of ``width`` features, each normalized: the (N, C) path. Then a dense head."""

    norm_name: str = "sn"
    width: int = 512
    depth: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = norm_factory(self.norm_name, train)
        for _ in range(self.depth):
            x = nn.relu(norm()(nn.Dense(self.width)(x)))
        return nn.Dense(self.num_classes)(x)


def _sgd_steps(make_model: Callable[[str], nn.Module], x: jax.Array):
    """For "sn" and "bn": the jitted training step of ``make_model(name)`` on x and random labels."""
    import optax

    labels = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 10)
    tx = optax.sgd(0.1, momentum=0.9)
    fns = {}
    for name in ("sn", "bn"):
        model = make_model(name)
        variables = model.init(jax.random.key(0), x)
        params, stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)

        def step(params, stats, opt_state, x, labels, model=model):
            def loss_fn(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), labels
                ).mean()
                return loss, updates["batch_stats"]

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        fns[name] = (jax.jit(step), (params, stats, opt_state, x, labels))
    return fns


def train_step_fns(batch: int, size: int, features: int, dtype: str):
    """One jitted SGD-momentum training step of the residual CNN per normalizer, with its arguments."""
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.dtype(dtype))
    return _sgd_steps(lambda name: ResidualCNN(norm_name=name, features=features), x)


def mlp_step_fns(batch: int, inputs: int, width: int, dtype: str):
    """One jitted SGD-momentum training step of :class:`DenseMLP` per normalizer, with its arguments."""
    x = jax.random.normal(jax.random.key(1), (batch, inputs), jnp.dtype(dtype))
    return _sgd_steps(lambda name: DenseMLP(norm_name=name, width=width), x)


def resnet_step_fns(batch: int, size: int):
    """The residual CNN of the training wing (``switchnorm.train``), ``--norm sn`` vs ``bn``.

    Its ``bn`` is SwitchNorm restricted to bn (Flax BatchNorm's exact math);
    the step mirrors ``switchnorm.train.loop.Trainer``'s: nnx.value_and_grad,
    running averages updated in place, one optax update. None if that
    subpackage is not there.
    """
    try:
        from switchnorm.train.models import resnet2d
    except ImportError:
        return None
    import optax
    from flax import nnx

    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    tx = optax.sgd(0.1, momentum=0.9)
    fns = {}
    for name in ("sn", "bn"):
        model = resnet2d((size, size, 3), 10, norm=name, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = tx.init(params)

        def step(params, rest, opt_state, x, labels, graphdef=graphdef):
            model = nnx.merge(graphdef, params, rest)

            def loss_fn(model):
                logits = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            _, params, rest = nnx.split(model, nnx.Param, ...)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, loss

        fns[f"resnet2d/{name}"] = (jax.jit(step), (params, rest, opt_state, x, labels))
    return fns


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not of the form 32x32x32x64") from None
    if len(shape) < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs rank >= 2")
    return shape


def target_checks(results: list[dict]) -> list[dict]:
    """Every performance target (TARGETS) on every float32 shape, with its ratio."""
    index = {(r["shape"], r["dtype"], r["variant"], r["mode"]): r for r in results}
    checks = []
    for desc, other, mode, what, (kind, bound) in TARGETS:
        for (shape, dtype, variant, m), r in index.items():
            if variant != "sn" or m != mode or dtype != "float32":
                continue
            o = index.get((shape, dtype, other, mode))
            if o is None:
                continue
            key = "median_s" if what == "time" else "temp_bytes"
            if r.get(key) is None or o.get(key) is None:
                continue
            if kind == "inv_le":  # sn / other <= bound
                ratio = r[key] / o[key] if o[key] else float("inf") if r[key] else 1.0
                ok = ratio <= bound
            else:  # other / sn >= bound
                ratio = o[key] / r[key] if r[key] else float("inf")
                ok = ratio >= bound
            checks.append({"target": desc, "shape": shape, "ratio": ratio, "met": ok})
    return checks


def train_checks(report: dict) -> list[dict]:
    """The training-step target, per model: sn / bn <= 1.15."""
    steps = (report.get("train_step") or {}).get("steps", {})
    checks = []
    for model in sorted({k.rsplit("/", 1)[0] for k in steps}):
        sn, bn = steps.get(f"{model}/sn"), steps.get(f"{model}/bn")
        if sn and bn:
            ratio = sn["median_s"] / bn["median_s"]
            checks.append(
                {
                    "target": "full training step: sn / bn <= 1.15",
                    "shape": model,
                    "ratio": ratio,
                    "met": ratio <= 1.15,
                }
            )
    return checks


def markdown(report: dict) -> str:
    lines = [
        f"# SwitchNorm layer benchmark on {report['device']}",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- jax {report['jax']} ({report['backend']}: {report['devices']}), flax {report['flax']}",
        f"- host: {report['host']}",
        f"- heap: {report.get('heap', 'not recorded')}",
        f"- repeats: {report['repeats']} interleaved samples, median; "
        f"each sample >= {report['min_sample_s'] * 1e3:.0f} ms of back-to-back calls",
        "",
        "## Time: median per call (ms) and ratio to SwitchNorm training (sn = 1.00)",
        "",
    ]
    results = report["results"]
    index = {(r["shape"], r["dtype"], r["variant"], r["mode"]): r for r in results}
    combos = sorted(
        {(r["shape"], r["dtype"], r["mode"]) for r in results}, key=lambda t: (t[2], t[1] != "float32", t[0])
    )
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    header = "| mode | dtype | shape | sn ms | " + " | ".join(f"{v}/sn" for v in variants) + " |"
    lines += [header, "|" + "---|" * (4 + len(variants))]
    for shape, dtype, mode in combos:
        sn = index.get((shape, dtype, "sn", mode))
        if sn is None:
            continue
        cells = []
        for v in variants:
            r = index.get((shape, dtype, v, mode))
            cells.append(f"{r['median_s'] / sn['median_s']:.2f}" if r else "-")
        lines.append(
            f"| {mode} | {dtype} | {shape} | {sn['median_s'] * 1e3:.3f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Compiled temporary memory (MiB) and ratio to SwitchNorm training",
        "",
        "Temporary buffers only (arguments and outputs excluded); `x MiB` is the input's size.",
        "",
        "| mode | dtype | shape | x MiB | sn MiB | " + " | ".join(f"{v}/sn" for v in variants) + " |",
        "|" + "---|" * (5 + len(variants)),
    ]
    for shape, dtype, mode in combos:
        sn = index.get((shape, dtype, "sn", mode))
        if sn is None or sn.get("temp_bytes") is None:
            continue
        cells = []
        for v in variants:
            r = index.get((shape, dtype, v, mode))
            if r is None or r.get("temp_bytes") is None:
                cells.append("-")
            elif sn["temp_bytes"] == 0:
                cells.append("inf" if r["temp_bytes"] else "1.00")
            else:
                cells.append(f"{r['temp_bytes'] / sn['temp_bytes']:.2f}")
        lines.append(
            f"| {mode} | {dtype} | {shape} | {sn['x_bytes'] / 2**20:.2f} | "
            f"{sn['temp_bytes'] / 2**20:.3f} | " + " | ".join(cells) + " |"
        )
    if report.get("train_step"):
        t = report["train_step"]
        lines += [
            "",
            f"## Full training step (SGD-momentum, batch {t['batch']}, {t['size']}x{t['size']}x3, {t['dtype']})",
            "",
            "`resnet2d/*`: the `switchnorm.train` ResNet (widths 32, 64) with "
            "`--norm sn` and `--norm bn` (SwitchNorm restricted to bn). `linen-cnn/*`: stem + 3 "
            f"residual blocks of {t['features']} channels, SwitchNorm vs `flax.linen.BatchNorm`.",
            "",
            "| model/norm | median ms | ratio to the same model's bn |",
            "|---|---|---|",
        ]
        for key, m in t["steps"].items():
            bn = t["steps"][key.rsplit("/", 1)[0] + "/bn"]
            lines.append(f"| {key} | {m['median_s'] * 1e3:.2f} | {m['median_s'] / bn['median_s']:.3f} |")
    lines += [
        "",
        "## Targets (float32; ratio per shape)",
        "",
        "| target | shape | ratio | met |",
        "|---|---|---|---|",
    ]
    for c in report["targets"]:
        lines.append(
            f"| {c['target']} | {c['shape']} | {c['ratio']:.2f} | {'yes' if c['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="*",
        type=parse_shape,
        default=list(SHAPES),
        help="shapes like 32x32x32x64 (default: the five in SHAPES; none: the training steps only)",
    )
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved samples per variant")
    parser.add_argument(
        "--min-sample-ms",
        type=float,
        default=20.0,
        help="each sample runs back-to-back calls for at least this long",
    )
    parser.add_argument("--device", default=None, help="label for the results (default: the jax device kind)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--train-step", dest="train_step", action="store_true", default=True)
    parser.add_argument("--no-train-step", dest="train_step", action="store_false")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=32)
    parser.add_argument("--train-features", type=int, default=32)
    parser.add_argument("--train-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument(
        "--quick", action="store_true", help="one small shape, float32, 5 repeats, small training step"
    )
    args = parser.parse_args(argv)
    heap = keep_freed_memory()
    if args.quick:
        args.shapes, args.dtypes, args.repeats = [(32, 32, 32, 64)], ["float32"], 5
        args.train_batch, args.train_size = 16, 16

    device = jax.devices()[0]
    label = args.device or device.device_kind.replace(" ", "-")
    import flax

    report: dict[str, Any] = {
        "device": label,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.layer "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(jax.devices())} x {device.device_kind}",
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "heap": heap,
        "repeats": args.repeats,
        "min_sample_s": args.min_sample_ms / 1e3,
        "results": [],
    }
    for shape in args.shapes:
        for dtype in args.dtypes:
            x = (3.0 + 2.0 * jax.random.normal(jax.random.key(1), shape)).astype(dtype)
            dy = jax.random.normal(jax.random.key(2), shape, jnp.float32)
            fns = {}
            for variant in args.variants:
                for mode in args.modes:
                    fn, fn_args = build(variant, mode, x, dy)
                    fns[(variant, mode)] = (compile_ahead(fn, fn_args), fn_args)
            memory = {k: temp_bytes(fn) for k, (fn, _) in fns.items()}
            medians = interleaved_medians(fns, args.repeats, args.min_sample_ms / 1e3)
            for (variant, mode), m in medians.items():
                report["results"].append(
                    {
                        "shape": shape_str(shape),
                        "dtype": dtype,
                        "variant": variant,
                        "mode": mode,
                        **m,
                        "temp_bytes": memory[(variant, mode)],
                        "x_bytes": int(x.size * x.dtype.itemsize),
                    }
                )
            print(
                f"{shape_str(shape):>14} {dtype:>8}: "
                + "  ".join(f"{v}/{mo}={m['median_s'] * 1e3:.3f}ms" for (v, mo), m in medians.items()),
                flush=True,
            )
            write(report, args.out, label)  # partial results survive a timeout
    if args.train_step:
        fns = {
            f"linen-cnn/{k}": v
            for k, v in train_step_fns(
                args.train_batch, args.train_size, args.train_features, "float32"
            ).items()
        }
        fns.update(resnet_step_fns(args.train_batch, args.train_size) or {})
        medians = interleaved_medians(fns, args.train_repeats or args.repeats, args.min_sample_ms / 1e3)
        report["train_step"] = {
            "batch": args.train_batch,
            "size": args.train_size,
            "features": args.train_features,
            "dtype": "float32",
            "steps": medians,
        }
        for key, m in medians.items():
            print(f"train step {key}: {m['median_s'] * 1e3:.2f} ms", flush=True)
    table = write(report, args.out, label)
    print(table)
    print(f"wrote {os.path.join(args.out, f'layer-{label}')}.json and .md")
    return report


def write(report: dict, out: str, label: str) -> str:
    """Writes the JSON and Markdown results so far; returns the Markdown."""
    report["targets"] = target_checks(report["results"]) + train_checks(report)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"layer-{label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    return table


if __name__ == "__main__":
    main()
