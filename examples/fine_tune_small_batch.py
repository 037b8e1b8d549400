"""Fine-tuning at batch 2 and 4: a BatchNorm network converted to SwitchNorm, against BatchNorm and GroupNorm.

    python examples/fine_tune_small_batch.py --seeds 0 1 2 --out runs/fine_tune   # 5 min on 2 cores
    python examples/fine_tune_small_batch.py --quick --seeds 0 --out /tmp/fine_tune  # ~1 min of CPU
    python examples/fine_tune_small_batch.py --source-weights 0.5 --fixed-blend      # a control, below

A plain-Flax NNX 1-D CNN is pretrained on MNIST-1D at batch 128 twice, once with an
``nnx.BatchNorm`` after each convolution and once with an ``nnx.GroupNorm`` (8 groups),
then fine-tuned at batch 2 and at batch 4 on a shifted version of the task, three ways:

* ``bn``: the BatchNorm network as it is: batch statistics of 2 or 4 samples while
  fine-tuning, the running averages at evaluation;
* ``sn(W)``: ``switchnorm.convert(bn_model, source_weight=W)``: every BatchNorm becomes a
  SwitchNorm with the BatchNorm's scale, bias and running averages, giving bn the weight W
  in mean and variance and in, ln and gn (8 groups) ``(1 - W) / 3`` each, fine-tuned the
  same way; the mixing logits are trained with everything else;
* ``gn``: the GroupNorm network, fine-tuned the same way.

**The shift.** Every fine-tuning and test sequence is multiplied by its own gain, drawn
log-uniformly from [1/4, 4], and moved by its own offset, drawn uniformly from [-2, 2]
(the inputs are standardized, so both are large). The class is unchanged; what changes
is each sample's scale and level. A sample's own statistics take these out: the first
convolution (no bias) turns the gain into a gain of every channel, which in, ln and gn
all divide out, and the offset into a constant per channel (the offset times the sum of
that channel's kernel), which in removes and ln and gn, averaging over channels, do
not. BatchNorm's running averages, estimated over a mix of gains, fit no sample; and
at batch 2 the two samples of a batch can differ in scale sixteen-fold, so the batch
statistics describe neither. The gains, the offsets and the order of the fine-tuning
batches are drawn from the seed alone: every method sees the same batches and is
scored on the same shifted test set (the 1000 MNIST-1D test sequences).

**One setting for all.** Adam without weight decay, for pretraining (lr 3e-3, cosine
decay, 15 epochs of 31 steps at batch 128) and for fine-tuning (constant lr 1e-3, 1000
steps, the same for every method and both batch sizes). Adam because its
per-parameter step size lets one learning rate serve convolution kernels, affine
parameters and SwitchNorm's mixing logits, whose gradients differ in scale by orders of
magnitude; SGD would want a learning rate per group of parameters, which is tuning per
method. Every parameter is fine-tuned, the mixing logits with the rest.

**The choice of W.** At ``W = 1.0`` the converted model computes what the BatchNorm
model computes, but its logits start ``log(3 / 2**-24)`` (about 17.7) apart and Adam
moves a logit by about the learning rate per step, at most about 1 in 1000 steps of
1e-3: the layers cannot leave bn, and ``sn(1.0)`` fine-tunes as ``bn`` does (up to
rounding, which 1000 steps at batch 2 amplify). ``W = 0.5`` starts half way, where
the softmax's gradient is large, so each layer can move towards what the shifted task
wants from the first step, at the price of a changed forward pass before fine-tuning.
0.5 is the one the comparison reads, chosen on seed 0 before the three-seed run (the
exploration is in docs/training.md); 0.9 and 1.0 are run beside it,
as fine-tuning one more W costs seconds. ``--fixed-blend`` adds ``sn(W) fixed``, the
first W's model fine-tuned with its mixing logits frozen: what the starting blend
gives without learning it.

Prints a markdown table of the test accuracy (per seed and mean) by method and batch
size, and the converted models' learned mixing weights, and writes that report to
``OUT/fine_tune.md`` (``make results`` puts it in docs/results.md) and everything to
``OUT/fine_tune.json``: accuracies, the weights of every converted layer per seed and
batch size, the settings, the versions and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import optax
from flax import nnx

import switchnorm
from switchnorm.train.data import mnist1d


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every number of the experiment, in one place; ``--quick`` shrinks the run lengths only."""

    widths: tuple[int, ...] = (32, 64, 64)  # channels of the three conv blocks
    kernel: int = 5
    num_groups: int = 8  # GroupNorm's groups, and the gn term's of the converted layers
    pretrain_batch: int = 128
    pretrain_epochs: int = 15
    pretrain_lr: float = 3e-3
    fine_tune_batches: tuple[int, ...] = (2, 4)
    fine_tune_steps: int = 1000
    fine_tune_lr: float = 1e-3
    source_weights: tuple[float, ...] = (0.5, 0.9, 1.0)  # the first is the one compared
    fixed_blend: bool = False  # also sn(W) with its mixing logits frozen at the start
    gain_range: tuple[float, float] = (0.25, 4.0)  # log-uniform
    offset_range: tuple[float, float] = (-2.0, 2.0)  # uniform


QUICK = {"pretrain_epochs": 1, "fine_tune_steps": 20}


class CNN(nnx.Module):
    """[conv -> norm -> relu] per width (stride 2 after the first), mean over positions, dense.

    ``norm`` is ``"bn"`` (``nnx.BatchNorm``) or ``"gn"`` (``nnx.GroupNorm``); the convolutions
    have no bias, as the norm's bias takes its place.
    """

    def __init__(self, norm: str, settings: Settings, num_classes: int, *, rngs: nnx.Rngs):
        sizes = (1, *settings.widths)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (settings.kernel,), strides=(1 if i == 0 else 2,), use_bias=False, rngs=rngs)
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
            ]
        )
        self.norms = nnx.List(
            [
                nnx.BatchNorm(b, rngs=rngs)
                if norm == "bn"
                else nnx.GroupNorm(b, num_groups=settings.num_groups, rngs=rngs)
                for b in settings.widths
            ]
        )
        self.head = nnx.Linear(settings.widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = jax.nn.relu(norm(conv(x)))
        return self.head(x.mean(axis=1))


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x).argmax(-1)


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy in inference mode (BatchNorm and SwitchNorm's bn term: running averages)."""
    model.eval()
    return float(np.mean(np.asarray(predict(model, x)) == y))


def shifted(x: np.ndarray, seed: int, split: int, settings: Settings) -> np.ndarray:
    """``x`` with a gain and an offset per sequence, drawn from (seed, split) alone."""
    rng = np.random.default_rng([seed, split])
    low, high = np.log(settings.gain_range)
    gain = np.exp(rng.uniform(low, high, (len(x), 1, 1)))
    offset = rng.uniform(*settings.offset_range, (len(x), 1, 1))
    return (gain * x + offset).astype(np.float32)


def batch_order(num_examples: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch) indices: successive permutations of the examples, drawn from the seed."""
    rng = np.random.default_rng([seed, batch, 1])
    epochs = -(-steps * batch // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[: steps * batch].reshape(steps, batch)


MIXING_LOGITS = nnx.Any(nnx.PathContains("mean_logits"), nnx.PathContains("var_logits"))
ALL_BUT_MIXING = nnx.All(nnx.Param, nnx.Not(MIXING_LOGITS))


def train(
    model: nnx.Module, tx: optax.GradientTransformation, x, y, order: np.ndarray, wrt: Any = nnx.Param
) -> float:
    """Trains the ``wrt`` parameters of ``model`` in place on the batches ``x[order[i]]``; the last loss."""
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    loss = np.nan
    for index in order:
        loss = train_step(model, optimizer, x[index], y[index])
    return float(loss)


def pretrain_steps(num_train: int, settings: Settings) -> int:
    return settings.pretrain_epochs * (num_train // settings.pretrain_batch)


@functools.cache
def optimizers(num_train: int, settings: Settings) -> dict[str, optax.GradientTransformation]:
    """Adam with cosine decay for pretraining, constant for fine-tuning: no weight decay.

    Built once per setting (cached) and reused: ``nnx.Optimizer`` keeps its transformation in
    the graph ``nnx.jit`` compiles for, so a new, equal one would compile every run again.
    """
    schedule = optax.cosine_decay_schedule(settings.pretrain_lr, pretrain_steps(num_train, settings))
    return {"pretrain": optax.adam(schedule), "fine_tune": optax.adam(settings.fine_tune_lr)}


def pretrain(norm: str, data, seed: int, settings: Settings, tx: optax.GradientTransformation) -> nnx.Module:
    """The ``norm`` CNN trained on clean MNIST-1D at batch 128."""
    model = CNN(norm, settings, data.num_classes, rngs=nnx.Rngs(seed))
    order = batch_order(
        len(data.x_train), settings.pretrain_batch, pretrain_steps(len(data.x_train), settings), seed
    )
    train(model, tx, data.x_train, data.y_train, order)
    return model


def method_names(settings: Settings) -> list[str]:
    """bn, sn(W) for each W, with ``fixed_blend`` sn(W) fixed for the first W, gn."""
    fixed = [f"sn({settings.source_weights[0]}) fixed"] if settings.fixed_blend else []
    return ["bn", *(f"sn({w})" for w in settings.source_weights), *fixed, "gn"]


def run_seed(seed: int, data, settings: Settings) -> dict[str, Any]:
    """Pretrains both networks, fine-tunes every method at every batch size; the results of one seed."""
    tx = optimizers(len(data.x_train), settings)
    models = {norm: pretrain(norm, data, seed, settings, tx["pretrain"]) for norm in ("bn", "gn")}
    x_train = shifted(data.x_train, seed, 0, settings)
    x_test = shifted(data.x_test, seed, 1, settings)
    result: dict[str, Any] = {
        "pretrained_clean": {norm: accuracy(m, data.x_test, data.y_test) for norm, m in models.items()},
        "before_fine_tune": {},
        "accuracy": {},
        "mixing_weights": {},
    }

    def starting_model(method: str) -> nnx.Module:
        if method.startswith("sn("):
            weight = float(method[3 : method.index(")")])
            return switchnorm.convert(models["bn"], source_weight=weight, num_groups=settings.num_groups)
        return nnx.clone(models[method])

    for method in method_names(settings):
        result["before_fine_tune"][method] = accuracy(starting_model(method), x_test, data.y_test)
    for batch in settings.fine_tune_batches:
        order = batch_order(len(x_train), batch, settings.fine_tune_steps, seed)
        for method in method_names(settings):
            model = starting_model(method)
            wrt = ALL_BUT_MIXING if method.endswith("fixed") else nnx.Param
            train(model, tx["fine_tune"], x_train, data.y_train, order, wrt)
            result["accuracy"].setdefault(method, {})[str(batch)] = accuracy(model, x_test, data.y_test)
            if method.startswith("sn("):
                result["mixing_weights"].setdefault(method, {})[str(batch)] = switchnorm.mixing_weights(model)
    return result


def markdown_table(results: dict[int, dict[str, Any]], settings: Settings) -> str:
    """Test accuracy (%) on the shifted test set: one row per method and batch size."""
    seeds = list(results)
    header = "| method | batch | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    lines = [header, "|" + "---|" * (len(seeds) + 3)]
    for batch in settings.fine_tune_batches:
        for method in method_names(settings):
            values = [results[s]["accuracy"][method][str(batch)] for s in seeds]
            cells = " | ".join(f"{100 * v:.1f}" for v in values)
            lines.append(f"| {method} | {batch} | {cells} | {100 * np.mean(values):.1f} |")
    return "\n".join(lines)


def comparison(results: dict[int, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Per batch size: the compared sn(W)'s mean accuracy against the better of bn and gn."""
    method = f"sn({settings.source_weights[0]})"
    verdict = {}
    for batch in settings.fine_tune_batches:
        mean = {
            m: float(np.mean([r["accuracy"][m][str(batch)] for r in results.values()]))
            for m in ("bn", method, "gn")
        }
        best = max(("bn", "gn"), key=mean.__getitem__)
        verdict[str(batch)] = {
            "method": method,
            "mean": mean,
            "better_baseline": best,
            "matches": mean[method] >= mean[best],
        }
    return verdict


def weights_summary(results: dict[int, dict[str, Any]], method: str, batch: int) -> dict[str, Any]:
    """Each layer's weights averaged over the seeds, and the normalizer bn's weight went to most."""
    per_seed = [results[s]["mixing_weights"][method][str(batch)] for s in results]
    summary = {}
    for path in per_seed[0]:
        layer = {}
        for kind in ("mean", "var"):
            names = list(per_seed[0][path][kind])
            mean = {n: float(np.mean([w[path][kind][n] for w in per_seed])) for n in names}
            gainer = max((n for n in names if n != "bn"), key=mean.__getitem__)
            layer[kind] = {"weights": mean, "most_gained": gainer}
        summary[path] = layer
    return summary


def format_summary(summary: dict[str, Any], start: float) -> str:
    lines = []
    for path, layer in summary.items():
        parts = []
        for kind in ("mean", "var"):
            weights, gainer = layer[kind]["weights"], layer[kind]["most_gained"]
            parts.append(f"{kind}: bn {start:.2f} -> {weights['bn']:.2f}, {gainer} {weights[gainer]:.2f}")
        lines.append(f"  {path}: " + "; ".join(parts))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "switchnorm": switchnorm.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/fine_tune"))
    parser.add_argument("--quick", action="store_true", help="1 pretraining epoch, 20 fine-tuning steps")
    parser.add_argument(
        "--source-weights",
        type=float,
        nargs="+",
        default=list(Settings.source_weights),
        help="W of each converted model (default 0.5 0.9 1.0); the first is the one compared",
    )
    parser.add_argument(
        "--fixed-blend",
        action="store_true",
        help="also fine-tune sn(W) (the first W) with its mixing logits frozen: how much of its "
        "result the blend it starts from gives, without learning it",
    )
    parser.add_argument("--fine-tune-steps", type=int, help=f"default {Settings.fine_tune_steps}")
    parser.add_argument("--fine-tune-lr", type=float, help=f"default {Settings.fine_tune_lr}")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {
        "source_weights": tuple(args.source_weights),
        "fixed_blend": args.fixed_blend,
        **(QUICK if args.quick else {}),
    }
    if args.fine_tune_steps is not None:
        changes["fine_tune_steps"] = args.fine_tune_steps
    if args.fine_tune_lr is not None:
        changes["fine_tune_lr"] = args.fine_tune_lr
    settings = Settings(**changes)

    started = time.perf_counter()
    data = mnist1d()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, data, settings)
        print(f"seed {seed} done at {time.perf_counter() - started:.0f} s", flush=True)
    seconds = time.perf_counter() - started

    report = [
        f"Test accuracy (%) on the shifted MNIST-1D test set, {seconds:.0f} s in all",
        "",
        markdown_table(results, settings),
    ]
    before = {
        m: np.mean([r["before_fine_tune"][m] for r in results.values()]) for m in method_names(settings)
    }
    report += [
        "",
        "Before fine-tuning (mean over seeds): " + ", ".join(f"{m} {100 * a:.1f}" for m, a in before.items()),
        "",
    ]
    verdict = comparison(results, settings)
    for batch, v in verdict.items():
        word = "matches or beats" if v["matches"] else "falls short of"
        report.append(
            f"- batch {batch}: {v['method']} {100 * v['mean'][v['method']]:.1f} {word} "
            f"{v['better_baseline']} {100 * v['mean'][v['better_baseline']]:.1f}"
        )
    summaries: dict[str, dict[str, Any]] = {}
    for w in settings.source_weights:
        method = f"sn({w})"
        for batch in settings.fine_tune_batches:
            summary = weights_summary(results, method, batch)
            summaries.setdefault(method, {})[str(batch)] = summary
            report += ["", f"{method}, batch {batch}: weights after fine-tuning, mean over seeds", ""]
            report += ["```", format_summary(summary, w), "```"]
    text = "\n".join(report) + "\n"
    print("\n" + text)

    record = {
        "command": [sys.executable, *sys.argv] if argv is None else ["fine_tune_small_batch.py", *argv],
        "settings": dataclasses.asdict(settings),
        "quick": args.quick,
        "methods": method_names(settings),
        "seeds": args.seeds,
        "seconds": round(seconds, 1),
        "versions": versions(),
        "results": {str(s): r for s, r in results.items()},
        "comparison": verdict,
        "weights_summary": summaries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fine_tune.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "fine_tune.md").write_text(text)
    print(f"wrote {args.out / 'fine_tune.json'} and fine_tune.md")
    return record


if __name__ == "__main__":
    main()
