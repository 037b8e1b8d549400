"""A real SIGKILL in the middle of a checkpoint write: --resume uses the previous one.

``switchnorm train`` runs in a subprocess through a small wrapper that kills
its own process with SIGKILL at an exact point of a chosen checkpoint's write:

* ``finalize:<step>``: orbax has written every file of the checkpoint into its
  temporary directory, but has not renamed it into place;
* ``manifest:<step>``: the checkpoint directory is in place, its manifest
  (sizes and checksums) is not yet written.

After each kill the latest complete checkpoint is the previous one, and the
resumed run ends bitwise equal to a run never stopped.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from checkpoint_files import final_arrays

from switchnorm.train import rundir

ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--eval-every",
    "1",
    "--quiet",
]
STEPS_PER_EPOCH = 512 // 64

KILLER = """
import os, signal, sys
where, step = os.environ["SWITCHNORM_KILL_AT"].split(":")
if where == "finalize":
    from orbax.checkpoint._src.path import atomicity
    original = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if self._final_path.name == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
else:
    from switchnorm.train import rundir
    original = rundir._atomic_write
    def atomic_write(target, text):
        if target.parent.name == rundir.MANIFESTS and target.name == step + ".json":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(target, text)
    rundir._atomic_write = atomic_write
from switchnorm.train.cli import main

pytestmark = pytest.mark.slow  # subprocesses: training runs, several devices or processes
sys.exit(main(sys.argv[1:]))
"""


def train(out: Path, *extra: str, kill_at: str | None = None) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "switchnorm"]
    if kill_at:
        env["SWITCHNORM_KILL_AT"] = kill_at
        command = [sys.executable, "-c", KILLER]
    done = subprocess.run(
        [*command, *ARGS, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300
    )
    if kill_at is None:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def test_sigkill_during_checkpoint_write_resumes_from_previous_and_ends_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(reference)

    # Killed with the epoch-2 checkpoint fully written but not yet renamed.
    assert train(killed, kill_at=f"finalize:{2 * STEPS_PER_EPOCH}") == -9
    assert any(".orbax-checkpoint-tmp" in p.name for p in (killed / "checkpoints").iterdir())
    assert rundir.latest_step(killed) == STEPS_PER_EPOCH

    # Resumed, and killed again with the epoch-3 checkpoint in place but no manifest.
    assert train(killed, "--resume", kill_at=f"manifest:{3 * STEPS_PER_EPOCH}") == -9
    assert (killed / "checkpoints" / str(3 * STEPS_PER_EPOCH)).is_dir()
    assert rundir.latest_step(killed) == 2 * STEPS_PER_EPOCH

    train(killed, "--resume")
    last_step = 3 * STEPS_PER_EPOCH
    expected, got = final_arrays(reference, last_step), final_arrays(killed, last_step)
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert np.array_equal(expected[name], got[name]), name
    assert (killed / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
