"""A run directory and the one object that reads and writes it: :class:`RunDir`.

::

    runs/sn64/
      .switchnorm-run        marker written at creation: --overwrite deletes only such directories
      .lock                  the writer's lock (flock) and pid
      config.json            every setting of the run (what --resume reads back)
      metrics.jsonl          one JSON record per epoch: step, losses, accuracies, weights
      checkpoints/<step>/    orbax checkpoints: the full TrainState, the epoch, a SHA-256 per array
      summary.json           written at the end: final accuracy, wall time (or the divergence)
      weights_over_training.png, final_weights.png
      tensorboard/           TensorBoard event files (switchnorm.train.tensorboard)

What it guarantees (docs/training.md, "What the run directory guarantees"): a writer opens the
directory once and reaches every file it writes through that descriptor (``/proc/self/fd/N``),
orbax's and TensorBoard's included, checking before each write that its path still names that
directory; one writer at a time (:func:`switchnorm.train.files.lock`); files replaced in one rename,
never through a symbolic link (:mod:`switchnorm.train.files`); checkpoints committed whole by
orbax, with a SHA-256 per array (:mod:`switchnorm.train.checkpoints`); ``--overwrite`` deletes
only a directory holding the marker, the clean-up only switchnorm's own checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from switchnorm.train import checkpoints, files
from switchnorm.train.config import ConfigError, TrainConfig, loads

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MARKER = ".switchnorm-run"
LOCK = files.LOCK
FIGURES = ("weights_over_training.png", "final_weights.png")
DISTRIBUTION_FIGURE = "sample_weights.png"
"""The figure of a ``weights="sample"`` run's per-sample weights over its test set."""
TENSORBOARD = "tensorboard"
ENTRIES = (CONFIG, METRICS, SUMMARY, CHECKPOINTS, MARKER, LOCK, *FIGURES, DISTRIBUTION_FIGURE, TENSORBOARD)
_MARKER_TEXT = '{"switchnorm_run": 1}\n'
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC


class RunError(Exception):
    """A problem with a run directory, reported as a one-line message."""


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


# -- metrics records ------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def weights_layout(weights: Any) -> dict[str, dict[str, tuple[str, ...]]] | None:
    """``{layer: {kind: names}}`` of a record's weights, or None unless each kind maps names to numbers."""
    if not isinstance(weights, dict):
        return None
    layout = {}
    for layer, kinds in weights.items():
        if not isinstance(kinds, dict) or not {"mean", "var"} <= set(kinds):
            return None
        if not all(isinstance(row, dict) and all(map(_is_number, row.values())) for row in kinds.values()):
            return None
        layout[layer] = {kind: tuple(row) for kind, row in kinds.items()}
    return layout


def _check_record(record: Any, previous: dict[str, Any] | None) -> str | None:
    """Why ``record`` cannot follow ``previous`` in metrics.jsonl, or None if it can."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in ("epoch", "step"):
        value = record.get(key)
        if not _is_number(value) or not isinstance(value, int) or value < 1:
            return f"{key!r} is {value!r}, not a positive integer"
    for key, value in record.items():
        if key not in ("epoch", "step", "weights") and not (value is None or _is_number(value)):
            return f"{key!r} is {value!r}, not a number"
    layout = weights_layout(record.get("weights", {}))
    if layout is None:
        return "'weights' is not a JSON object of layer -> mean and var -> normalizer -> weight"
    if previous is None:
        return None if record["epoch"] == 1 else f"the first record is epoch {record['epoch']}, not 1"
    if record["epoch"] != previous["epoch"] + 1 or record["step"] <= previous["step"]:
        return f"epoch {record['epoch']} (step {record['step']}) does not follow epoch {previous['epoch']}"
    if previous.get("weights") is not None and layout != weights_layout(previous["weights"]):
        return "its weights have other layers or normalizers than the line before"
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
            record = loads(line)
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
    """Owns one run directory: reads it, and (once opened, holding its lock) writes it.

    Reading needs nothing. Writing needs :meth:`open` (or :meth:`create`, which opens), and
    ends with :meth:`close`, which closes the checkpoint manager, releases the lock and lets go
    of the directory; the object is also a context manager. ``primary`` is False in the other
    processes of a multi-process run: they write only their part of each checkpoint.
    """

    def __init__(self, path: Path, *, primary: bool = True):
        self.path = Path(path)
        self.primary = primary
        self._fd: int | None = None  # the directory, once opened
        self._lock: int | None = None
        self._manager: Any = None
        self._failed = False

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the checkpoint manager, releases the lock, closes the directory (quietly after a failure)."""
        manager, self._manager = self._manager, None
        try:
            if manager is not None:
                manager.close()
        except Exception:
            if not self._failed:
                raise
        finally:
            for fd in (self._lock, self._fd):
                if fd is not None:
                    os.close(fd)
            self._lock = self._fd = None

    # -- reading -------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Where this object reads and writes: the opened directory itself once open, else the path."""
        if self._fd is not None and os.path.isdir("/proc/self/fd"):
            return Path(f"/proc/self/fd/{self._fd}")
        return self.path

    def holds_run(self) -> bool:
        return (self.root / CONFIG).is_file()

    def made_by_switchnorm(self) -> bool:
        marker = self.root / MARKER
        return marker.is_file() and not marker.is_symlink()

    def writer(self) -> int | None:
        """The pid of a process writing this run now (0 if unknown), or None."""
        return files.lock_holder(self.path)

    def links(self) -> list[str]:
        """The names of the run's own entries that are symbolic links (all refused)."""
        return [name for name in ENTRIES if (self.root / name).is_symlink()]

    def _read(self, name: str) -> str:
        try:
            return files.read_text(self.root / name)
        except (OSError, UnicodeDecodeError) as error:
            reason = "a symbolic link" if (self.root / name).is_symlink() else str(error)
            raise RunError(f"{self.path / name} is unreadable: {reason}") from None

    def read_config(self) -> TrainConfig:
        """The run's checked config; RunError if missing, not JSON, incomplete or out of range."""
        if not self.path.is_dir():
            raise RunError(f"{self.path} is not a directory holding a run")
        if not (self.root / CONFIG).is_file():
            raise RunError(f"{self.path} holds no run (no {CONFIG})")
        where = self.path / CONFIG
        try:
            config = TrainConfig.from_json(self._read(CONFIG))
        except ConfigError as error:
            raise RunError(f"{where} is bad: {error}; repair it (see docs/training.md)") from None
        except (ValueError, TypeError) as error:
            raise RunError(f"{where} is not valid JSON: {error}") from None
        return config

    def read_metrics(self) -> tuple[list[dict[str, Any]], bool]:
        """(records, partial last line left out); RunError naming a damaged line."""
        if not os.path.lexists(self.root / METRICS):
            return [], False
        return parse_metrics(self._read(METRICS), self.path / METRICS)

    def read_summary(self) -> dict[str, Any] | None:
        """The summary, None if there is none; RunError if it is damaged."""
        if not os.path.lexists(self.root / SUMMARY):
            return None
        try:
            summary = loads(self._read(SUMMARY))
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

    def checkpoint_entries(self) -> dict[str, str | None]:
        """Every entry of ``checkpoints/`` by name: None for a checkpoint, else what it is instead.

        An orbax temporary folder or a checkpoint being deleted (what a kill cut short) is
        ``"unfinished"``; a folder named
        for a step that is not switchnorm's complete checkpoint of it says why; other names are
        left out (nothing of switchnorm's). RunError if ``checkpoints`` is a link or a file.
        """
        folder = self.root / CHECKPOINTS
        if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
            raise RunError(f"{self.path / CHECKPOINTS} is not a directory; move it away, then try again")
        entries: dict[str, str | None] = {}
        for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
            step = checkpoints.step_of(name.partition(".")[0])
            if step is not None and name.partition(".")[2].startswith(checkpoints.UNFINISHED):
                entries[name] = "unfinished"
            elif step is not None and "." in name:
                continue  # not a name of switchnorm's or orbax's
            elif step is not None:
                try:
                    checkpoints.read_meta(folder / name, step)
                    entries[name] = None
                except ValueError as error:
                    entries[name] = str(error)
        return entries

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint, None if there is none.

        RunError if the newest step folder is not a complete switchnorm checkpoint: reading an
        older one instead would silently show less than the run holds.
        """
        steps = {n: p for n, p in self.checkpoint_entries().items() if p != "unfinished"}
        if not steps:
            return None
        newest = max(steps, key=int)
        if steps[newest] is not None:
            raise RunError(
                f"{self.path / CHECKPOINTS / newest} {steps[newest]}: it is not a complete switchnorm "
                f"checkpoint; move it out of {self.path / CHECKPOINTS}, then try again"
            )
        return int(newest)

    def restore_checkpoint(self, template: Any, step: int | None = None) -> tuple[Any, int, int]:
        """(state shaped like ``template``, step, epoch) from a checkpoint (default: the latest).

        RunError if there is none, or it is unreadable, altered or does not fit the template.
        Reads only. A checkpoint a running writer deletes while it is read is retried at the
        writer's newest.
        """
        for attempt in range(3):
            at = self.latest_step() if step is None else step
            if at is None:
                raise RunError(f"{self.path} has no checkpoint")
            try:
                state, epoch = checkpoints.restore(self.root / CHECKPOINTS, at, template)
                return state, at, epoch
            except ValueError as error:
                gone = not (self.root / CHECKPOINTS / str(at)).exists()
                if not (gone and step is None and self.writer() is not None and attempt < 2):
                    raise RunError(f"checkpoint {self.path / CHECKPOINTS / str(at)} {error}") from None
        raise AssertionError("unreachable")

    # -- writing ---------------------------------------------------------------------------

    def open(self, *, locked: bool = True) -> None:
        """Opens the directory for writing and (``locked``, in the primary process) takes its lock.

        RunError if it cannot be opened (a symbolic link is refused); LockHeld if another
        process writes it. ``plot`` writes figures unlocked: each is one atomic rename.
        """
        if self._fd is not None:
            return
        try:
            self._fd = os.open(self.path, _DIRECTORY)
        except OSError as error:
            reason = "it is a symbolic link" if self.path.is_symlink() else error.strerror
            raise RunError(f"cannot open the run directory {self.path}: {reason}") from None
        if self.primary and locked:
            try:
                self._lock = files.lock(self._fd, self.path)
            except BaseException:
                self.close()
                raise

    def check_new(self, overwrite: bool) -> None:
        """RunError unless a new run may start in ``path`` (reads only): absent and creatable,
        empty, or (``overwrite``) a run switchnorm made. ``create`` checks it again under the lock."""
        out = self.path
        if out.is_symlink():
            raise RunError(f"--out {out} is a symbolic link; pass the directory it points to")
        if not os.path.lexists(out):
            ancestor = out.absolute()
            while not os.path.lexists(ancestor):
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise RunError(f"cannot create --out {out}: {ancestor} is a file, not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise RunError(f"cannot create --out {out}: no permission to write in {ancestor}")
            return
        if not out.is_dir():
            raise RunError(f"--out {out} exists and is not a directory")
        if not set(os.listdir(self.root)) - {LOCK}:  # empty, or left by a kill before the marker
            return
        if not self.holds_run() and not self.made_by_switchnorm():
            raise RunError(f"--out {out} exists and is not a run directory; refusing to touch it")
        if not overwrite:
            raise RunError(
                f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        if not self.made_by_switchnorm():
            raise RunError(
                f"--overwrite refuses to delete {out}: it has no {MARKER} marker, so this version of "
                "switchnorm did not create it; delete it yourself or choose another --out"
            )

    def check_no_writer(self) -> None:
        """LockHeld, naming the process, if a command is writing this run now."""
        pid = self.writer()
        if pid is not None:
            raise files.LockHeld(self.path, pid or None)

    def create(self, config: TrainConfig, *, overwrite: bool = False) -> None:
        """Makes (or, with ``overwrite``, empties) the directory, opens and locks it, writes the config.

        With ``overwrite``, the directory must carry the marker; everything in it but the lock
        file is deleted once the lock is taken. Checked before anything is written, and again
        under the lock. Only the primary process creates; the others :meth:`open` after it.
        """
        self.check_new(overwrite)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunError(f"cannot create the run directory {self.path}: {error.strerror}") from None
        self.open()
        self.check_new(overwrite)  # again, holding the lock: nothing changed since
        for name in sorted(set(os.listdir(self.root)) - {LOCK}, key=lambda n: n == MARKER):
            self._delete(self.root / name)  # the marker last: a kill halfway leaves it, so --overwrite again
        self.replace(MARKER, _MARKER_TEXT)
        self.replace(CONFIG, config.to_json())

    @staticmethod
    def _delete(entry: Path) -> None:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)  # fd-based on Linux: never follows a link inside
        else:
            entry.unlink()  # a file or a link itself, never its target

    def check_identity(self) -> None:
        """RunError if ``path`` no longer names the directory this object opened."""
        assert self._fd is not None, "RunDir writes need open() or create() first"
        held = os.fstat(self._fd)
        try:
            now = os.stat(self.path, follow_symlinks=False)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except OSError:
            same = False
        if not same:
            raise RunError(
                f"{self.path} is no longer the run directory this command opened (it was moved, "
                "deleted or replaced); stopped without writing to either"
            )

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """The path to write ``name`` at, after the checks of every write; OSError named as RunError."""
        self.check_identity()
        links = self.links()
        if links:
            raise RunError(
                f"{self.path / links[0]} is a symbolic link; switchnorm never writes through links "
                "inside a run directory: remove it"
            )
        try:
            yield self.root / name
        except OSError as error:
            reason = "it is a symbolic link" if isinstance(error, files.LinkError) else error.strerror
            raise RunError(f"cannot write {self.path / name}: {reason or error}") from None

    def replace(self, name: str, text: str) -> None:
        """Replaces the run's file ``name`` with ``text`` in one rename (the primary process's to write)."""
        with self.writing(name) as target:
            if self.primary:
                files.atomic_write(target, text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.replace(SUMMARY, to_json(summary, indent=2) + "\n")

    def remove(self, *names: str) -> None:
        """Deletes run entries by relative path, if present: ``summary.json``, what a kill left.

        A checkpoint is first renamed ``<step>.switchnorm-deleting`` in one step, so a kill
        halfway leaves no step folder half deleted, only a name the next resume removes.
        """
        for name in names:
            with self.writing(name) as target:
                if self.primary and os.path.lexists(target):
                    if target.parent.name == CHECKPOINTS and "." not in target.name:
                        trash = target.with_name(target.name + checkpoints.DELETING_SUFFIX)
                        if os.path.lexists(trash):
                            self._delete(trash)
                        target = target.rename(trash)
                    self._delete(target)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.writing(METRICS) as target:
            if self.primary:
                files.append_line(target, to_json(record))

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replaces ``metrics.jsonl`` with ``records`` (what a resume keeps, a collapse copies)."""
        self.replace(METRICS, "".join(to_json(r) + "\n" for r in records))

    def tensorboard_dir(self) -> Path:
        """``tensorboard/``, created if absent (never through a link); the primary process's to write."""
        with self.writing(TENSORBOARD) as target:
            if self.primary:
                files.make_dir(target)
            return target

    # -- checkpoints -----------------------------------------------------------------------

    def _tidy(self) -> None:
        """Deletes switchnorm's checkpoints older than the newest :data:`checkpoints.KEEP`."""
        ours = sorted(int(n) for n, problem in self.checkpoint_entries().items() if problem is None)
        self.remove(*(f"{CHECKPOINTS}/{step}" for step in ours[: -checkpoints.KEEP]))

    def save_checkpoint(self, step: int, state: Any, epoch: int) -> None:
        """Saves ``state`` (any pytree) and the epoch it ends as checkpoint ``step``, then tidies.

        Raises RunError (the disk is full, a folder is in the way); the earlier checkpoints stay
        complete and usable.
        """
        with self.writing(CHECKPOINTS) as folder:
            if self.primary:
                files.make_dir(folder)
        try:
            if self._manager is None:
                self._manager = checkpoints.manager(folder)
            checkpoints.save(self._manager, step, state, epoch)
        except Exception as error:  # orbax and tensorstore raise many kinds
            self._failed = True
            raise RunError(
                f"cannot write the checkpoint of step {step} in {self.path / CHECKPOINTS}: "
                f"{checkpoints.first_line(error)}; earlier checkpoints stay intact: fix this and run "
                "with --resume"
            ) from None
        if self.primary:
            self._tidy()
