"""A run's TensorBoard event files (``RUN/tensorboard/``) show what ``metrics.jsonl`` records.

The files are read back independently of the writer (``event_files``: TFRecord
framing and CRCs checked, purges replayed as TensorBoard does) and held
against ``metrics.jsonl``: every epoch's train loss and accuracy, learning
rate, test loss and accuracy and every layer's mixing weights at the epoch's
last step, and every step's batch loss and accuracy, each exactly once, also
after a resume. The runs are the shared two-epoch synthetic run and copies of it.
"""

import errno
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from checkpoint_files import finished_run
from event_files import event_files, scalars

from switchnorm.train.cli import main
from switchnorm.train.report import Reporter
from switchnorm.train.rundir import RunDir, RunError

EPOCH_TAGS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "learning_rate": "train/learning_rate",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
}
STEP_TAGS = ("train/batch_loss", "train/batch_accuracy")


@pytest.fixture
def run(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory)


def expected_epoch_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should show for each epoch record, stored as float32 as TensorBoard does."""
    expected: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value: float) -> None:
        expected.setdefault(tag, []).append((step, float(np.float32(value))))

    for record in records:
        for key, tag in EPOCH_TAGS.items():
            if key in record:
                add(tag, record["step"], record[key])
        for layer, kinds in record["weights"].items():
            for kind, weights in kinds.items():
                for normalizer, weight in weights.items():
                    add(f"mixing/{layer}/{kind}/{normalizer}", record["step"], weight)
    return expected


def assert_events_match_metrics(out: Path) -> None:
    records, _ = RunDir(out).read_metrics()
    shown = scalars(out / "tensorboard")
    expected = expected_epoch_scalars(records)
    assert any(tag.startswith("mixing/") for tag in expected)  # sn: there are weights to show
    assert set(shown) == set(expected) | set(STEP_TAGS)
    for tag, points in expected.items():
        assert shown[tag] == points, tag
    last = records[-1]["step"]
    for tag in STEP_TAGS:
        assert [step for step, _ in shown[tag]] == list(range(1, last + 1)), tag  # each step once
    batch_losses = dict(shown["train/batch_loss"])
    first = 1
    for record in records:  # an epoch's train_loss is the mean of its batches' losses
        epoch = [batch_losses[s] for s in range(first, record["step"] + 1)]
        np.testing.assert_allclose(np.mean(epoch), record["train_loss"], rtol=1e-6)
        first = record["step"] + 1


def test_the_event_files_show_every_metrics_record_and_every_step(run):
    assert len(event_files(run / "tensorboard")) == 1
    assert_events_match_metrics(run)


def test_a_resumed_run_purges_what_followed_its_checkpoint_and_logs_each_step_once(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # What a kill after epoch 1's checkpoint leaves: epoch 2 already logged, its checkpoint gone.
    shutil.rmtree(copy / "checkpoints" / "16")
    (copy / "summary.json").unlink()
    assert main(["train", "--out", str(copy), "--resume", "--quiet"]) == 0
    assert len(event_files(copy / "tensorboard")) == 2  # the first file untouched, a new one appended
    assert_events_match_metrics(copy)
    assert scalars(copy / "tensorboard") == scalars(run / "tensorboard")  # as if never stopped


def test_closing_the_reporter_flushes_the_steps_logged_since_the_last_epoch(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with run:
        run.open()
        reporter = Reporter(run, quiet=True)
        reporter.on_train_begin(SimpleNamespace(total_steps=8), SimpleNamespace(step=4), 0)
        for step in (5, 6, 7):
            reporter.on_step(None, step, 0.5, 0.25)
        reporter.close()  # what an interrupt or a divergence ends in
        reporter.close()
    shown = scalars(run.path / "tensorboard")
    assert shown == {
        "train/batch_loss": [(5, 0.5), (6, 0.5), (7, 0.5)],
        "train/batch_accuracy": [(5, 0.25), (6, 0.25), (7, 0.25)],
    }


def test_only_the_primary_process_writes_events(tmp_path):
    run = RunDir(tmp_path / "run", primary=False)
    reporter = Reporter(run, quiet=True, primary=False)
    reporter.on_train_begin(SimpleNamespace(total_steps=8), SimpleNamespace(step=0), 0)
    reporter.on_step(None, 1, 0.5, 0.25)
    reporter.close()
    assert not run.path.exists()


def test_overwrite_deletes_the_event_files_with_the_run(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    with RunDir(copy) as target:
        target.create(target.read_config(), overwrite=True)
    assert not (copy / "tensorboard").exists()


def test_a_symlinked_tensorboard_folder_is_refused_and_nothing_is_written_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "tensorboard").symlink_to(outside)
    with run, pytest.raises(RunError, match="symbolic link"):
        run.open()
        Reporter(run, quiet=True).on_train_begin(SimpleNamespace(total_steps=8), SimpleNamespace(step=0), 0)
    assert list(outside.iterdir()) == []


def _reporter_whose_event_file_cannot_be_written(tmp_path, monkeypatch) -> Reporter:
    from tensorboardX import record_writer

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", "events")

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.open()
    reporter = Reporter(run, quiet=True)
    reporter.on_train_begin(SimpleNamespace(total_steps=8), SimpleNamespace(step=0), 0)
    reporter.on_step(None, 1, 0.5, 0.25)
    monkeypatch.setattr(record_writer.RecordWriter, "flush", full)
    return reporter


def test_a_failed_event_write_is_raised_when_nothing_else_went_wrong(tmp_path, monkeypatch):
    reporter = _reporter_whose_event_file_cannot_be_written(tmp_path, monkeypatch)
    with pytest.raises(OSError, match="No space"):
        reporter.close()


def test_a_failed_event_write_does_not_hide_the_error_that_ends_the_run(tmp_path, monkeypatch):
    reporter = _reporter_whose_event_file_cannot_be_written(tmp_path, monkeypatch)
    with pytest.raises(RunError, match="the first error"):
        try:
            raise RunError("the first error")
        finally:
            reporter.close()
