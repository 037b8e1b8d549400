"""A run directory and the one object that reads and writes it: :class:`RunDir`.

::

    runs/sn64/
      .switchnorm-run        marker written at creation: --overwrite deletes only such directories
      .lock                  the writer's lock (flock) and pid
      config.json            every setting of the run (what --resume reads back)
      metrics.jsonl          one JSON record per epoch: step, losses, accuracies, weights
      checkpoints/<step>/    orbax checkpoints: the full TrainState plus the epoch
      manifests/<step>.json  size and SHA-256 of every file of that checkpoint
      summary.json           written at the end: final accuracy, wall time (or the divergence)
      weights_over_training.png, final_weights.png
      tensorboard/           TensorBoard event files (switchnorm.train.tensorboard)

The guarantees (docs/training.md lists them for users):

* **One writer.** Every command that writes holds an exclusive ``flock`` on
  ``.lock`` (:mod:`switchnorm.train.lock`) from before its first write to its
  end; a second writer is refused with the holder's pid. The kernel drops the
  lock of a killed process.
* **Atomic files.** ``config.json``, ``summary.json``, manifests and figures are
  written to a fresh temporary file and renamed into place; ``metrics.jsonl``
  grows one fsynced line at a time. No write, rename or delete follows a
  symbolic link (:mod:`switchnorm.train.files`).
* **Complete checkpoints.** orbax writes each checkpoint into a temporary
  directory and renames it when complete; then its manifest is written. A
  checkpoint counts only once its manifest exists, and a damaged one is caught
  before orbax reads it. Before a save, ``manifests/<step>.pending`` records
  that switchnorm is writing that step, so a step folder a kill left behind is
  recognisably switchnorm's. The clean-up deletes only step folders a manifest
  (or a pending record) names.
* **Deleting.** ``--overwrite`` deletes only a directory holding the marker.
* **Damage is reported.** A bad line in ``metrics.jsonl`` is refused with its
  line number (only a last line cut short by a kill is dropped, and resume
  says so).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from switchnorm.train import files
from switchnorm.train.config import ConfigError, RunConfig
from switchnorm.train.lock import RunLock, holder

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MANIFESTS = "manifests"
MARKER = ".switchnorm-run"
LOCK = ".lock"
FIGURES = ("weights_over_training.png", "final_weights.png")
DISTRIBUTION_FIGURE = "sample_weights.png"
"""The figure of a ``weights="sample"`` run's per-sample weights over its test set."""
TENSORBOARD = "tensorboard"
KEEP_CHECKPOINTS = 2
_ENTRIES = (
    CONFIG, METRICS, SUMMARY, CHECKPOINTS, MANIFESTS, MARKER, LOCK, *FIGURES, DISTRIBUTION_FIGURE, TENSORBOARD
)  # fmt: skip
_MARKER_TEXT = '{"switchnorm_run": 1}\n'


class RunError(Exception):
    """A problem with a run directory, reported as a one-line message.

    ``stderr``, when set, is where to report it: orbax may still be printing
    into the (captured) ``sys.stderr`` after a failed checkpoint write.
    """

    stderr: Any = None


def _quiet_orbax() -> Any:
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # failures reach the user as RunError
    import orbax.checkpoint as ocp

    return ocp


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON: non-finite floats become null (a run stops before it logs any)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, indent=indent)


def _refuse_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constants)


# -- metrics records ------------------------------------------------------------------------


def _check_record(record: Any, previous: dict[str, Any] | None) -> str | None:
    """Why ``record`` cannot follow ``previous`` in metrics.jsonl, or None if it can."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in ("epoch", "step"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key!r} is {value!r}, not a positive integer"
    for key, value in record.items():
        if key not in ("epoch", "step", "weights") and not (
            value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        ):
            return f"{key!r} is {value!r}, not a number"
    if not isinstance(record.get("weights", {}), dict):
        return "'weights' is not a JSON object"
    if previous is not None and (
        record["epoch"] != previous["epoch"] + 1 or record["step"] <= previous["step"]
    ):
        return f"epoch {record['epoch']} (step {record['step']}) does not follow epoch {previous['epoch']}"
    if previous is None and record["epoch"] != 1:
        return f"the first record is epoch {record['epoch']}, not 1"
    return None


def parse_metrics(text: str, where: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, whether a last line cut short by a kill was left out).

    Raises RunError naming the file and line of any other bad line: a damaged
    file is refused, never silently shortened.
    """
    lines = text.split("\n")
    partial = lines.pop() != ""  # text not ending in a newline: the last write was cut short
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            record = _loads(line)
        except ValueError:
            problem: str | None = "not valid JSON"
        else:
            problem = _check_record(record, records[-1] if records else None)
        if problem:
            raise RunError(
                f"{where} line {number} is damaged ({problem}); repair or delete that line "
                "and the ones after it, then try again"
            )
        records.append(record)
    return records, partial


# -- the run directory ---------------------------------------------------------------------------


class RunDir:
    """Owns one run directory: reads it, and (holding its lock) writes it.

    Reading needs nothing. Writing needs :meth:`lock` first (:meth:`create`
    takes it), and ends with :meth:`close`, which closes the one checkpoint
    manager and releases the lock; the object is also a context manager.
    """

    def __init__(self, path: Path, *, primary: bool = True):
        self.path = Path(path)
        self.primary = primary  # only the primary process writes files other than checkpoints
        self._lock = RunLock(self.path)
        self._manager: Any = None
        self._failed = False

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the checkpoint manager and releases the lock (after a failed save, quietly)."""
        if self._manager is not None:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise
            self._manager = None
        self._lock.release()

    # -- reading -------------------------------------------------------------------------

    def holds_run(self) -> bool:
        return (self.path / CONFIG).is_file()

    def made_by_switchnorm(self) -> bool:
        marker = self.path / MARKER
        return marker.is_file() and not marker.is_symlink()

    def writer(self) -> int | None:
        """The pid of a process writing this run now (0 if unknown), or None."""
        return holder(self.path)

    def links(self) -> list[str]:
        """The names of the run's own entries that are symbolic links (all refused)."""
        return [name for name in _ENTRIES if (self.path / name).is_symlink()]

    def _read(self, name: str) -> str:
        try:
            return files.read_text(self.path / name)
        except (OSError, UnicodeDecodeError) as error:
            reason = "a symbolic link" if (self.path / name).is_symlink() else str(error)
            raise RunError(f"{self.path / name} is unreadable: {reason}") from None

    def read_config(self) -> RunConfig:
        """The run's checked config; RunError if missing, not JSON or out of range."""
        if not self.path.is_dir():
            raise RunError(f"{self.path} is not a directory holding a run")
        if not self.holds_run():
            raise RunError(f"{self.path} holds no run (no {CONFIG})")
        where = self.path / CONFIG
        try:
            config = RunConfig.from_mapping(_loads(self._read(CONFIG)))
        except ConfigError as error:
            raise RunError(f"{where} is bad: {error}") from None
        except (ValueError, TypeError) as error:
            raise RunError(f"{where} is not valid JSON: {error}") from None
        if not config.complete:
            raise RunError(f"{where} is incomplete: no {', '.join(config.missing())}")
        return config

    def read_metrics(self) -> tuple[list[dict[str, Any]], bool]:
        """(records, partial last line left out); RunError naming a damaged line."""
        if not (self.path / METRICS).exists() and not (self.path / METRICS).is_symlink():
            return [], False
        return parse_metrics(self._read(METRICS), self.path / METRICS)

    def read_summary(self) -> dict[str, Any] | None:
        """The summary, None if there is none; RunError if it is damaged."""
        if not (self.path / SUMMARY).exists() and not (self.path / SUMMARY).is_symlink():
            return None
        try:
            summary = _loads(self._read(SUMMARY))
        except ValueError as error:
            summary, problem = None, str(error)
        else:
            problem = "not a JSON object"
        if not isinstance(summary, dict):
            raise RunError(
                f"{self.path / SUMMARY} is damaged ({problem}); delete it and run the command "
                "again to write it anew"
            )
        return summary

    # -- writing ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Takes the run's exclusive lock (a LockHeld error names the holder)."""
        if self.primary and not self._lock.held:
            self._lock.acquire()

    def _check_writable(self) -> None:
        if not self._lock.held and self.primary:
            raise RuntimeError("RunDir writes need lock() first")
        links = self.links()
        if links:
            raise RunError(
                f"{self.path / links[0]} is a symbolic link; switchnorm never writes through links "
                "inside a run directory: remove it"
            )

    def create(self, config: RunConfig, *, overwrite: bool = False) -> None:
        """Makes (or, with ``overwrite``, empties) the directory, locks it, writes the config.

        With ``overwrite``, the directory must carry the marker; everything in it
        but the lock file is deleted after the lock is taken.
        """
        if self.primary:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            present = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
            if present and not (overwrite and self.made_by_switchnorm()):
                raise RunError(f"{self.path} changed while starting (it now holds {present[0]}); try again")
            for name in present:
                self._delete(self.path / name)
            files.atomic_write(self.path / MARKER, _MARKER_TEXT)
            self.write_config(config)
        from switchnorm.train import distributed

        distributed.barrier("switchnorm-run-created")

    def _delete(self, entry: Path) -> None:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)  # fd-based on Linux: never follows a link inside
        else:
            entry.unlink()  # a file or a link itself, never its target

    def write_config(self, config: RunConfig) -> None:
        self._check_writable()
        if self.primary:
            files.atomic_write(self.path / CONFIG, config.to_json())

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._check_writable()
        if self.primary:
            files.atomic_write(self.path / SUMMARY, to_json(summary, indent=2) + "\n")

    def remove_summary(self) -> None:
        self._check_writable()
        if self.primary:
            (self.path / SUMMARY).unlink(missing_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._check_writable()
        if self.primary:
            files.append_line(self.path / METRICS, to_json(record))

    def tensorboard_dir(self) -> Path:
        """``tensorboard/``, created if absent (never through a link); the primary process's to write."""
        self._check_writable()
        if self.primary:
            files.make_dir(self.path / TENSORBOARD)
        return self.path / TENSORBOARD

    def truncate_metrics(self, last_step: int) -> int:
        """Keeps the records up to ``last_step`` (what its checkpoint had seen); returns how many went."""
        self._check_writable()
        records, partial = self.read_metrics()
        kept = [r for r in records if r["step"] <= last_step]
        if self.primary and (len(kept) < len(records) or partial):
            files.atomic_write(self.path / METRICS, "".join(to_json(r) + "\n" for r in kept))
        return len(records) - len(kept) + int(partial)

    # -- checkpoints -----------------------------------------------------------------------

    def _manifest_steps(self, suffix: str = ".json") -> list[int]:
        directory = self.path / MANIFESTS
        if not directory.is_dir() or directory.is_symlink():
            return []
        return sorted(
            int(p.name[: -len(suffix)])
            for p in directory.iterdir()
            if p.name.endswith(suffix) and p.name[: -len(suffix)].isdigit()
        )

    def _step_dir(self, step: int) -> Path:
        return self.path / CHECKPOINTS / str(step)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (a real folder with a manifest), or None."""
        if (self.path / CHECKPOINTS).is_symlink():
            return None
        steps = [
            s
            for s in self._manifest_steps()
            if self._step_dir(s).is_dir() and not self._step_dir(s).is_symlink()
        ]
        return max(steps) if steps else None

    def tidy_checkpoints(self) -> list[int]:
        """Finishes what a kill interrupted; returns the steps whose folders it deleted.

        Deletes step folders left mid-save (a pending record and no manifest)
        and complete checkpoints older than the newest ``KEEP_CHECKPOINTS`` (a
        kill during the clean-up). Only steps its own records name.
        """
        self._check_writable()
        complete = self._manifest_steps()
        doomed = [s for s in self._manifest_steps(".pending") if s not in complete]
        doomed += complete[:-KEEP_CHECKPOINTS]
        if self.primary:
            for step in doomed:
                self._delete_step(step)
        return doomed

    def _delete_step(self, step: int) -> None:
        """Deletes checkpoint ``step``'s folder, then its records (never through a link)."""
        folder = self._step_dir(step)
        if folder.is_symlink():
            raise RunError(f"{folder} is a symbolic link; switchnorm never deletes through links: remove it")
        if folder.is_dir():
            shutil.rmtree(folder)
        for suffix in (".json", ".pending"):
            (self.path / MANIFESTS / f"{step}{suffix}").unlink(missing_ok=True)

    def _checkpoint_manager(self) -> Any:
        if self._manager is None:
            ocp = _quiet_orbax()
            files.make_dir(self.path / CHECKPOINTS)
            self._manager = ocp.CheckpointManager(
                (self.path / CHECKPOINTS).absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=None,  # switchnorm deletes old steps itself, by their manifests
                    enable_async_checkpointing=False,
                    create=False,
                ),
            )
        return self._manager

    def save_checkpoint(self, step: int, state: Any, epoch: int) -> None:
        """Saves ``state`` (any pytree) and the epoch it ends as checkpoint ``step``, then its manifest.

        Raises RunError (the disk is full, a folder is in the way); the earlier
        checkpoints stay complete and usable.
        """
        self._check_writable()
        ocp = _quiet_orbax()
        flat, _ = _flatten(state)
        if self.primary:
            files.make_dir(self.path / MANIFESTS)
            files.atomic_write(self.path / MANIFESTS / f"{step}.pending", "{}\n")
        saved_stderr = sys.stderr
        sys.stderr = io.StringIO()  # orbax's threads print tracebacks of a failed write: one line suffices
        try:
            manager = self._checkpoint_manager()
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(flat),
                    meta=ocp.args.JsonSave({"step": step, "epoch": epoch, "names": sorted(flat)}),
                ),
                force=True,
            )
            manager.wait_until_finished()
        except Exception as error:  # orbax and tensorstore raise many kinds
            self._failed = True  # stderr stays captured: orbax's threads keep reporting this failure
            failure = RunError(
                f"cannot write the checkpoint of step {step} in {self.path / CHECKPOINTS}: "
                f"{_first_line(error)}; earlier checkpoints stay intact: fix this and run with --resume"
            )
            failure.stderr = saved_stderr
            raise failure from None
        sys.stderr = saved_stderr
        if self.primary:
            files.atomic_write(
                self.path / MANIFESTS / f"{step}.json", json.dumps(_file_digests(self._step_dir(step)))
            )
            (self.path / MANIFESTS / f"{step}.pending").unlink()
            self.tidy_checkpoints()

    def verify_checkpoint(self, step: int) -> None:
        """Raises RunError unless checkpoint ``step``'s files match its manifest."""
        where = self._step_dir(step)
        try:
            manifest = _loads(files.read_text(self.path / MANIFESTS / f"{step}.json"))
            entries = [(str(name), int(size), str(digest)) for name, (size, digest) in manifest.items()]
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise RunError(f"checkpoint {where} has an unreadable manifest: {error}") from None
        try:
            found = _file_digests(where)
        except OSError as error:
            raise RunError(f"checkpoint {where} is unreadable: {error}") from None
        for name, size, digest in entries:
            if name not in found:
                raise RunError(f"checkpoint {where} is incomplete: {name} is missing")
            if found[name][0] != size:
                raise RunError(
                    f"checkpoint {where} is truncated: {name} has {found[name][0]} of its {size} bytes"
                )
            if found[name][1] != digest:
                raise RunError(f"checkpoint {where} is corrupted: {name} does not match its checksum")

    def restore_checkpoint(self, template: Any, step: int | None = None) -> tuple[Any, int, int]:
        """(state shaped like ``template``, step, epoch) from a checkpoint (default: the latest).

        Raises RunError if there is none, or it is unreadable, truncated or does
        not match the template's names, shapes and dtypes. Reads only.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise RunError(f"{self.path} has no checkpoint")
        self.verify_checkpoint(step)
        flat, meta = _orbax_restore(self.path / CHECKPOINTS, step)
        where = self._step_dir(step)
        expected, treedef = _flatten(template)
        leaves = _matching_leaves(flat, expected, where)
        if meta.get("step") != step or not isinstance(meta.get("epoch"), int) or meta["epoch"] < 0:
            raise RunError(f"checkpoint {where} has inconsistent metadata {meta}")
        return jax.tree_util.tree_unflatten(treedef, leaves), step, meta["epoch"]


# -- checkpoint helpers ------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    """A short reason: the OS error inside a tensorstore message if there is one, else the first line."""
    text = str(error).strip()
    code = re.search(r"os_error_code='(\d+)'", text)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if code:
        return os.strerror(int(code.group(1)))
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _flatten(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        flat[name] = np.asarray(leaf)
    return flat, treedef


def _file_digests(directory: Path) -> dict[str, list[Any]]:
    return {
        str(file.relative_to(directory)): [file.stat().st_size, hashlib.sha256(file.read_bytes()).hexdigest()]
        for file in sorted(directory.rglob("*"))
        if file.is_file() and not file.is_symlink()
    }


def _orbax_restore(directory: Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ocp = _quiet_orbax()
    try:
        manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
        )
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
            )
        finally:
            manager.close()
        return dict(restored["state"]), dict(restored["meta"])
    except Exception as error:  # orbax/tensorstore raise many kinds
        raise RunError(
            f"checkpoint {directory / str(step)} is unreadable or truncated: {_first_line(error)}"
        ) from None


def _matching_leaves(flat: dict[str, Any], expected: dict[str, np.ndarray], where: Path) -> list[np.ndarray]:
    if sorted(flat) != sorted(expected):
        missing = sorted(set(expected) - set(flat))[:3]
        extra = sorted(set(flat) - set(expected))[:3]
        raise RunError(f"checkpoint {where} does not match the model (missing {missing}, unexpected {extra})")
    leaves = []
    for name, want in expected.items():
        got = np.asarray(flat[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise RunError(
                f"checkpoint {where}: {name} has shape {got.shape} {got.dtype}, "
                f"the model needs {want.shape} {want.dtype}"
            )
        leaves.append(got)
    return leaves
