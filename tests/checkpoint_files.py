"""Reading a run's last checkpoint straight from disk, for the resume tests.

Uses orbax directly rather than ``switchnorm.train.rundir.restore_checkpoint``,
so the comparison does not go through the code under test.
"""

from pathlib import Path

import numpy as np

from switchnorm.train import rundir


def final_arrays(out: Path, expected_step: int) -> dict[str, np.ndarray]:
    """The arrays of the newest complete checkpoint of ``out``, which must be at ``expected_step``."""
    import orbax.checkpoint as ocp

    step = rundir.latest_step(out)
    assert step == expected_step
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore((out / "checkpoints" / str(step) / "state").absolute())
