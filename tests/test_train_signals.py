"""Ctrl-C ends ``switchnorm train`` with exit 130 and one line, whatever it is doing.

A wrapper sends the process SIGINT at an exact point: while a module is being imported, while
the first step compiles, inside orbax's checkpoint write (its threads at work), twice in a row,
and before the run directory exists. Each time: status 130, stderr exactly the one line, no
traceback, no segfault; and a run cut inside its checkpoint's commit, resumed, ends as the
shared two-epoch run (checkpoint_files.TINY, the same flags) never stopped.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_files import TINY, final_arrays

pytestmark = pytest.mark.slow  # subprocesses: training runs

ARGS = ["train", *TINY]
INTERRUPTED = "switchnorm: interrupted; continue with --resume\n"

WRAPPER = """
import importlib.abc, os, signal, sys, threading, time
where = os.environ["SWITCHNORM_INTERRUPT_AT"]
interrupt = lambda: os.kill(os.getpid(), signal.SIGINT)
if where == "import":  # the first import of tensorboardX, when the training loop starts
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorboardX":
                interrupt()
            return None
    sys.meta_path.insert(0, Finder())
from switchnorm.train import checkpoints, data, loop
if where == "data":  # while the data loads, before the run directory is made
    original_load = data.load_dataset
    def load_dataset(*args):
        interrupt(); time.sleep(1)
        return original_load(*args)
    data.load_dataset = load_dataset
if where == "compile":  # from another thread, while the main one traces and compiles the step
    original_step = loop.Trainer.train_step
    def train_step(self, state, x, y):
        if not hasattr(self, "interrupted"):
            self.interrupted = threading.Timer(0.2, interrupt)
            self.interrupted.start()
        return original_step(self, state, x, y)
    loop.Trainer.train_step = train_step
if where == "checkpoint":  # in orbax's commit of the second checkpoint
    from orbax.checkpoint._src.path import atomicity
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        if self._final_path.name == "16":
            interrupt()
            time.sleep(1)
        return await original_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
if where == "twice":  # two Ctrl-C in a row, as the first epoch's checkpoint begins
    original_save = checkpoints.save
    def save(manager, step, state, epoch):
        interrupt(); interrupt()
        return original_save(manager, step, state, epoch)
    checkpoints.save = save
from switchnorm.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train(out: Path, *extra: str, interrupt_at: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WRAPPER] if interrupt_at else [sys.executable, "-m", "switchnorm"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SWITCHNORM_INTERRUPT_AT": interrupt_at or "none"}
    return subprocess.run(
        [*command, *ARGS, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("where", ["import", "compile", "checkpoint", "twice"])
def test_sigint_exits_130_with_one_line(where, run, tmp_path):
    out = tmp_path / "run"
    done = train(out, interrupt_at=where)
    assert (done.returncode, done.stderr) == (130, INTERRUPTED), done.stderr[-3000:]
    if where != "checkpoint":
        return
    resumed = train(out, "--resume")  # cut inside orbax's commit: the run still ends as the reference
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    expected, got = final_arrays(run, 16), final_arrays(out, 16)
    assert all((expected[k] == got[k]).all() for k in expected)


def test_sigint_before_the_run_directory_exists_does_not_point_to_resume(tmp_path):
    done = train(tmp_path / "run", interrupt_at="data")
    assert (done.returncode, done.stderr) == (130, "switchnorm: interrupted\n"), done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


IMPORT_WRAPPER = """
import importlib.abc, os, signal, sys
class Finder(importlib.abc.MetaPathFinder):  # SIGINT at the first import of jax, inside the package's
    def find_spec(self, name, path=None, target=None):
        if name == "jax":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Finder())
import switchnorm_command
sys.exit(switchnorm_command.main(sys.argv[1:]))
"""


def test_sigint_while_the_command_imports_the_package_exits_130_with_one_line(tmp_path):
    # The console script's entry (switchnorm_command) answers before switchnorm, jax and flax load.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", IMPORT_WRAPPER, *ARGS, "--out", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (130, "switchnorm: interrupted\n"), done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_enters_through_switchnorm_command():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["switchnorm"] == "switchnorm_command:main"
