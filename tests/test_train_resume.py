"""Kill-and-resume: a run SIGKILLed at any point and resumed ends bitwise equal to one never stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from checkpoint_files import final_arrays

from switchnorm.train.rundir import RunDir

pytestmark = pytest.mark.slow  # subprocesses: training runs, several devices or processes

ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--epochs",
    "8",
    "--batch-size",
    "32",
    "--eval-every",
    "2",
    "--quiet",
]
STEPS_PER_EPOCH = 512 // 32


def launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "switchnorm", *ARGS, "--out", str(out), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILLs ``process`` as soon as ``ready()`` holds; it must still be running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    assert process.poll() is None, "finished before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()  # waits, and closes the pipe
    assert process.returncode == -signal.SIGKILL


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def test_sigkilled_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = launch(reference)

    # Kill 1: before the first checkpoint (while compiling); resume starts over.
    kill_when(launch(killed), lambda: (killed / "config.json").exists())
    assert RunDir(killed).latest_step() is None

    # Kill 2: in the middle, after the checkpoint of epoch 3. Also leave behind
    # what a kill during a checkpoint write and during a metrics write leave:
    # an orbax temporary directory and a half-written line.
    second = launch(killed, "--resume")
    kill_when(second, lambda: (RunDir(killed).latest_step() or 0) >= 3 * STEPS_PER_EPOCH)
    partial = killed / "checkpoints" / "999.orbax-checkpoint-tmp-1"
    partial.mkdir()
    (partial / "junk").write_bytes(b"\0" * 10)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 9, "step": 1')
    assert RunDir(killed).latest_step() < 8 * STEPS_PER_EPOCH

    finish(launch(killed, "--resume"))
    finish(uninterrupted)

    # Bitwise: every parameter, running average and optimizer state ...
    last_step = 8 * STEPS_PER_EPOCH
    expected, got = final_arrays(reference, last_step), final_arrays(killed, last_step)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert expected[name].dtype == got[name].dtype, name
        assert np.array_equal(expected[name], got[name]), name
    # ... and every logged loss, accuracy and mixing weight.
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert len(RunDir(reference).read_metrics()[0]) == 8
