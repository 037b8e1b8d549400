"""TensorBoard event files of a run, in ``RUN/tensorboard/``: ``tensorboard --logdir runs/`` shows them.

What is written, each at the optimizer step it belongs to (``step`` in ``metrics.jsonl``):

* every step: ``train/batch_loss`` and ``train/batch_accuracy``, that batch's;
* every epoch, at its last step: ``train/loss``, ``train/accuracy`` (the
  epoch's means, as in ``metrics.jsonl``), ``train/learning_rate`` and, for
  every SwitchNorm layer, ``mixing/<layer>/<mean|var>/<normalizer>``;
* at each evaluation: ``test/loss`` and ``test/accuracy``.

The writer is tensorboardX's synchronous ``EventsWriter`` with its
``summary.scalar`` protobufs, imported only when a run starts: no background
thread, so a write that fails (a full disk) fails in the training loop with an
``OSError`` and ends the run with one line, rather than stalling a queue. The
file is flushed at the end of every epoch and at least every
``FLUSH_SECONDS`` while steps are logged.

Resuming: every run opens a new event file (a unique name) whose first event
is a purge (``SessionLog.START``) at the step after the checkpoint it starts
from, so TensorBoard drops what a killed run had logged beyond that
checkpoint; the steps that follow are logged once, by the resumed run. Only
the primary process writes, into the folder its run directory made
(:meth:`switchnorm.train.rundir.RunDir.tensorboard_dir`); a failed write is an
``OSError`` naming the file as the user knows it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLUSH_SECONDS = 10.0  # the longest a live view lags behind within an epoch


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` record, by TensorBoard tag."""
    names = {
        "train_loss": "train/loss",
        "train_accuracy": "train/accuracy",
        "learning_rate": "train/learning_rate",
        "test_loss": "test/loss",
        "test_accuracy": "test/accuracy",
    }
    scalars = {tag: float(record[key]) for key, tag in names.items() if key in record}
    for layer, kinds in (record.get("weights") or {}).items():
        for kind, weights in kinds.items():
            for normalizer, weight in weights.items():
                scalars[f"mixing/{layer}/{kind}/{normalizer}"] = float(weight)
    return scalars


class EventLog:
    """One run's TensorBoard event file, from the step a run (re)starts at to its end.

    Args:
      folder: the existing folder to write in (``RUN/tensorboard``).
      start_step: the step the run starts from (0, or its checkpoint's on
        resume); events an earlier, killed run wrote after it are purged.
      shown: the folder as errors name it (default ``folder``).
    """

    def __init__(self, folder: Path, start_step: int, shown: Path | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import SessionLog

        self._shown = shown or folder
        suffix = f".{os.getpid()}.{secrets.token_hex(4)}"  # unguessable: no planted link has its name
        with self._named():
            self._writer: Any = EventsWriter(str(folder / "events"), suffix)
        self._write(start_step + 1, session_log=SessionLog(status=SessionLog.START))
        self._flushed = time.monotonic()

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """An OSError inside names the event folder as the user knows it."""
        try:
            yield
        except OSError as error:
            raise OSError(error.errno, error.strerror or str(error), str(self._shown)) from None

    def _write(self, step: int, **fields: Any) -> None:
        from tensorboardX.proto.event_pb2 import Event

        with self._named():
            self._writer.write_event(Event(wall_time=time.time(), step=step, **fields))

    def _write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        values = [value for tag, x in scalars.items() for value in scalar(tag, x).value]
        self._write(step, summary=Summary(value=values))

    def flush(self) -> None:
        with self._named():
            self._writer.flush()
        self._flushed = time.monotonic()

    def log_step(self, step: int, loss: float, accuracy: float) -> None:
        """Writes one step's batch loss and accuracy (flushed every ``FLUSH_SECONDS``)."""
        self._write_scalars(step, {"train/batch_loss": loss, "train/batch_accuracy": accuracy})
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Writes an epoch's record and flushes, so a live view shows each epoch as it ends."""
        self._write_scalars(record["step"], epoch_scalars(record))
        self.flush()

    def close(self) -> None:
        """Flushes and closes the file; safe to call twice (a failed close is not retried)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            with self._named():
                writer.flush()
        finally:
            # EventsWriter.close() flushes first and skips closing the file when that flush
            # fails (a full disk): close the record file itself, so no descriptor is left open.
            writer._py_recordio_writer.close()
