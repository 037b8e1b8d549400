"""Fault injection on a run directory: concurrent writers, symlinks, partial lines, a full disk, divergence.

Each test plants what a mistake, a crash or a hostile file leaves, runs the
command, and checks what it did: refused with one line (exit 2), stopped as
diverged (exit 3), or carried on with the run directory intact and nothing
outside it touched.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoint_files import TINY, final_arrays, snapshot
from event_files import scalars

from switchnorm.train import checkpoints, data, files
from switchnorm.train.cli import main
from switchnorm.train.files import LockHeld
from switchnorm.train.files import lock_holder as holder
from switchnorm.train.rundir import RunDir


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchnorm: error: "), err
    return err


def _unfinish(tiny: Path) -> None:
    """Turns the finished run into one killed after epoch 1: its last checkpoint and summary gone."""
    shutil.rmtree(tiny / "checkpoints" / "16")
    (tiny / "summary.json").unlink()


# -- one writer ---------------------------------------------------------------------------------

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(workspace, capsys):
    tiny = workspace / "tiny"
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tiny / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        assert holder(tiny) == other.pid
        before = snapshot(workspace)
        for args in (
            ["train", "--out", str(tiny), "--resume"],
            ["train", *TINY, "--out", str(tiny), "--overwrite"],
            ["train", *TINY, "--seed", "5", "--out", str(tiny), "--overwrite"],
        ):
            assert main(args) == 2
            assert f"in use by process {other.pid}" in one_error_line(capsys)
        assert snapshot(workspace) == before
        assert main(["inspect", str(tiny)]) == 0  # readers take no lock, but say a writer is at work
        assert f"in progress: process {other.pid} is writing this run" in capsys.readouterr().out
    finally:
        other.kill()
        other.communicate()  # waits, and closes the pipe
    assert holder(tiny) is None  # the kernel dropped the dead holder's lock
    assert main(["train", "--out", str(tiny), "--resume"]) == 0
    assert "the run is complete" in capsys.readouterr().out


def _directory(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_the_lock_is_exclusive_between_two_opens_and_released_on_close(tmp_path):
    first_dir, second_dir = _directory(tmp_path), _directory(tmp_path)
    first = files.lock(first_dir, tmp_path)
    with pytest.raises(LockHeld, match=f"process {os.getpid()}"):
        files.lock(second_dir, tmp_path)
    os.close(first)
    os.close(files.lock(second_dir, tmp_path))
    os.close(first_dir), os.close(second_dir)


def test_a_symlinked_lock_file_is_refused_not_followed(tmp_path):
    (tmp_path / "victim").write_text("keep")
    (tmp_path / ".lock").symlink_to(tmp_path / "victim")
    directory = _directory(tmp_path)
    with pytest.raises(OSError, match="symbolic link"):
        files.lock(directory, tmp_path)
    os.close(directory)
    assert (tmp_path / "victim").read_text() == "keep"


# -- symlinks -----------------------------------------------------------------------------------


def test_planted_temporary_file_links_are_never_written_through(workspace, capsys):
    tiny, precious = workspace / "tiny", workspace / "outside" / "precious.txt"
    _unfinish(tiny)
    for name in ("metrics.jsonl.tmp", "summary.json.tmp", "config.json.tmp", ".metrics.jsonl.tmp"):
        (tiny / name).symlink_to(precious)
    assert main(["train", "--out", str(tiny), "--resume"]) == 0
    assert precious.read_text() == "not switchnorm's"
    assert [r["epoch"] for r in RunDir(tiny).read_metrics()[0]] == [1, 2]
    assert not (tiny / "summary.json").is_symlink()


def test_plot_refuses_a_figure_that_is_a_link(workspace, capsys):
    tiny, precious = workspace / "tiny", workspace / "outside" / "precious.txt"
    (tiny / "final_weights.png").unlink()
    (tiny / "final_weights.png").symlink_to(precious)
    assert main(["plot", str(tiny)]) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert precious.read_text() == "not switchnorm's"


def _locked_run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.open()
    return run


def test_checkpoint_cleanup_deletes_only_switchnorms_own_checkpoints(tmp_path):
    run = _locked_run(tmp_path)
    stray = run.path / "checkpoints" / "5"
    stray.mkdir(parents=True)
    (stray / "mine.txt").write_text("keep")
    (run.path / "checkpoints" / "notes").mkdir()
    with run:
        for step in (6, 7, 8):
            run.save_checkpoint(step, {"w": np.full(3, step, np.float32)}, epoch=step)
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["5", "7", "8", "notes"]
    assert (stray / "mine.txt").read_text() == "keep"
    assert run.latest_step() == 8


def test_checkpoint_cleanup_never_deletes_through_a_linked_step_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    run = _locked_run(tmp_path)
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "1").symlink_to(victim)
    with run:
        for step in (2, 3, 4):
            run.save_checkpoint(step, {"w": np.zeros(3, np.float32)}, epoch=step)
    assert (victim / "data.txt").read_text() == "keep"
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["1", "3", "4"]


# -- partial and damaged lines ------------------------------------------------------------------


def test_a_line_cut_short_by_a_kill_is_dropped_with_a_note(workspace, capsys):
    tiny = workspace / "tiny"
    with open(tiny / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 3, "step": 2')
    records, partial = RunDir(tiny).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2] and partial
    assert main(["train", "--out", str(tiny), "--resume"]) == 0
    assert "dropped 1 metrics.jsonl line(s)" in capsys.readouterr().out
    assert RunDir(tiny).read_metrics() == (records, False)


def test_records_are_strict_json(tmp_path):
    run = _locked_run(tmp_path)
    with run:
        run.append_metrics({"epoch": 1, "step": 1, "test_loss": float("nan")})
    assert json.loads((run.path / "metrics.jsonl").read_text())["test_loss"] is None


# -- full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (as root), else None: the test then injects ENOSPC in-process."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    yield disk if done.returncode == 0 else None
    if done.returncode == 0:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fills ``disk`` but for about ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# After a failed write, tensorstore's threads still call into orbax's closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("leave", [0, 16 * 1024], ids=["metrics write fails", "checkpoint write fails"])
def test_a_full_disk_stops_with_one_line_and_the_earlier_checkpoint_resumes_bitwise(
    leave, small_disk, tmp_path, run, monkeypatch, capsys
):
    if small_disk is None:
        pytest.skip("no tmpfs mount here (needs root)")
    out = small_disk / "run"
    original = RunDir.save_checkpoint
    fillers = []

    def save_then_fill(self, step, state, epoch):
        original(self, step, state, epoch)
        if step == 8 and not fillers:
            fillers.append(_fill(small_disk, leave))

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_fill)
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert RunDir(out).latest_step() == 8
    checkpoints.restore(out / "checkpoints", 8, final_arrays(out, 8))  # every array matches its SHA-256
    if leave == 0:
        return  # one resume below is enough: the failed checkpoint write is the harder case
    fillers[0].unlink()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    expected, got = final_arrays(run, 16), final_arrays(out, 16)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_enospc_while_writing_a_file_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from switchnorm.train import files

    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_all", full)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# -- divergence ---------------------------------------------------------------------------------


def test_a_huge_learning_rate_is_a_divergence_not_a_success(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e30", "--out", str(out)]) == 3
    err = one_error_line(capsys)
    assert "training diverged at step" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "test_accuracy" not in summary
    assert main(["inspect", str(out)]) == 0
    assert "DIVERGED at step" in capsys.readouterr().out


def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    original = data.train_batches

    def poisoned(x, y, batch_size, seed, epoch):
        for xb, yb in original(x, y, batch_size, seed, epoch):
            if epoch == 1:
                xb = xb.copy()
                xb[0, 0] = np.nan
            yield xb, yb

    monkeypatch.setattr(data, "train_batches", poisoned)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 3
    assert "training diverged at step 9: the training loss is nan" in one_error_line(capsys)
    assert RunDir(out).latest_step() == 8
    assert [r["epoch"] for r in RunDir(out).read_metrics()[0]] == [1]
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "DIVERGED at step 9" in shown and "checkpoint at epoch 1/2" in shown
    assert "nan" not in shown.split("test accuracy")[1]  # the table is the last good one
    events = scalars(out / "tensorboard")  # closed whole, and only the finite steps
    assert [step for step, _ in events["train/batch_loss"]] == list(range(1, 9))
    assert [step for step, _ in events["train/loss"]] == [8]


def test_non_finite_running_averages_are_a_non_finite_state():
    import jax.numpy as jnp

    from switchnorm.train.loop import TrainState
    from switchnorm.train.report import nonfinite_part

    state = TrainState(jnp.int32(3), {"w": jnp.ones(2)}, {"mean": jnp.ones(2)}, ())
    assert nonfinite_part(state) is None
    poisoned = state._replace(rest={"mean": jnp.array([1.0, jnp.nan])})
    assert nonfinite_part(poisoned) == "running averages"
    assert nonfinite_part(state._replace(params={"w": jnp.array([jnp.inf, 0.0])})) == "parameters"


def test_a_diverged_epoch_writes_neither_record_nor_checkpoint(tmp_path):
    import jax.numpy as jnp

    from switchnorm.train.loop import TrainState
    from switchnorm.train.report import Diverged, Reporter

    run = _locked_run(tmp_path)
    state = TrainState(jnp.int32(8), {"w": jnp.ones(2)}, {"mean": jnp.array([jnp.nan, 0.0])}, ())
    with run, pytest.raises(Diverged, match="step 8: the running averages"):
        Reporter(run, quiet=True).on_epoch_end(None, state, {"epoch": 1, "step": 8})
    assert sorted(p.name for p in run.path.iterdir()) == [".lock"]


# -- real concurrent commands -------------------------------------------------------------------


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "switchnorm", "train", "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_until_it_holds(process: subprocess.Popen, out: Path, *, with_checkpoint: bool = False) -> None:
    """Waits until ``process`` holds the run's lock (and, if asked, has saved a checkpoint)."""
    deadline = time.monotonic() + 120
    while holder(out) != process.pid or (with_checkpoint and RunDir(out).latest_step() is None):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)


@pytest.mark.slow
def test_concurrent_commands_on_one_run_directory_never_interleave(tmp_path):
    # The holder is paused (SIGSTOP) while the others start, so each of them meets the
    # held lock however slowly it starts: on a loaded machine a holder left running
    # could finish first and the refusal would go untested.
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--epochs", "6", "--batch-size", "32", "--eval-every", "2", "--quiet"]
    first = _launch(out, *args)
    _wait_until_it_holds(first, out, with_checkpoint=True)
    os.kill(first.pid, signal.SIGSTOP)
    in_use = f"in use by process {first.pid}"
    others = [
        (_launch(out, *args, "--seed", "1"), "already holds a run"),
        (_launch(out, *args, "--seed", "1", "--overwrite"), in_use),
        (_launch(out, "--resume"), in_use),
    ]
    for other, message in others:
        _, err = other.communicate(timeout=120)
        assert other.returncode == 2 and message in err, err
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()  # waits, and closes the pipe
    # two resumes, one after the other took the lock: the later one is refused, the
    # first finishes the run; the records stay in order
    resumed = _launch(out, "--resume")
    _wait_until_it_holds(resumed, out)
    os.kill(resumed.pid, signal.SIGSTOP)
    refused = _launch(out, "--resume")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2 and f"in use by process {resumed.pid}" in err, err
    os.kill(resumed.pid, signal.SIGCONT)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    records, partial = RunDir(out).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6] and not partial
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 6


def test_a_failed_write_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    from switchnorm.train import files

    original = files.append_line

    def full(target, line):  # os.write's ENOSPC carries no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "append_line", full)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert f"cannot write {out / 'metrics.jsonl'}: No space left on device" in one_error_line(capsys)
    monkeypatch.setattr(files, "append_line", original)


def test_inspect_reads_the_newest_checkpoint_when_the_writer_deletes_the_one_it_chose(workspace, capsys):
    from switchnorm.train import checkpoints

    tiny = workspace / "tiny"
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tiny / ".lock")], stdout=subprocess.PIPE, text=True
    )
    original = checkpoints.restore
    calls = []

    def racing(root, step, template):
        calls.append(step)
        if len(calls) == 1:  # the writer saves step 24 and deletes 16, the one inspect chose
            shutil.copytree(root / "16", root / "24")
            meta = root / "24" / "meta" / "metadata"
            meta.write_text(meta.read_text().replace('"step": 16', '"step": 24'))
            shutil.rmtree(root / "16")
            raise ValueError("is damaged (unreadable, truncated or altered): NOT_FOUND")
        return original(root, step, template)

    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(checkpoints, "restore", racing)
            assert main(["inspect", str(tiny)]) == 0
    finally:
        other.kill()
        other.communicate()
    assert calls == [16, 24]
    assert "(step 24)" in capsys.readouterr().out
