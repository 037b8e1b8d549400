"""A real SIGKILL at each point of an epoch's writes: --resume carries on and ends bitwise identical.

``switchnorm train`` runs in a subprocess through a small wrapper that kills
its own process with SIGKILL at an exact point of the writes of a chosen step:

* ``metrics:<step>``: the epoch's metrics line is written, its checkpoint not begun;
* ``begin:<step>``: the checkpoint's save is about to begin;
* ``finalize:<step>``: orbax has written every file of the checkpoint into its
  temporary directory, but has not renamed it into place;
* ``committed:<step>``: orbax has committed the checkpoint; the clean-up of old ones not begun;
* ``cleanup:<step>``: the newest checkpoint is complete; the clean-up has renamed the old
  checkpoint ``<step>`` out of the way and is about to delete it;
* ``temporary:<step>``: a temporary file of the summary is written, not yet renamed.

After each kill the run directory's lock is free (the kernel dropped it), the
latest complete checkpoint is the one expected, and the run, resumed after
every kill, ends bitwise equal to a run never stopped, with nothing a kill left behind.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint_files import final_arrays

from switchnorm.train.files import lock_holder as holder
from switchnorm.train.rundir import RunDir

pytestmark = pytest.mark.slow  # subprocesses: training runs

EPOCHS = 5
ARGS = ["train", "--dataset", "synthetic", "--epochs", str(EPOCHS), "--batch-size", "64", "--eval-every", "1"]
STEPS_PER_EPOCH = 512 // 64

KILLER = """
import os, signal, sys
from switchnorm.train import checkpoints, files, rundir
where, step = os.environ["SWITCHNORM_KILL_AT"].split(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "finalize":
    from orbax.checkpoint._src.path import atomicity
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if self._final_path.name == step:
            die()
        return await original_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
original_append, original_save, original_write = files.append_line, checkpoints.save, files.atomic_write
def append_line(target, line):
    original_append(target, line)
    if where == "metrics" and f'"step": {step},' in line:
        die()
def save(manager, at, state, epoch):
    if where == "begin" and str(at) == step:
        die()
    original_save(manager, at, state, epoch)
    if where == "committed" and str(at) == step:
        die()
def atomic_write(target, data):
    if where == "temporary" and target.name == rundir.SUMMARY:
        with open(target.with_name(f".{target.name}.{os.getpid()}.0123abcd.tmp"), "w") as file:
            file.write("half")
        die()
    original_write(target, data)
files.append_line, checkpoints.save, files.atomic_write = append_line, save, atomic_write
original_delete = rundir.RunDir._delete
def delete(entry):
    if where == "cleanup" and entry.name.split(".")[0] == step and entry.parent.name == rundir.CHECKPOINTS:
        die()
    return original_delete(entry)
rundir.RunDir._delete = staticmethod(delete)
from switchnorm.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train(out: Path, *extra: str, kill_at: str | None = None) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SWITCHNORM_KILL_AT": kill_at or "none:0"}
    command = [sys.executable, "-c", KILLER] if kill_at else [sys.executable, "-m", "switchnorm"]
    done = subprocess.run(
        [*command, *ARGS, "--quiet", "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if kill_at is None:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def test_sigkill_at_every_write_point_resumes_and_ends_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(reference)
    run = RunDir(killed)
    kills = [  # (where the run dies, the latest complete checkpoint it leaves, the --resume it needs)
        ("metrics:8", None, ()),
        ("begin:16", 8, ("--resume",)),
        ("finalize:24", 16, ("--resume",)),
        ("committed:32", 32, ("--resume",)),
        ("cleanup:24", 40, ("--resume",)),
    ]
    for kill_at, latest, extra in kills:
        assert train(killed, *extra, kill_at=kill_at) == -9, kill_at
        assert holder(killed) is None, kill_at
        assert run.latest_step() == latest, kill_at
        if kill_at.startswith("finalize"):  # orbax's temporary directory is left behind
            assert (killed / "checkpoints" / "24.orbax-checkpoint-tmp").is_dir()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "24.switchnorm-deleting",
        "32",
        "40",
    ]
    assert train(killed, "--resume", kill_at="temporary:0") == -9  # the complete run's summary
    assert any(p.name.endswith(".tmp") for p in killed.iterdir())
    train(killed, "--resume")

    last_step = EPOCHS * STEPS_PER_EPOCH
    expected, got = final_arrays(reference, last_step), final_arrays(killed, last_step)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["32", "40"]
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
