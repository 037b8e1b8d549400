"""Where ``--resume`` continues a run from, decided by reading the run directory alone.

:func:`diagnose` reads the whole directory before anything is written and either returns the
:class:`ResumePoint` (the checkpoint to continue from, and what a kill left that the resume
repairs, each with a note) or raises RunError with one line naming the file that disagrees and
what to do. So a refused ``--resume`` changes nothing, and the same command succeeds once the user
has repaired what it named. What a kill can leave, and what is damage instead, is listed in
docs/training.md, "Resume, and what a crash leaves".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from switchnorm.train import checkpoints, files
from switchnorm.train.config import TrainConfig
from switchnorm.train.rundir import CHECKPOINTS, METRICS, SUMMARY, RunDir, RunError

_NUMBERS = ("train_loss", "train_accuracy", "learning_rate")
_EVALUATION = ("test_loss", "test_accuracy")


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run continues, and what the resume repairs first.

    Attributes:
      step: the checkpoint to restore (None: the run starts over).
      epoch: the epochs that checkpoint has done.
      records: the ``metrics.jsonl`` records up to it, the ones kept.
      dropped: the lines after them (a cut-short one included), dropped.
      leftovers: what a kill left half written or half deleted, and checkpoints older than the
        newest two (a clean-up cut short), relative paths, deleted.
      complete: every epoch is done: nothing to train.
    """

    step: int | None
    epoch: int
    records: list[dict[str, Any]]
    dropped: int
    leftovers: list[str]
    complete: bool


def _check_records(run: RunDir, config: TrainConfig, records: list[dict[str, Any]]) -> None:
    """RunError unless every record is the config's: its step, its numbers, its evaluation."""
    assert config.steps_per_epoch is not None  # read_config refuses a config without it
    where = run.path / METRICS
    for line, record in enumerate(records, 1):
        epoch, step = record["epoch"], record["step"]
        evaluated = epoch % config.eval_every == 0 or epoch == config.epochs
        needed = _NUMBERS + (_EVALUATION if evaluated else ())
        absent = [key for key in needed if not isinstance(record.get(key), int | float)]
        if epoch > config.epochs:
            problem = f"is epoch {epoch} of a run of {config.epochs} epochs"
        elif step != epoch * config.steps_per_epoch:
            problem = f"puts epoch {epoch} at step {step}, not {epoch * config.steps_per_epoch}"
        elif absent or "weights" not in record:
            problem = f"(epoch {epoch}) has no {(absent or ['weights'])[0]}"
        else:
            continue
        raise RunError(
            f"{where} line {line} {problem}: it was edited or belongs to another run; restore it, "
            "or delete it and the lines after it (and the checkpoints after its epoch) to train "
            "those epochs again"
        )


def _checkpoints(run: RunDir, config: TrainConfig) -> tuple[list[int], list[str]]:
    """(the run's checkpoints' steps, orbax's unfinished folders); RunError for any other entry."""
    assert config.steps_per_epoch is not None
    entries = run.checkpoint_entries()
    folder = run.path / CHECKPOINTS
    steps, total = [], config.epochs * config.steps_per_epoch
    for name, problem in entries.items():
        if problem is None and (int(name) % config.steps_per_epoch or int(name) > total):
            problem = f"is at a step that is no epoch's end of this run ({config.steps_per_epoch} steps each)"
        if problem not in (None, "unfinished"):
            raise RunError(
                f"{folder / name} {problem}: it is not a complete checkpoint of this run; move it out "
                f"of {folder}, then try again"
            )
        if problem is None:
            steps.append(int(name))
    return sorted(steps), [n for n, p in entries.items() if p == "unfinished"]


def _check_counts(run: RunDir, config: TrainConfig, step: int | None, records: list[Any]) -> int:
    """The checkpoint's epoch, after checking the records account for it (and at most one more)."""
    assert config.steps_per_epoch is not None
    epoch = (step or 0) // config.steps_per_epoch
    where, folder = run.path / METRICS, run.path / CHECKPOINTS
    if len(records) < epoch:
        raise RunError(
            f"{where} has {len(records)} record(s), fewer than the {epoch} epochs of checkpoint "
            f"{folder / str(step)}; it was cut or edited: restore it, or move that checkpoint away"
        )
    if len(records) > epoch + 1:  # a kill leaves at most the record of the epoch it was saving
        missing = folder / str((epoch + 1) * config.steps_per_epoch)
        raise RunError(
            f"{where} records {len(records)} epochs, but the newest checkpoint is of epoch {epoch}: "
            f"{missing} is missing; put it back, or delete the lines of {where.name} after line "
            f"{epoch} to train those epochs again"
        )
    return epoch


def _check_summary(run: RunDir, config: TrainConfig, step: int | None) -> None:
    """RunError if ``summary.json`` says the run ended otherwise than its checkpoints say."""
    summary = run.read_summary()
    status = None if summary is None else summary.get("status")
    if summary is None or status == "diverged":
        return  # unfinished, or diverged (resuming retries from the last good checkpoint)
    where = run.path / SUMMARY
    if status != "complete":
        raise RunError(f"{where} has status {status!r}, not complete or diverged; delete it, then try again")
    assert config.steps_per_epoch is not None
    if step != config.epochs * config.steps_per_epoch:
        raise RunError(
            f"{where} says the run is complete, but its newest checkpoint is step {step} of "
            f"{config.epochs * config.steps_per_epoch}: put the missing checkpoint back, or delete {where.name} to train "
            "the last epochs again"
        )


def _temporary_files(run: RunDir) -> list[str]:
    """The temporary files of :func:`switchnorm.train.files.atomic_write` a kill left in the run."""
    names = sorted(os.listdir(run.root))
    return [n for n in names if files.TEMPORARY.fullmatch(n) and (run.root / n).is_file()]


def diagnose(run: RunDir, config: TrainConfig) -> ResumePoint:
    """Where ``run`` (whose checked config is ``config``) continues; RunError naming what disagrees.

    Reads only.
    """
    links = run.links()
    if links:
        raise RunError(f"{run.path / links[0]} is a symbolic link; switchnorm never follows links: remove it")
    records, partial = run.read_metrics()
    _check_records(run, config, records)
    steps, unfinished = _checkpoints(run, config)
    step = steps[-1] if steps else None
    epoch = _check_counts(run, config, step, records)
    _check_summary(run, config, step)
    return ResumePoint(
        step=step,
        epoch=epoch,
        records=records[:epoch],
        dropped=len(records) - epoch + int(partial),
        leftovers=[f"{CHECKPOINTS}/{name}" for name in [*unfinished, *map(str, steps[: -checkpoints.KEEP])]]
        + _temporary_files(run),
        complete=epoch == config.epochs,
    )
