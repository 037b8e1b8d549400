"""What ``switchnorm train`` and ``switchnorm collapse`` do once their flags are parsed.

Every check that can refuse runs before the first write: the settings
(:class:`~switchnorm.train.config.TrainConfig`), the output directory, the data and the model,
and on ``--resume`` the whole run directory (:func:`switchnorm.train.resume.diagnose`). Then the
writes, through a :class:`~switchnorm.train.rundir.RunDir` holding the directory it opened. A
refused command raises :class:`UsageError` or ``RunError`` (one line, exit 2) and has changed
no file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

import switchnorm
from switchnorm._collapse import MIN_WEIGHT
from switchnorm.train import data, distributed, loop, models, report, resume
from switchnorm.train.config import ConfigError, TrainConfig
from switchnorm.train.rundir import SUMMARY, RunDir, RunError

EXIT_DIVERGED = 3
COLLAPSE_CHANGE_BATCH = 256  # test examples the output change of a collapse is measured on


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def flag(field: str) -> str:
    """The command-line flag of a setting: ``--lr`` for ``learning_rate``, else its dashed name."""
    return "--lr" if field == "learning_rate" else "--" + field.replace("_", "-")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).rstrip(".").split())


# -- the checks, all before anything is written ---------------------------------------------------


def fresh_config(options: dict[str, Any]) -> TrainConfig:
    """The config of a new run with the flags given; UsageError naming a bad flag."""
    try:
        return TrainConfig.for_dataset(**options)
    except ConfigError as error:
        raise UsageError(error.naming(flag(error.field))) from None


def _resumed_config(run: RunDir, options: dict[str, Any]) -> TrainConfig:
    """The run's own config; UsageError if a flag given is out of range or disagrees with it."""
    if run.path.is_symlink():
        raise UsageError(f"--out {run.path} is a symbolic link; pass the directory it points to")
    config = run.read_config()
    if config.collapsed:
        raise UsageError(
            f"{run.path} was made by switchnorm collapse for inference; it cannot be trained further: "
            "resume the run it was collapsed from"
        )
    try:
        dataclasses.replace(config, **options)
    except ConfigError as error:
        raise UsageError(error.naming(flag(error.field))) from None
    for key, value in options.items():
        if getattr(config, key) != value:
            raise UsageError(
                f"{flag(key)} {value} differs from the run's {getattr(config, key)}; "
                "a resumed run keeps its own settings"
            )
    run.check_no_writer()
    return config


def run_model(config: TrainConfig) -> nnx.Module:
    """The run's model, freshly initialized; in a collapsed run, with its layers collapsed."""
    assert config.model is not None and config.input_shape is not None and config.num_classes is not None
    model = models.build_model(
        config.model,
        config.input_shape,
        config.num_classes,
        norm=config.norm,
        dtype=None if config.dtype == "float32" else jnp.dtype(config.dtype),
        weights=config.weights,
        seed=config.seed,
    )
    if not config.collapsed:
        return model
    try:
        return models.collapsed_model(model, config.collapsed)
    except ValueError as error:
        raise UsageError(f"config.json's collapsed does not fit model {config.model}: {error}") from None


@dataclasses.dataclass
class Setup:
    """What a run trains with: its complete config, the dataset, the trainer."""

    config: TrainConfig
    dataset: data.Dataset
    trainer: loop.Trainer


def build(config: TrainConfig, devices: int | None) -> Setup:
    """Loads the data and builds model and trainer; UsageError if they do not fit the config."""
    dataset = data.load_dataset(config.dataset, config.seed)
    if config.batch_size > len(dataset.x_train):
        raise UsageError(
            f"batch size {config.batch_size} is larger than the {len(dataset.x_train)} "
            f"examples of {config.dataset}'s training set"
        )
    try:
        described = config.with_data(dataset)
    except ConfigError as error:
        raise UsageError(error.naming(flag(error.field))) from None
    found = (described.input_shape, described.num_classes, described.steps_per_epoch)
    recorded = (config.input_shape, config.num_classes, config.steps_per_epoch)
    if config.steps_per_epoch is not None and recorded != found:
        raise UsageError(
            f"config.json's input_shape, num_classes, steps_per_epoch {recorded} do not match "
            f"the {config.dataset} data's {found}"
        )
    try:
        trainer = distributed.make_trainer(run_model(described), described, dataset, devices=devices)
    except ValueError as error:
        raise UsageError(_one_line(error)) from None
    return Setup(described, dataset, trainer)


def restore_model(out: Path) -> tuple[TrainConfig, nnx.Module, int, int]:
    """(config, model holding the run's latest checkpoint in eval mode, step, epoch); reads only."""
    run = RunDir(out)
    config = run.read_config()
    model = run_model(config)
    assert config.steps_per_epoch is not None  # read_config refuses a config without it
    tx = loop.make_tx(config, config.steps_per_epoch)
    state, step, epoch = run.restore_checkpoint(loop.initial_state(model, tx))
    model.eval()
    nnx.update(model, state.params, state.rest)
    return config, model, step, epoch


def _restored(run: RunDir, setup: Setup, point: resume.ResumePoint) -> loop.TrainState:
    """The state to continue from: the checkpoint ``point`` names, or the initial one. Reads only."""
    state = setup.trainer.initial_state()
    if point.step is None:
        return state
    state, step, epoch = run.restore_checkpoint(state, point.step)
    if epoch != point.epoch:
        raise RunError(
            f"checkpoint {run.path / 'checkpoints' / str(step)} says it ends epoch {epoch}, but step "
            f"{step} ends epoch {point.epoch} of this run; move it away, then try again"
        )
    return state


# -- the writes -----------------------------------------------------------------------------------


def _create(run: RunDir, config: TrainConfig, overwrite: bool) -> None:
    """A new run directory holding ``config`` (the primary process makes it; all open it)."""
    if run.primary:
        run.create(config, overwrite=overwrite)
    distributed.barrier("switchnorm-run-created")
    run.open()


def _repair(run: RunDir, point: resume.ResumePoint) -> None:
    """Undoes what a kill left, as :func:`switchnorm.train.resume.diagnose` found it, saying so."""
    if point.leftovers:
        run.remove(*point.leftovers)
        print(f"removed what a kill left unfinished: {', '.join(point.leftovers)}")
    if point.dropped:
        run.write_metrics(point.records)
        print(
            f"dropped {point.dropped} metrics.jsonl line(s) written after the checkpoint of epoch {point.epoch}"
        )


def _continue(run: RunDir, setup: Setup, point: resume.ResumePoint) -> bool:
    """Opens and locks the run, repairs it; True if it is complete (nothing left to train)."""
    run.open()
    if run.read_config() != setup.config or resume.diagnose(run, setup.config) != point:
        raise UsageError(f"{run.path} changed while it was being checked; try again")
    distributed.barrier("switchnorm-resume-checked")
    _repair(run, point)
    distributed.barrier("switchnorm-resume-ready")  # every process sees the repaired directory
    if point.complete:
        print(f"{run.path}: the run is complete ({point.epoch} epochs).")
        report.finish(run, setup.config, None, run.read_summary())
        return True
    run.remove(SUMMARY)  # a diverged run's, now retried
    assert setup.config.steps_per_epoch is not None
    print(f"resuming {run.path} at epoch {point.epoch} (step {point.epoch * setup.config.steps_per_epoch})")
    return False


def _train(run: RunDir, setup: Setup, state: Any, epoch: int, quiet: bool) -> int:
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


def join_cluster(flags: argparse.Namespace) -> bool:
    """Starts JAX on the devices and processes asked for; True in the process that writes files."""
    distributed.request_cpu_devices(flags.devices)
    try:
        distributed.initialize(flags.coordinator_address, flags.num_processes, flags.process_id)
    except ValueError as error:
        raise UsageError(_one_line(error)) from None
    return distributed.is_primary()


def train(options: dict[str, Any], out: Path, flags: argparse.Namespace) -> int:
    """``switchnorm train``: a new run in ``out`` with the settings ``options`` gives, or resumed.

    ``flags`` are the command's others: resume, overwrite, quiet and the cluster's (devices,
    coordinator_address, num_processes, process_id). Returns the exit status.
    """
    resumed, overwrite = flags.resume, flags.overwrite
    config = None if resumed else fresh_config(options)
    run = RunDir(out, primary=join_cluster(flags))
    point = None
    if resumed:
        setup = build(_resumed_config(run, options), flags.devices)
        point = resume.diagnose(run, setup.config)
        state, epoch = _restored(run, setup, point), point.epoch
    else:
        assert config is not None
        run.check_new(overwrite)
        run.check_no_writer()
        setup = build(config, flags.devices)
        state, epoch = setup.trainer.initial_state(), 0
    distributed.barrier("switchnorm-train-checked")  # every process passed the checks
    with run:
        if point is None:
            _create(run, setup.config, overwrite)
        elif _continue(run, setup, point):
            return 0
        return _train(run, setup, state, epoch, flags.quiet)


# -- collapse ---------------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _check_apart(source: Path, out: Path) -> None:
    """UsageError if ``out`` is ``source``, lies inside it or holds it: compared by what they are
    (device and inode along the resolved paths), not by how they are spelled."""
    run = _identity(source)
    if run is None:
        return  # no source: reading its config says so
    resolved = Path(os.path.realpath(out))
    for depth, place in enumerate([resolved, *resolved.parents]):
        if _identity(place) == run:
            where = "is the run itself" if depth == 0 else f"lies inside the run {source}"
            raise UsageError(f"--out {out} {where}; name a new directory outside it")
    target = _identity(out)
    if target is not None and any(_identity(p) == target for p in Path(os.path.realpath(source)).parents):
        raise UsageError(f"--out {out} holds the run {source}; name a new directory outside it")


def _finished_source(run: RunDir) -> TrainConfig:
    """The run's config; UsageError unless it is a finished run that nobody is writing."""
    config = run.read_config()
    run.check_no_writer()
    summary = run.read_summary()
    if not summary or summary.get("status") != "complete":
        state = "diverged" if summary else "not finished (no summary.json)"
        raise UsageError(f"{run.path} is {state}; collapse needs a finished run")
    return config


def _test_accuracy(model: nnx.Module, config: TrainConfig, dataset: data.Dataset) -> float:
    """The model's accuracy on the test split, evaluated as the training loop does."""
    trainer = loop.Trainer(model, config, dataset)
    return trainer.evaluate(trainer.initial_state())[1]


def collapse(source: Path, out: Path, min_weight: float | None, overwrite: bool) -> int:
    """``switchnorm collapse``: a copy of the finished run ``source`` in ``out`` whose layers that
    chose compute only their choice. Returns the exit status."""
    _check_apart(source, out)
    origin, target = RunDir(source), RunDir(out)
    _finished_source(origin)
    min_weight = MIN_WEIGHT if min_weight is None else min_weight
    target.check_new(overwrite)
    target.check_no_writer()
    config, model, step, epoch = restore_model(source)
    dataset = data.load_dataset(config.dataset, config.seed)
    batch = jnp.asarray(dataset.x_test[:COLLAPSE_CHANGE_BATCH])
    try:
        collapsed, choices = switchnorm.collapse(model, min_weight, batch=batch)
    except (TypeError, ValueError) as error:
        raise UsageError(_one_line(error)) from None
    chosen = {path: choice.to_dict() for path, choice in choices.choices().items()}
    if not chosen:
        raise UsageError(
            f"no layer of {source} gives one normalizer a weight of {min_weight} for its mean and its "
            "variance; lower --min-weight, or train with --norm ssn, whose layers end one-hot"
        )
    new_config = dataclasses.replace(config, collapsed={**(config.collapsed or {}), **chosen})
    before, after = _test_accuracy(model, config, dataset), _test_accuracy(collapsed, new_config, dataset)
    records, _ = origin.read_metrics()
    assert new_config.steps_per_epoch is not None
    state = loop.initial_state(collapsed, loop.make_tx(new_config, new_config.steps_per_epoch))
    collapsed.eval()
    with target:
        _create(target, new_config, overwrite)
        target.save_checkpoint(step, state._replace(step=jnp.asarray(step, jnp.int32)), epoch)
        target.write_metrics(records)
        target.write_summary(
            {
                "status": "complete",
                "collapsed_from": str(source),
                "min_weight": choices.min_weight,
                "collapsed_layers": sum(layer.collapsed for layer in choices.layers),
                "max_change": choices.max_change,
                "test_accuracy_before": before,
                "test_accuracy": after,
                "epochs": epoch,
                "steps": step,
            }
        )
    print(choices.format())
    print(f"test accuracy before {before:.4f}, after {after:.4f}; run directory: {target.path}")
    return 0
