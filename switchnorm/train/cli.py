"""The ``switchnorm`` command: train, inspect and plot runs.

::

    switchnorm train --dataset mnist1d --norm sn --epochs 30 --batch-size 64 --out runs/sn64
    switchnorm train --out runs/sn64 --resume      # continue a run from its latest checkpoint
    switchnorm inspect runs/sn64                    # the learned weights, from the checkpoint
    switchnorm plot runs/sn64                       # write the figures again
    python -m switchnorm ...                        # the same command

Every bad input (unknown name, out-of-range number, a run directory that is
missing, already taken or damaged) ends with one line on stderr,
``switchnorm: error: ...``, exit status 2, and no file changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chosen so that each finishes quickly on a 2-core CPU (see docs/training.md).
    "mnist1d": {"epochs": 20, "batch_size": 64},
    "digits": {"epochs": 30, "batch_size": 32},
    "synthetic": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2},
}
TRAIN_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist1d",
    "model": None,  # the dataset's default model
    "norm": "sn",
    "optimizer": "adamw",
    "learning_rate": 3e-3,
    "momentum": 0.9,
    "weight_decay": 1e-2,
    "warmup_epochs": 1.0,
    "eval_every": 5,
    "seed": 0,
    "dtype": "float32",
}
DTYPES = ("float32", "bfloat16")
FIGURES = ("weights_over_training.png", "final_weights.png")
SCALING_FLAGS = ("devices", "coordinator_address", "num_processes", "process_id")


def _learned(weights: dict[str, Any]) -> dict[str, Any]:
    """The layers whose weights are learned: those that blend more than one normalizer."""
    return {path: layer for path, layer in (weights or {}).items() if len(layer["mean"]) > 1}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


def _checked(convert, accept, what: str):
    """An argparse type: ``convert(text)``, refused unless ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_nonnegative_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="switchnorm",
        description="Train models with Switchable Normalization and inspect the weights they learn.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    train = commands.add_parser("train", help="train a model and report its learned weights")
    S = argparse.SUPPRESS  # options left out are recognisable: a resumed run keeps its own
    train.add_argument("--dataset", default=S, help="digits, mnist1d (default) or synthetic")
    train.add_argument("--model", default=S, help="resnet2d, resnet1d or mlp (default: the dataset's)")
    train.add_argument("--norm", default=S, help="sn (default), bn, in, ln, gn or none")
    train.add_argument(
        "--epochs", type=_positive_int, default=S, help="default: 20 mnist1d, 30 digits, 10 synthetic"
    )
    train.add_argument(
        "--batch-size", type=_positive_int, default=S, help="default: 64 mnist1d, 32 otherwise"
    )
    train.add_argument("--optimizer", default=S, help="adamw (default) or sgd (Nesterov momentum)")
    train.add_argument(
        "--lr",
        dest="learning_rate",
        type=_positive_float,
        default=S,
        help="peak learning rate (default 3e-3)",
    )
    train.add_argument(
        "--momentum", type=_nonnegative_float, default=S, help="SGD momentum / AdamW b1 (default 0.9)"
    )
    train.add_argument(
        "--weight-decay", type=_nonnegative_float, default=S, help="default 1e-2; never on the mixing logits"
    )
    train.add_argument(
        "--warmup-epochs", type=_nonnegative_float, default=S, help="linear warmup, then cosine (default 1)"
    )
    train.add_argument(
        "--eval-every",
        type=_positive_int,
        default=S,
        help="epochs between evaluations and weight tables (default 5)",
    )
    train.add_argument("--seed", type=_int, default=S, help="initialization and data order (default 0)")
    train.add_argument(
        "--dtype", default=S, help="activation dtype: float32 (default) or bfloat16 (parameters stay float32)"
    )
    train.add_argument("--out", type=Path, default=None, help="run directory (default runs/<dataset>-<norm>)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="delete the run already in --out and start afresh"
    )
    train.add_argument("--quiet", action="store_true", help="no per-evaluation weight tables")
    # Scaling out (switchnorm.train.distributed, docs/scaling.md); not part of a run's config.
    train.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="local devices per process to shard each batch over (default: all)",
    )
    train.add_argument(
        "--coordinator-address",
        default=None,
        help="host:port of process 0, for a multi-process run (or JAX_COORDINATOR_ADDRESS)",
    )
    train.add_argument(
        "--num-processes",
        type=_positive_int,
        default=None,
        help="processes in a multi-process run (or JAX_NUM_PROCESSES)",
    )
    train.add_argument(
        "--process-id", type=_int, default=None, help="this process's rank, 0 .. N-1 (or JAX_PROCESS_ID)"
    )

    inspect = commands.add_parser("inspect", help="print a run's learned weights from its latest checkpoint")
    inspect.add_argument("run", type=Path)
    plot = commands.add_parser("plot", help="write a run's figures from its metrics.jsonl")
    plot.add_argument("run", type=Path)
    return parser


# -- configuration ----------------------------------------------------------------------------


def _check_config(config: dict[str, Any]) -> None:
    """Raises UsageError unless every setting names something that exists and fits."""
    from switchnorm.train import data, models, optim

    if config["dataset"] not in data.DATASETS:
        raise UsageError(f"unknown dataset {config['dataset']!r}; choose one of {', '.join(data.DATASETS)}")
    if config["model"] not in models.MODELS:
        raise UsageError(f"unknown model {config['model']!r}; choose one of {', '.join(models.MODELS)}")
    if config["norm"] not in models.NORMS:
        raise UsageError(f"unknown norm {config['norm']!r}; choose one of {', '.join(models.NORMS)}")
    if config["optimizer"] not in optim.OPTIMIZERS:
        raise UsageError(
            f"unknown optimizer {config['optimizer']!r}; choose one of {', '.join(optim.OPTIMIZERS)}"
        )
    if config["dtype"] not in DTYPES:
        raise UsageError(f"unknown dtype {config['dtype']!r}; choose one of {', '.join(DTYPES)}")
    for key in ("epochs", "batch_size", "eval_every"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise UsageError(f"{key} must be a positive integer, got {config[key]!r}")
    if not config["learning_rate"] > 0:
        raise UsageError(f"learning rate must be positive, got {config['learning_rate']!r}")


def _new_config(options: dict[str, Any]) -> dict[str, Any]:
    from switchnorm.train import models

    config = dict(TRAIN_DEFAULTS)
    config.update(options)
    dataset = config["dataset"]
    for key, value in DATASET_DEFAULTS.get(dataset, DATASET_DEFAULTS["mnist1d"]).items():
        config.setdefault(key, value)
        if key not in options:
            config[key] = value
    if config["model"] is None:
        config["model"] = models.DEFAULT_MODEL.get(dataset)
    return config


def _train_config(config: dict[str, Any]):
    from switchnorm.train.loop import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in config.items() if k in fields})


def _dtype(name: str):
    import jax.numpy as jnp

    return None if name == "float32" else jnp.dtype(name)


def _build_model(config: dict[str, Any], input_shape, num_classes):
    from switchnorm.train import models

    try:
        return models.build_model(
            config["model"],
            tuple(input_shape),
            num_classes,
            norm=config["norm"],
            dtype=_dtype(config["dtype"]),
            seed=config["seed"],
        )
    except ValueError as error:
        raise UsageError(str(error).rstrip(".")) from None


# -- train ----------------------------------------------------------------------------------------


def _reporter(out: Path, quiet: bool):
    """The callback of a command-line run: progress bar, tables, metrics, checkpoints."""
    from switchnorm.train.loop import Callback

    class Reporter(_ReporterMethods, Callback):
        pass

    reporter = Reporter()
    reporter.out, reporter.quiet, reporter.bar = out, quiet, None
    from switchnorm.train.distributed import is_primary

    reporter.primary = is_primary()
    reporter.quiet = quiet or not reporter.primary
    return reporter


class _ReporterMethods:
    out: Path
    quiet: bool
    primary: bool = True  # checkpoints are saved by every process (orbax syncs them)

    def on_train_begin(self, trainer, state, epoch):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.total_steps,
            initial=int(state.step),
            unit="step",
            dynamic_ncols=True,
            disable=None if self.primary else True,  # off when stderr is not a terminal
        )

    def on_step(self, trainer, step, loss, accuracy):
        self.bar.update(1)
        if step % 10 == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)

    def on_epoch_end(self, trainer, state, record):
        import switchnorm
        from switchnorm.train import rundir

        if self.primary:
            rundir.append_metrics(self.out, record)
        rundir.save_checkpoint(self.out, record["step"], state, record["epoch"])
        if "test_accuracy" in record:
            self.bar.set_description(f"test acc {record['test_accuracy']:.4f}")
            if not self.quiet and record["epoch"] != trainer.config.epochs:
                self._write(
                    f"\nepoch {record['epoch']}/{trainer.config.epochs}  step {record['step']}  "
                    f"train loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}  "
                    f"test loss {record['test_loss']:.4f}  test acc {record['test_accuracy']:.4f}"
                )
                if _learned(record["weights"]):
                    self._write(switchnorm.format_mixing_weights(_learned(record["weights"])))

    def on_train_end(self, trainer, state, record):
        self.bar.close()

    def _write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stdout)


def _print_result(out: Path, config: dict[str, Any], record: dict[str, Any], seconds: float | None) -> None:
    import switchnorm

    timing = f" in {seconds:.1f} s" if seconds is not None else ""
    print(
        f"\n{config['dataset']} {config['model']} norm={config['norm']}: "
        f"test accuracy {record['test_accuracy']:.4f} after {record['epoch']} epochs{timing}"
    )
    if _learned(record.get("weights")):
        print("learned mixing weights (* marks each row's dominant normalizer):")
        print(switchnorm.format_mixing_weights(_learned(record["weights"])))
    print(f"run directory: {out}")


def _finish(out: Path, config: dict[str, Any], seconds: float | None) -> None:
    """Figures, summary and the printed result of a run whose last epoch is done."""
    from switchnorm.train import rundir

    records = rundir.read_metrics(out)
    record = records[-1]
    _write_figures(out, config, records)
    summary = {
        "test_accuracy": record["test_accuracy"],
        "test_loss": record["test_loss"],
        "epochs": record["epoch"],
        "steps": record["step"],
    }
    if seconds is not None:
        summary["train_seconds"] = round(seconds, 2)
    previous = out / rundir.SUMMARY
    if seconds is None and previous.exists():
        import json

        summary = {**json.loads(previous.read_text()), **summary}
    rundir.write_summary(out, summary)
    _print_result(out, config, record, seconds)


def _write_figures(out: Path, config: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    from switchnorm.train import plots

    name = f"{config['dataset']}, {config['model']}, norm={config['norm']}"
    if not records or not _learned(records[-1].get("weights")):
        return []  # norm=none or a single normalizer: nothing was learned
    written = [
        plots.plot_weights_over_training(records, out / FIGURES[0], f"Mixing weights over training ({name})"),
        plots.plot_final_weights(
            records[-1]["weights"] if records else {}, out / FIGURES[1], f"Final mixing weights ({name})"
        ),
    ]
    return [p for p in written if p is not None]


def cmd_train(args: argparse.Namespace) -> int:
    from switchnorm.train import distributed, rundir

    distributed.request_cpu_devices(args.devices)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as error:
        raise UsageError(str(error).rstrip(".")) from None
    primary = distributed.is_primary()  # process 0 alone writes the run's files

    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "out", "resume", "overwrite", "quiet", *SCALING_FLAGS)
    }
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out, the run directory to continue")
        out = args.out
        try:
            config = rundir.read_config(out)
        except rundir.RunError as error:
            raise UsageError(f"cannot resume: {error}") from None
        for key, value in options.items():
            if config.get(key) != value:
                raise UsageError(
                    f"--{key.replace('_', '-')} {value} differs from the run's {config.get(key)}; "
                    "a resumed run keeps its own settings"
                )
        try:
            _check_config(config)
        except UsageError as error:
            raise UsageError(f"cannot resume {out}: its config.json is bad: {error}") from None
    else:
        config = _new_config(options)
        _check_config(config)
        out = args.out or Path("runs") / f"{config['dataset']}-{config['norm']}"
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not rundir.is_run(out):
                raise UsageError(f"--out {out} exists and is not a run directory; refusing to touch it")
            if not args.overwrite:
                raise UsageError(
                    f"--out {out} already holds a run; pass --resume to continue it "
                    "or --overwrite to replace it"
                )

    import numpy as np

    from switchnorm.train import data

    dataset = data.load_dataset(config["dataset"], config["seed"])
    if config["batch_size"] > len(dataset.x_train):
        raise UsageError(
            f"batch size {config['batch_size']} is larger than the {len(dataset.x_train)} "
            f"examples of {config['dataset']}'s training set"
        )
    model = _build_model(config, dataset.input_shape, dataset.num_classes)
    try:
        trainer = distributed.make_trainer(model, _train_config(config), dataset, devices=args.devices)
    except ValueError as error:
        raise UsageError(str(error).rstrip(".")) from None
    config["input_shape"] = list(dataset.input_shape)
    config["num_classes"] = dataset.num_classes
    config["steps_per_epoch"] = trainer.steps_per_epoch

    distributed.barrier("switchnorm-train-checked")  # every process passed the checks
    state, epoch = trainer.initial_state(), 0
    if args.resume:
        if rundir.latest_step(out) is not None:
            try:
                state, step, epoch = rundir.restore_checkpoint(out, state)
            except rundir.RunError as error:
                raise UsageError(f"cannot resume: {error}") from None
            if epoch > config["epochs"] or step != epoch * trainer.steps_per_epoch:
                raise UsageError(f"cannot resume: checkpoint step {step} does not fit the run's config")
        if epoch == config["epochs"]:
            print(f"{out}: the run is complete ({epoch} epochs).")
            if primary:
                _finish(out, config, None)
            return 0
        # From here on files change: every check has passed.
        if primary:
            rundir.truncate_metrics(out, int(np.asarray(state.step)))
        print(f"resuming {out} at epoch {epoch} (step {int(np.asarray(state.step))})")
    else:
        if primary and out.exists() and args.overwrite:
            shutil.rmtree(out)
        if primary:
            rundir.write_config(out, config)

    print(f"{dataset.describe()}; model {config['model']}, norm {config['norm']}; run directory {out}")
    start = time.perf_counter()
    state, record = trainer.fit(state, epoch, callbacks=[_reporter(out, args.quiet)])
    if primary:
        _finish(out, config, time.perf_counter() - start)
    return 0


# -- inspect, plot ------------------------------------------------------------------------------------


def _restore_model(out: Path):
    """(config, model holding the latest checkpoint, step, epoch)."""
    from switchnorm.train import loop, rundir

    try:
        config = rundir.read_config(out)
    except rundir.RunError as error:
        raise UsageError(str(error)) from None
    try:
        _check_config(config)
        input_shape, num_classes = config["input_shape"], config["num_classes"]
        steps_per_epoch = config["steps_per_epoch"]
    except (UsageError, KeyError) as error:
        raise UsageError(f"{out / rundir.CONFIG} is incomplete or bad: {error}") from None
    model = _build_model(config, input_shape, num_classes)
    tx = loop.make_tx(_train_config(config), steps_per_epoch)
    template = loop.initial_state(model, tx)
    try:
        state, step, epoch = rundir.restore_checkpoint(out, template)
    except rundir.RunError as error:
        raise UsageError(str(error)) from None
    from flax import nnx

    model.eval()
    nnx.update(model, state.params, state.rest)
    return config, model, step, epoch


def cmd_inspect(args: argparse.Namespace) -> int:
    import switchnorm
    from switchnorm.train import loop, rundir

    config, model, step, epoch = _restore_model(args.run)
    evals = [r for r in rundir.read_metrics(args.run) if "test_accuracy" in r and r["step"] <= step]
    print(
        f"{args.run}: {config['dataset']} {config['model']} norm={config['norm']}, "
        f"checkpoint at epoch {epoch}/{config['epochs']} (step {step})"
    )
    if evals:
        print(f"test accuracy {evals[-1]['test_accuracy']:.4f} (epoch {evals[-1]['epoch']})")
    weights = _learned(loop.model_weights(model))
    if weights:
        print(switchnorm.format_mixing_weights(weights))
    else:
        print(f"norm={config['norm']}: the model has no learned mixing weights.")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from switchnorm.train import rundir

    try:
        config = rundir.read_config(args.run)
    except rundir.RunError as error:
        raise UsageError(str(error)) from None
    records = rundir.read_metrics(args.run)
    if not records:
        raise UsageError(f"{args.run} has no metrics to plot yet")
    written = _write_figures(args.run, config, records)
    if not written:
        print(f"{args.run}: norm={config.get('norm')} learns no mixing weights; no figures.")
    for path in written:
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``switchnorm`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        command = {"train": cmd_train, "inspect": cmd_inspect, "plot": cmd_plot}[args.command]
        return command(args)
    except UsageError as error:
        message = " ".join(str(error).split())
        print(f"switchnorm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `switchnorm inspect run | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("switchnorm: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
