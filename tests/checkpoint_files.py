"""Helpers for the command's tests: a finished run shared by every module, snapshots, checkpoints.

``final_arrays`` reads a run's last checkpoint with orbax directly rather than
``RunDir.restore_checkpoint``, so the comparison does not go through the code
under test.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from switchnorm.train.rundir import RunDir

TINY = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--eval-every", "1", "--quiet"]
_FINISHED: dict[str, Path] = {}


def finished_run(tmp_path_factory) -> Path:
    """A finished two-epoch run on the synthetic set, trained once per test session."""
    from switchnorm.train.cli import main

    if "tiny" not in _FINISHED:
        out = tmp_path_factory.mktemp("runs") / "tiny"
        assert main(["train", *TINY, "--out", str(out)]) == 0
        _FINISHED["tiny"] = out
    return _FINISHED["tiny"]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root``: files by (mtime, SHA-256), links by their target, folders by name."""
    found = {}
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        if p.is_symlink():
            found[name] = (0, "link to " + os.readlink(p))
        elif p.is_file():
            found[name] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            found[name] = (0, "folder")
    return found


def final_arrays(out: Path, expected_step: int) -> dict[str, np.ndarray]:
    """The arrays of the newest complete checkpoint of ``out``, which must be at ``expected_step``."""
    import orbax.checkpoint as ocp

    step = RunDir(out).latest_step()
    assert step == expected_step
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((out / "checkpoints" / str(step) / "state").absolute())
