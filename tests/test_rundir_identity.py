"""A run directory has an identity: paths are compared by what they name, and a writer holds the
directory it opened.

``collapse`` compares its source and ``--out`` by device and inode along the resolved paths, so
no spelling (``R/../R``, a link to a parent, ``R/sub``) lets it write into or over its source. A
``train`` whose run directory is deleted, moved or replaced while it runs stops with one line at
its next write and writes nothing into whatever the path names now.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_files import TINY, snapshot

from switchnorm.train import data
from switchnorm.train.cli import main
from switchnorm.train.config import TrainConfig
from switchnorm.train.files import lock_holder as holder
from switchnorm.train.rundir import RunDir, RunError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchnorm: error: "), err
    return err


# -- collapse: the source and --out compared by what they are -----------------------------------------


def _via_link_to_parent(ws: Path) -> Path:
    (ws / "here").symlink_to(ws)
    return ws / "here" / "tiny"


OUTS = {  # (--out, the words of the refusal)
    "the run, through ..": (lambda ws: ws / "tiny" / ".." / "tiny", "is the run itself"),
    "the run, through a link to its parent": (_via_link_to_parent, "is the run itself"),
    "the run, with a trailing dot": (lambda ws: ws / "tiny" / ".", "is the run itself"),
    "a new folder inside the run": (lambda ws: ws / "tiny" / "sub", "lies inside the run"),
    "a new folder inside its checkpoints": (lambda ws: ws / "tiny" / "checkpoints" / "new", "lies inside"),
    "the folder holding the run": (lambda ws: ws, "holds the run"),
}


@pytest.mark.parametrize("case", list(OUTS))
def test_collapse_refuses_an_out_that_is_its_source_lies_inside_it_or_holds_it(case, workspace, capsys):
    spelling, words = OUTS[case]
    out = spelling(workspace)
    before = snapshot(workspace)
    assert main(["collapse", str(workspace / "tiny"), "--out", str(out), "--overwrite"]) == 2
    err = one_error_line(capsys)
    assert words in err and "name a new directory outside it" in err, err
    assert snapshot(workspace) == before


def test_collapse_takes_an_out_whose_name_merely_starts_like_the_source(workspace, capsys):
    assert main(["collapse", str(workspace / "tiny"), "--out", str(workspace / "tiny-collapsed")]) == 2
    assert "train with --norm ssn" in one_error_line(capsys)  # past the identity check: sn never chose


# -- train: a writer whose directory goes away ---------------------------------------------------------


def _replace_during_epoch_2(monkeypatch, replace) -> None:
    """Calls ``replace()`` when the training loop starts its second epoch."""
    original = data.train_batches

    def batches(x, y, batch_size, seed, epoch):
        if epoch == 1:
            replace()
        yield from original(x, y, batch_size, seed, epoch)

    monkeypatch.setattr(data, "train_batches", batches)


REPLACEMENTS = ["deleted, another run put there", "moved away, another run put there", "deleted"]


@pytest.mark.parametrize("how", REPLACEMENTS)
def test_a_writer_whose_directory_is_replaced_stops_and_writes_nothing_more(
    how, run, tmp_path, monkeypatch, capsys
):
    out, moved = tmp_path / "x", tmp_path / "x.old"
    seen = {}

    def replace():
        if how.startswith("moved"):
            os.rename(out, moved)
            seen["moved"] = snapshot(moved)
        else:
            shutil.rmtree(out)
        if how.endswith("put there"):
            shutil.copytree(run, out, symlinks=True)
        seen["new"] = snapshot(out) if out.exists() else None

    _replace_during_epoch_2(monkeypatch, replace)
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert "is no longer the run directory this command opened" in one_error_line(capsys)
    if seen["new"] is None:
        assert not out.exists()  # not made again
    else:
        assert snapshot(out) == seen["new"]  # the run now at x is untouched
    if how.startswith("moved"):  # its own directory: nothing after the move but the open event file
        after = snapshot(moved)
        assert {k: v for k, v in after.items() if not k.startswith("tensorboard/")} == {
            k: v for k, v in seen["moved"].items() if not k.startswith("tensorboard/")
        }


LONG = ["--dataset", "synthetic", "--epochs", "6", "--batch-size", "32", "--eval-every", "2", "--quiet"]


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "switchnorm", "train", *LONG, "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.slow
def test_a_run_started_where_a_running_one_was_deleted_is_never_written_by_the_old_one(tmp_path):
    out = tmp_path / "x"
    old = _launch(out)
    deadline = time.monotonic() + 120
    while holder(out) != old.pid or RunDir(out).latest_step() is None:
        assert old.poll() is None and time.monotonic() < deadline, old.stderr.read()
        time.sleep(0.05)
    os.kill(old.pid, signal.SIGSTOP)  # paused with its next epoch to write
    shutil.rmtree(out)
    new = _launch(out, "--seed", "1")
    _, err = new.communicate(timeout=300)
    assert new.returncode == 0, err
    finished = snapshot(out)
    os.kill(old.pid, signal.SIGCONT)
    _, err = old.communicate(timeout=300)
    assert old.returncode == 2 and err.count("\n") == 1, err
    assert "is no longer the run directory this command opened" in err
    assert snapshot(out) == finished  # the new run's metrics, checkpoints and summary untouched
    assert json.loads((out / "config.json").read_text())["seed"] == 1


# -- the library's own refusals -------------------------------------------------------------------------


def test_create_with_overwrite_refuses_a_folder_without_the_marker_and_changes_nothing(tmp_path):
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "model.py").write_text("print('my work')")
    (mine / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    config = TrainConfig.for_dataset("synthetic")
    with pytest.raises(RunError, match="no .switchnorm-run marker"), RunDir(mine) as target:
        target.create(config, overwrite=True)
    assert snapshot(tmp_path) == before
    with pytest.raises(RunError, match="is not a run directory"), RunDir(mine / "src") as target:
        target.create(config)
    assert snapshot(tmp_path) == before


def test_an_out_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path, capsys):
    out = os.fsdecode(bytes(tmp_path) + b"/run\xff")
    assert main(["train", *TINY, "--out", out]) == 2
    assert "is not valid UTF-8" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []
