"""TensorBoard event files of a run, in ``RUN/tensorboard/``: ``tensorboard --logdir runs/`` shows them.

What is written, each at the optimizer step it belongs to (``step`` in ``metrics.jsonl``):

* every step: ``train/batch_loss`` and ``train/batch_accuracy``, that batch's;
* every epoch, at its last step: ``train/loss``, ``train/accuracy`` (the
  epoch's means, as in ``metrics.jsonl``), ``train/learning_rate`` and, for
  every SwitchNorm layer, ``mixing/<layer>/<mean|var>/<normalizer>``;
* at each evaluation: ``test/loss`` and ``test/accuracy``.

The writer is tensorboardX's ``SummaryWriter``, imported only when a run
starts. Resuming: every writer opens a new event file (a unique name), and
starts it with a purge at the step after the checkpoint it resumes from, so
TensorBoard drops what a killed run had logged beyond that checkpoint; the
steps that follow are logged once, by the resumed run. Only the primary
process writes, into a folder it creates itself and refuses if it is a
symbolic link (:func:`switchnorm.train.files.make_dir`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from switchnorm.train import files

FLUSH_SECONDS = 10  # the longest a live view lags behind within an epoch


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
    """One run's TensorBoard writer, from the step a run (re)starts at to its end.

    Args:
      folder: ``RUN/tensorboard``; created here, refused if it is a symbolic link.
      start_step: the step the run starts from (0, or its checkpoint's on
        resume); events a killed run wrote after it are purged.
    """

    def __init__(self, folder: Path, start_step: int):
        from tensorboardX import SummaryWriter

        files.make_dir(folder)
        self._writer: Any = SummaryWriter(
            str(folder),
            purge_step=start_step + 1,
            flush_secs=FLUSH_SECONDS,
            filename_suffix=f".{os.getpid()}.{secrets.token_hex(4)}",
        )

    def log_step(self, step: int, loss: float, accuracy: float) -> None:
        self._writer.add_scalar("train/batch_loss", loss, step)
        self._writer.add_scalar("train/batch_accuracy", accuracy, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Writes an epoch's record and flushes, so a live view shows each epoch as it ends."""
        for tag, value in epoch_scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the file; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
