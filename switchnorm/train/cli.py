"""The ``switchnorm`` command: train, inspect and plot runs.

::

    switchnorm train --dataset mnist1d --norm sn --epochs 30 --batch-size 64 --out runs/sn64
    switchnorm train --out runs/sn64 --resume      # continue a run from its latest checkpoint
    switchnorm inspect runs/sn64                    # the learned weights, from the checkpoint
    switchnorm plot runs/sn64                       # write the figures again
    switchnorm collapse runs/ssn --out runs/ssn-collapsed   # layers that chose compute only their choice
    python -m switchnorm ...                        # the same command

Exit status: 0 done; 2 bad input (an unknown name, an out-of-range number, a
run directory that is missing, taken, in use or damaged, a full disk), reported
as one line ``switchnorm: error: ...`` with no file changed; 3 the training
diverged (a NaN or infinity in the loss or the state; the last good
checkpoint is kept); 130 interrupted.

Every value, from the command line or from ``config.json``, is checked by
:class:`~switchnorm.train.config.RunConfig` before anything is allocated or
written; :class:`~switchnorm.train.rundir.RunDir` owns the run directory (its
lock, its marker, and no write through a symlink).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_DIVERGED = 3
RUN_FLAGS = ("out", "resume", "overwrite", "quiet")
SCALING_FLAGS = ("devices", "coordinator_address", "num_processes", "process_id")
MAX_DEVICES = 4096


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


def _number(convert, what: str, accept=lambda v: True):
    """An argparse type: ``convert(text)``, refused unless it parses and ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_int = _number(int, "an integer")
_float = _number(float, "a number")
_devices = _number(int, f"an integer from 1 to {MAX_DEVICES}", lambda v: 1 <= v <= MAX_DEVICES)
_min_weight = _number(float, "a number in (0.5, 1]", lambda v: 0.5 < v <= 1)


def _add_run_flags(train: argparse.ArgumentParser) -> None:
    """The flags that become a RunConfig; left out, they are absent (a resumed run keeps its own)."""
    S = argparse.SUPPRESS
    add = train.add_argument
    add("--dataset", default=S, help="digits, mnist1d (default) or synthetic")
    add("--model", default=S, help="resnet2d, resnet1d or mlp (default: the dataset's)")
    add("--norm", default=S, help="sn (default), ssn (Sparse SN: ends one-hot), bn, in, ln, gn or none")
    add(
        "--weights",
        default=S,
        help="how finely sn and ssn layers blend: layer (default: one blend per layer), channel or sample",
    )
    add("--epochs", type=_int, default=S, help="default: 20 mnist1d, 30 digits, 10 synthetic")
    add("--batch-size", type=_int, default=S, help="default: 64 mnist1d, 32 otherwise")
    add("--optimizer", default=S, help="adamw (default) or sgd (Nesterov momentum)")
    add("--lr", dest="learning_rate", type=_float, default=S, help="peak learning rate (default 3e-3)")
    add("--momentum", type=_float, default=S, help="SGD momentum / AdamW b1, in [0, 1) (default 0.9)")
    add("--weight-decay", type=_float, default=S, help="in [0, 1] (default 1e-2); never on the mixing logits")
    add("--warmup-epochs", type=_float, default=S, help="linear warmup, then cosine (default 1)")
    add("--eval-every", type=_int, default=S, help="epochs between evaluations and weight tables (default 5)")
    add("--seed", type=_int, default=S, help="initialization and data order, 0 .. 2**32-1 (default 0)")
    add(
        "--dtype", default=S, help="activation dtype: float32 (default) or bfloat16 (parameters stay float32)"
    )
    add(
        "--mixing-lr-scale",
        type=_float,
        default=S,
        help="the mixing logits' learning rate over the others' (default 1; Sparse SN uses 0.1)",
    )
    add(
        "--mixing-clip",
        type=_float,
        default=S,
        help="clip the mixing logits' gradient to this global norm (default: no clipping)",
    )
    add(
        "--recalibrate",
        type=_int,
        default=S,
        help="recompute the bn running averages over this many training batches before the last evaluation",
    )


def _add_other_train_flags(train: argparse.ArgumentParser) -> None:
    add = train.add_argument
    add("--out", type=Path, default=None, help="run directory (default runs/<dataset>-<norm>)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--overwrite", action="store_true", help="delete the switchnorm run in --out and start afresh")
    add("--quiet", action="store_true", help="no per-evaluation weight tables")
    # Scaling out (switchnorm.train.distributed, docs/scaling.md); not part of a run's config.
    add("--devices", type=_devices, default=None, help="local devices per process to shard each batch over")
    add("--coordinator-address", default=None, help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    add(
        "--num-processes",
        type=_int,
        default=None,
        help="processes in a multi-process run (or JAX_NUM_PROCESSES)",
    )
    add("--process-id", type=_int, default=None, help="this process's rank, 0 .. N-1 (or JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="switchnorm",
        description="Train models with Switchable Normalization and inspect the weights they learn.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    train = commands.add_parser("train", help="train a model and report its learned weights")
    _add_run_flags(train)
    _add_other_train_flags(train)
    inspect = commands.add_parser("inspect", help="print a run's learned weights from its latest checkpoint")
    inspect.add_argument("run", type=Path)
    plot = commands.add_parser("plot", help="write a run's figures from its metrics.jsonl")
    plot.add_argument("run", type=Path)
    collapse = commands.add_parser(
        "collapse", help="write a copy of a finished run whose layers compute only the normalizers they chose"
    )
    collapse.add_argument("run", type=Path)
    collapse.add_argument("--out", type=Path, required=True, help="the new run directory")
    collapse.add_argument(
        "--min-weight",
        type=_min_weight,
        default=None,
        help="collapse a layer when its mean and variance each give one normalizer this weight, "
        "in (0.5, 1] (default 0.99)",
    )
    collapse.add_argument("--overwrite", action="store_true", help="replace the switchnorm run in --out")
    return parser


# -- train: the checks, all before anything is written -------------------------------------------


def _flag(field: str) -> str:
    return "--lr" if field == "learning_rate" else "--" + field.replace("_", "-")


def _options(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(the run settings given on the command line, the RunConfig they make); UsageError if bad.

    A fresh run's config is resolved (the dataset's defaults filled in) and so fully checked.
    """
    from switchnorm.train.config import ConfigError, RunConfig

    skip = ("command", *RUN_FLAGS, *SCALING_FLAGS)
    options = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        config = RunConfig(**options)
        return options, config if args.resume else config.resolved()
    except ConfigError as error:
        raise UsageError(error.naming(_flag(error.field))) from None


def _writable_parent(out: Path) -> None:
    """UsageError unless ``out`` could be created: its nearest existing ancestor is a writable directory."""
    ancestor = out.absolute()
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if ancestor != out.absolute() and not ancestor.is_dir():
        raise UsageError(f"cannot create --out {out}: {ancestor} is a file, not a directory")
    if ancestor != out.absolute() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create --out {out}: no permission to write in {ancestor}")


def _check_fresh_out(run, overwrite: bool) -> None:
    """UsageError unless a fresh run may start in ``run.path`` (reads only)."""
    from switchnorm.train.rundir import LOCK

    out = run.path
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symbolic link; pass the directory it points to")
    if not out.exists():
        return _writable_parent(out)
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if all(p.name == LOCK for p in out.iterdir()):  # empty, or left by a kill before the marker
        return _check_no_writer(run)
    if not run.holds_run() and not run.made_by_switchnorm():
        raise UsageError(f"--out {out} exists and is not a run directory; refusing to touch it")
    if not overwrite:
        raise UsageError(
            f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if not run.made_by_switchnorm():
        raise UsageError(
            f"--overwrite refuses to delete {out}: it has no .switchnorm-run marker, so this version of "
            "switchnorm did not create it; delete it yourself or choose another --out"
        )
    _check_no_writer(run)


def _check_no_writer(run) -> None:
    pid = run.writer()
    if pid is not None:
        who = f"process {pid}" if pid else "another process"
        raise UsageError(
            f"{run.path} is in use by {who} (another switchnorm command writing to it); wait for it"
        )


def _resumed_config(run, options: dict[str, Any]):
    """The run's own config, checked; UsageError if the flags given disagree with it."""
    if run.path.is_symlink():
        raise UsageError(f"--out {run.path} is a symbolic link; pass the directory it points to")
    config = run.read_config()
    if config.collapsed:
        raise UsageError(
            f"{run.path} was made by switchnorm collapse for inference; it cannot be trained further: "
            "resume the run it was collapsed from"
        )
    for key, value in options.items():
        if getattr(config, key) != value:
            raise UsageError(
                f"{_flag(key)} {value} differs from the run's {getattr(config, key)}; "
                "a resumed run keeps its own settings"
            )
    links = run.links()
    if links:
        raise UsageError(
            f"{run.path / links[0]} is a symbolic link; switchnorm never follows links: remove it"
        )
    _check_no_writer(run)
    run.read_metrics()  # a damaged line is refused here, before anything is written
    return config


@dataclasses.dataclass
class _Setup:
    """What a run trains with: its complete config, the dataset, the trainer."""

    config: Any
    dataset: Any
    trainer: Any


def _build(config, devices: int | None) -> _Setup:
    """Loads the data and builds model and trainer; UsageError if they do not fit the config."""
    from switchnorm.train import data, distributed

    dataset = data.load_dataset(config.dataset, config.seed)
    if config.batch_size > len(dataset.x_train):
        raise UsageError(
            f"batch size {config.batch_size} is larger than the {len(dataset.x_train)} "
            f"examples of {config.dataset}'s training set"
        )
    steps = data.steps_per_epoch(len(dataset.x_train), config.batch_size)
    found = (tuple(dataset.input_shape), dataset.num_classes, steps)
    expected = (config.input_shape, config.num_classes, config.steps_per_epoch)
    if config.complete and expected != found:
        raise UsageError(
            f"config.json's input_shape, num_classes, steps_per_epoch {expected} do not match "
            f"the {config.dataset} data's {found}"
        )
    try:
        config = config.with_data(*found)
        model = _model(config)
        trainer = distributed.make_trainer(model, config.train_config(), dataset, devices=devices)
    except ValueError as error:
        raise UsageError(" ".join(str(error).rstrip(".").split())) from None
    return _Setup(config, dataset, trainer)


def _model(config):
    """The run's model, freshly initialized; in a collapsed run, with its layers collapsed."""
    import jax.numpy as jnp

    from switchnorm.train import models

    dtype = None if config.dtype == "float32" else jnp.dtype(config.dtype)
    model = models.build_model(
        config.model,
        config.input_shape,
        config.num_classes,
        norm=config.norm,
        dtype=dtype,
        weights=config.weights,
        seed=config.seed,
    )
    if not config.collapsed:
        return model
    try:
        return models.collapsed_model(model, config.collapsed)
    except ValueError as error:
        raise UsageError(f"config.json's collapsed does not fit model {config.model}: {error}") from None


def _resume_point(run, setup: _Setup) -> tuple[Any, int]:
    """(state, epoch) to continue from: the latest checkpoint, or the start. Reads only."""
    trainer, config = setup.trainer, setup.config
    state, epoch = trainer.initial_state(), 0
    if run.latest_step() is not None:
        state, step, epoch = run.restore_checkpoint(state)
        if epoch > config.epochs or step != epoch * config.steps_per_epoch:
            raise UsageError(f"cannot resume: checkpoint step {step} does not fit the run's config")
    records, _ = run.read_metrics()
    if sum(r["step"] <= epoch * config.steps_per_epoch for r in records) < epoch:
        raise UsageError(
            f"cannot resume {run.path}: metrics.jsonl has fewer records than the checkpoint's {epoch} "
            "epochs; it was cut or edited"
        )
    return state, epoch


# -- train: the steps that write ----------------------------------------------------------------


def _continue(run, setup: _Setup, epoch: int) -> None:
    """Takes the lock and makes the run directory agree with the checkpoint it resumes from."""
    from switchnorm.train import distributed

    run.lock()
    if run.read_config() != setup.config or (run.latest_step() or 0) != epoch * setup.config.steps_per_epoch:
        raise UsageError(f"{run.path} changed while it was being checked; try again")
    run.tidy_checkpoints()
    dropped = run.truncate_metrics(epoch * setup.config.steps_per_epoch)
    if dropped:
        print(f"dropped {dropped} metrics.jsonl line(s) written after the checkpoint of epoch {epoch}")
    distributed.barrier("switchnorm-resume-ready")  # every process sees the cleaned directory


def _train(run, setup: _Setup, state: Any, epoch: int, quiet: bool) -> int:
    from switchnorm.train import report

    print(
        f"{setup.dataset.describe()}; model {setup.config.model}, norm {setup.config.norm}; run directory {run.path}"
    )
    reporter = report.Reporter(run, quiet, primary=run.primary)
    start = time.perf_counter()
    try:
        setup.trainer.fit(state, epoch, callbacks=[reporter])
    except report.Diverged as error:
        print(f"switchnorm: error: {report.record_divergence(run, error)}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        reporter.close()
    report.finish(run, setup.config, time.perf_counter() - start, None)
    return 0


def _join_cluster(args: argparse.Namespace) -> bool:
    """Starts JAX on the devices and processes asked for; True in the process that writes files."""
    from switchnorm.train import distributed

    distributed.request_cpu_devices(args.devices)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as error:
        raise UsageError(str(error).rstrip(".")) from None
    return distributed.is_primary()


def cmd_train(args: argparse.Namespace) -> int:
    from switchnorm.train import distributed, report
    from switchnorm.train.rundir import RunDir

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the run directory to continue")
    options, given = _options(args)
    primary = _join_cluster(args)
    run = RunDir(args.out or Path("runs") / f"{given.dataset}-{given.norm}", primary=primary)
    if args.resume:
        setup = _build(_resumed_config(run, options), args.devices)
        state, epoch = _resume_point(run, setup)
    else:
        _check_fresh_out(run, args.overwrite)
        setup, epoch = _build(given, args.devices), 0
        state = setup.trainer.initial_state()
    distributed.barrier("switchnorm-train-checked")  # every process passed the checks
    with run:
        if args.resume:
            previous = run.read_summary()
            _continue(run, setup, epoch)
            if epoch == setup.config.epochs:
                print(f"{run.path}: the run is complete ({epoch} epochs).")
                report.finish(run, setup.config, None, previous)
                return 0
            run.remove_summary()
            print(f"resuming {run.path} at epoch {epoch} (step {epoch * setup.config.steps_per_epoch})")
        else:
            _create(run, setup.config, args.overwrite)
        return _train(run, setup, state, epoch, args.quiet)


def _create(run, config, overwrite: bool) -> None:
    try:
        run.create(config, overwrite=overwrite)
    except (NotADirectoryError, FileNotFoundError, PermissionError) as error:
        raise UsageError(f"cannot create --out {run.path}: {error.strerror}") from None


# -- inspect, plot ------------------------------------------------------------------------------------


def _restore_model(out: Path):
    """(config, model holding the run's latest checkpoint, step, epoch); reads only."""
    from flax import nnx

    from switchnorm.train import loop
    from switchnorm.train.rundir import RunDir

    run = RunDir(out)
    config = run.read_config()
    model = _model(config)
    assert config.steps_per_epoch is not None  # read_config refuses a config with a field unset
    tx = loop.make_tx(config.train_config(), config.steps_per_epoch)
    state, step, epoch = run.restore_checkpoint(loop.initial_state(model, tx))
    model.eval()
    nnx.update(model, state.params, state.rest)
    return config, model, step, epoch


def _status_line(run, summary: dict[str, Any] | None) -> str | None:
    """What a reader must know beyond the checkpoint: a writer at work, or a divergence."""
    pid = run.writer()
    if pid is not None:
        who = f"process {pid}" if pid else "another process"
        return f"in progress: {who} is writing this run; what follows is its latest checkpoint, not a final result"
    if summary and summary.get("status") == "diverged":
        return (
            f"DIVERGED at step {summary.get('step')}: {summary.get('reason')}; "
            f"what follows is the last good checkpoint (step {summary.get('last_good_step')})"
        )
    return None


def _final_weights(config, model) -> dict[str, Any]:
    """The model's weights as inspect and plot show them; per-sample ones read on the test set.

    config.json's "weights" (absent in runs made before it: "layer") says how the layers
    blend. "layer": :func:`switchnorm.mixing_weights`'s floats, as the training loop records
    them. "channel" and "sample": :func:`switchnorm.mixing_weight_arrays`, whose spread the
    table and figures show; per-sample weights need inputs, so the model (in evaluation
    mode, as restored) runs once on the run's whole test split.
    """
    import jax.numpy as jnp
    from flax import nnx

    import switchnorm
    from switchnorm.train import data, loop

    mode = getattr(config, "weights", "layer")
    layers = [n for _, n in nnx.iter_graph(model) if isinstance(n, switchnorm.SwitchNorm)]
    if mode == "layer" and all(n.weights == "layer" for n in layers):
        return loop.model_weights(model)
    batch = None
    if mode == "sample" or any(n.weights == "sample" for n in layers):
        batch = jnp.asarray(data.load_dataset(config.dataset, config.seed).x_test)
    try:
        return switchnorm.mixing_weight_arrays(model, batch=batch) or loop.model_weights(model)
    except ValueError as error:
        raise UsageError(" ".join(str(error).rstrip(".").split())) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    import switchnorm
    from switchnorm.train import report
    from switchnorm.train.rundir import RunDir

    run = RunDir(args.run)
    config = run.read_config()
    records, _ = run.read_metrics()
    status = _status_line(run, run.read_summary())
    if status and run.latest_step() is None:
        print(f"{args.run}: {config.dataset} {config.model} norm={config.norm}, no checkpoint")
        print(status)
        return 0
    config, model, step, epoch = _restore_model(args.run)
    print(
        f"{args.run}: {config.dataset} {config.model} norm={config.norm}, "
        f"checkpoint at epoch {epoch}/{config.epochs} (step {step})"
    )
    if status:
        print(status)
    evals = [r for r in records if isinstance(r.get("test_accuracy"), float) and r["step"] <= step]
    if evals:
        print(f"test accuracy {evals[-1]['test_accuracy']:.4f} (epoch {evals[-1]['epoch']})")
    weights = report.learned(_final_weights(config, model))
    if weights:
        print(switchnorm.format_mixing_weights(weights))
        if any(getattr(layer, "weights", "layer") != "layer" for layer in weights.values()):
            print("mean±std: over each layer's channels (weights='channel') or test examples ('sample')")
    elif not config.collapsed:
        print(f"norm={config.norm}: the model has no learned mixing weights.")
    if config.collapsed:
        print(_collapsed_lines(config.collapsed, run.read_summary() or {}))
    return 0


def _collapsed_lines(collapsed: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    """What ``inspect`` says of a run made by ``switchnorm collapse``: its layers' choices."""
    lines = [f"collapsed from {summary.get('collapsed_from', '?')}: each layer computes only its choice"]
    if isinstance(summary.get("test_accuracy_before"), float):
        lines.append(
            f"test accuracy before the collapse {summary['test_accuracy_before']:.4f}, "
            f"after {summary['test_accuracy']:.4f}"
        )
    for path, choice in collapsed.items():
        form = "x * a + b (folded bn)" if choice["affine"] else f"mean {choice['mean']}, var {choice['var']}"
        lines.append(f"  {path}: {form}")
    return "\n".join(lines)


def cmd_plot(args: argparse.Namespace) -> int:
    from switchnorm.train import report
    from switchnorm.train.rundir import RunDir

    run = RunDir(args.run)
    config = run.read_config()
    records, _ = run.read_metrics()
    if not records:
        raise UsageError(f"{args.run} has no metrics to plot yet")
    links = [name for name in run.links() if name.endswith(".png")]  # the figures, the distribution's too
    if links:
        raise UsageError(f"{args.run / links[0]} is a symbolic link; switchnorm never writes through links")
    arrays = None
    if getattr(config, "weights", "layer") != "layer" and run.latest_step() is not None:
        arrays = _final_weights(*_restore_model(args.run)[:2])
    written = report.write_figures(run, config, records, arrays)
    if not written:
        print(f"{args.run}: norm={config.norm} learns no mixing weights; no figures.")
    for path in written:
        print(path)
    return 0


# -- collapse -----------------------------------------------------------------------------------------

COLLAPSE_CHANGE_BATCH = 256  # test examples the output change is measured on


def _finished_source(run) -> Any:
    """The run's config; UsageError unless it is a finished run that nobody is writing."""
    config = run.read_config()
    _check_no_writer(run)
    summary = run.read_summary()
    if not summary or summary.get("status") != "complete":
        state = "diverged" if summary else "not finished (no summary.json)"
        raise UsageError(f"{run.path} is {state}; collapse needs a finished run")
    return config


def _test_accuracy(model, config, dataset) -> float:
    """The model's accuracy on the test split, evaluated as the training loop does."""
    from switchnorm.train import loop

    trainer = loop.Trainer(model, config.train_config(), dataset)
    return trainer.evaluate(trainer.initial_state())[1]


def _collapsed_state(model, config, step: int) -> Any:
    """The TrainState a collapsed run's checkpoint holds: the model's arrays at ``step``, a fresh optimizer."""
    import jax.numpy as jnp

    from switchnorm.train import loop

    assert config.steps_per_epoch is not None  # read_config refuses a config with a field unset
    state = loop.initial_state(model, loop.make_tx(config.train_config(), config.steps_per_epoch))
    model.eval()
    return state._replace(step=jnp.asarray(step, jnp.int32))


def cmd_collapse(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    import switchnorm
    from switchnorm._collapse import MIN_WEIGHT
    from switchnorm.train import data
    from switchnorm.train.rundir import RunDir

    source, out = RunDir(args.run), RunDir(args.out)
    if args.out.absolute() == args.run.absolute():
        raise UsageError(f"--out {args.out} is the run itself; name a new directory")
    _finished_source(source)
    min_weight = MIN_WEIGHT if args.min_weight is None else args.min_weight
    _check_fresh_out(out, args.overwrite)
    config, model, step, epoch = _restore_model(args.run)
    dataset = data.load_dataset(config.dataset, config.seed)
    batch = jnp.asarray(dataset.x_test[:COLLAPSE_CHANGE_BATCH])
    try:
        collapsed, report = switchnorm.collapse(model, min_weight, batch=batch)
    except (TypeError, ValueError) as error:
        raise UsageError(" ".join(str(error).rstrip(".").split())) from None
    choices = {path: choice.to_dict() for path, choice in report.choices().items()}
    if not choices:
        raise UsageError(
            f"no layer of {args.run} gives one normalizer a weight of {min_weight} for its mean and its "
            "variance; lower --min-weight, or train with --norm ssn, whose layers end one-hot"
        )
    new_config = dataclasses.replace(config, collapsed={**(config.collapsed or {}), **choices} or None)
    before = _test_accuracy(model, config, dataset)
    after = _test_accuracy(collapsed, new_config, dataset)
    records, _ = source.read_metrics()
    with out:
        _create(out, new_config, args.overwrite)
        out.save_checkpoint(step, _collapsed_state(collapsed, new_config, step), epoch)
        for record in records:
            out.append_metrics(record)
        out.write_summary(_collapse_summary(args.run, report, before, after, epoch, step))
    print(report.format())
    print(f"test accuracy before {before:.4f}, after {after:.4f}; run directory: {out.path}")
    return 0


def _collapse_summary(source: Path, report, before: float, after: float, epoch: int, step: int) -> dict:
    """summary.json of a collapsed run: where it came from and what the collapse changed."""
    return {
        "status": "complete",
        "collapsed_from": str(source),
        "min_weight": report.min_weight,
        "collapsed_layers": sum(layer.collapsed for layer in report.layers),
        "max_change": report.max_change,
        "test_accuracy_before": before,
        "test_accuracy": after,
        "epochs": epoch,
        "steps": step,
    }


# -- main -------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"cannot write or read {error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``switchnorm`` command; returns the exit status."""
    from switchnorm.train.lock import LockHeld
    from switchnorm.train.rundir import RunError

    try:
        args = build_parser().parse_args(argv)
        commands = {"train": cmd_train, "inspect": cmd_inspect, "plot": cmd_plot, "collapse": cmd_collapse}
        command = commands[args.command]
        return command(args)
    except BrokenPipeError:  # e.g. `switchnorm inspect run | head`
        sys.stderr.close()
        return 0
    except (UsageError, LockHeld, RunError, OSError) as error:
        print(f"switchnorm: error: {_one_line(error)}", file=getattr(error, "stderr", None) or sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("switchnorm: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
