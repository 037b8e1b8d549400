"""The `switchnorm` command: run directory contents, inspect, plot, and every bad input.

Every bad input must end with exit status 2, one line on stderr, and no file
changed; the tests snapshot the run directory (bytes and mtimes) around each.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from switchnorm.train import rundir
from switchnorm.train.cli import main

TINY = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--eval-every", "1", "--quiet"]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-epoch run on the synthetic set."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def workspace(run, tmp_path) -> Path:
    """A scratch directory holding a copy of the finished run, as `tiny`."""
    shutil.copytree(run, tmp_path / "tiny")
    return tmp_path


def test_run_directory_holds_config_metrics_checkpoints_and_figures(run):
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "synthetic" and config["norm"] == "sn" and config["epochs"] == 2
    records = rundir.read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [8, 16]  # 512 examples // 64
    for record in records:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy"} <= set(record)
        assert set(record["weights"]) == {"norms/0", "norms/1"}
        for layer in record["weights"].values():
            for kind in ("mean", "var"):
                assert list(layer[kind]) == ["bn", "ln"]
                assert sum(layer[kind].values()) == pytest.approx(1.0)
    for name in ("weights_over_training.png", "final_weights.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]


def test_checkpoint_holds_the_final_state_and_its_epoch(run):
    from switchnorm.train.cli import _restore_model

    assert rundir.latest_step(run) == 16
    config, model, step, epoch = _restore_model(run)
    assert (step, epoch) == (16, 2)
    import switchnorm

    # The weights restored from the checkpoint are the ones the last record logged.
    restored = switchnorm.mixing_weights(model)
    logged = rundir.read_metrics(run)[-1]["weights"]
    for layer in logged:
        for kind in ("mean", "var"):
            for name, w in logged[layer][kind].items():
                assert restored[layer][kind][name] == pytest.approx(w, abs=1e-7)


def test_inspect_prints_accuracy_and_the_weights_table(run, capsys):
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "norms/0" in out and "*" in out


def test_plot_writes_the_figures_again(workspace, capsys):
    for name in ("weights_over_training.png", "final_weights.png"):
        (workspace / "tiny" / name).unlink()
    assert main(["plot", str(workspace / "tiny")]) == 0
    assert (workspace / "tiny" / "final_weights.png").exists()
    assert (workspace / "tiny" / "weights_over_training.png").exists()


def _damage_latest_checkpoint(run: Path, how: str) -> None:
    step_dir = run / "checkpoints" / str(rundir.latest_step(run))
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncated":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        size = biggest.stat().st_size
        biggest.write_bytes((b"\0garbage" * size)[:size])  # same size, other bytes


BAD_TRAIN = {
    "unknown dataset": (["--dataset", "cifar"], "unknown dataset"),
    "unknown model": (["--model", "vgg"], "unknown model"),
    "unknown norm": (["--norm", "wn"], "unknown norm"),
    "unknown optimizer": (["--optimizer", "lion"], "unknown optimizer"),
    "unknown dtype": (["--dtype", "int8"], "unknown dtype"),
    "norm needing space on features": (["--norm", "gn"], "spatial"),
    "batch size zero": (["--batch-size", "0"], "positive integer"),
    "batch size larger than the training set": (["--batch-size", "100000"], "larger than"),
    "zero epochs": (["--epochs", "0"], "positive integer"),
    "negative epochs": (["--epochs", "-3"], "positive integer"),
    "zero learning rate": (["--lr", "0"], "positive number"),
    "negative learning rate": (["--lr", "-0.1"], "positive number"),
    "learning rate not a number": (["--lr", "fast"], "positive number"),
    "unknown flag": (["--colour", "red"], "unrecognized"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN), ids=list(BAD_TRAIN))
def test_bad_train_arguments_exit_2_with_one_line_and_touch_nothing(case, workspace, capsys):
    flags, message = BAD_TRAIN[case]
    before = snapshot(workspace)
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(workspace / "new")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchnorm: error:") and message in err
    assert snapshot(workspace) == before
    assert not (workspace / "new").exists()


def _bad_run_case(case: str, workspace: Path) -> tuple[list[str], str]:
    tiny = str(workspace / "tiny")
    if case == "resume of an empty directory":
        (workspace / "empty").mkdir()
        return ["train", "--out", str(workspace / "empty"), "--resume"], "holds no run"
    if case == "resume of a missing directory":
        return ["train", "--out", str(workspace / "missing"), "--resume"], "not a directory"
    if case == "out is an existing run":
        return ["train", *TINY, "--out", tiny], "already holds a run"
    if case == "out is a directory of other files":
        (workspace / "mine").mkdir()
        (workspace / "mine" / "notes.txt").write_text("keep me")
        return ["train", *TINY, "--out", str(workspace / "mine"), "--overwrite"], "not a run directory"
    if case == "resume with a different setting":
        return ["train", "--out", tiny, "--resume", "--epochs", "5"], "differs from the run's"
    if case in ("resume of a truncated checkpoint", "inspect of a truncated checkpoint"):
        _damage_latest_checkpoint(workspace / "tiny", "truncated")
        if case.startswith("inspect"):
            return ["inspect", tiny], "truncated"
        return ["train", "--out", tiny, "--resume"], "truncated"
    if case == "resume of an unreadable checkpoint":
        _damage_latest_checkpoint(workspace / "tiny", "garbage")
        return ["train", "--out", tiny, "--resume"], "corrupted"
    if case == "inspect of a directory without a run":
        return ["inspect", str(workspace)], "holds no run"
    if case == "plot of a directory without a run":
        return ["plot", str(workspace)], "holds no run"
    raise AssertionError(case)


BAD_RUNS = [
    "resume of an empty directory",
    "resume of a missing directory",
    "out is an existing run",
    "out is a directory of other files",
    "resume with a different setting",
    "resume of a truncated checkpoint",
    "inspect of a truncated checkpoint",
    "resume of an unreadable checkpoint",
    "inspect of a directory without a run",
    "plot of a directory without a run",
]


@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_run_directories_exit_2_with_one_line_and_touch_nothing(case, workspace, capsys):
    args, message = _bad_run_case(case, workspace)
    before = snapshot(workspace)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchnorm: error:") and message in err, err
    assert snapshot(workspace) == before


def test_python_dash_m_exits_2_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "switchnorm", "train", "--norm", "wn", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "switchnorm: error: unknown norm 'wn'; choose one of sn, bn, in, ln, gn, none"
    ]
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_run_only_when_asked(workspace, capsys):
    tiny = workspace / "tiny"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tiny), "--overwrite"]) == 0
    assert [r["epoch"] for r in rundir.read_metrics(tiny)] == [1]
    assert json.loads((tiny / "config.json").read_text())["epochs"] == 1
    assert rundir.latest_step(tiny) == 8  # the old run's checkpoints are gone
