"""The `switchnorm` command: run directory contents, inspect, plot, overwrite.

The table of bad inputs is in test_rundir_bad_inputs.py; damage, symlinks,
concurrent writers, a full disk and divergence in test_rundir_faults.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_files import TINY

from switchnorm.train.cli import main
from switchnorm.train.rundir import RunDir


def metrics(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()[0]


def test_run_directory_holds_config_metrics_checkpoints_and_figures(run):
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "synthetic" and config["norm"] == "sn" and config["epochs"] == 2
    records = metrics(run)
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

    assert RunDir(run).latest_step() == 16
    _, model, step, epoch = _restore_model(run)
    assert (step, epoch) == (16, 2)
    import switchnorm

    # The weights restored from the checkpoint are the ones the last record logged.
    restored = switchnorm.mixing_weights(model)
    logged = metrics(run)[-1]["weights"]
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
    step_dir = run / "checkpoints" / str(RunDir(run).latest_step())
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncated":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        size = biggest.stat().st_size
        biggest.write_bytes((b"\0garbage" * size)[:size])  # same size, other bytes


def test_python_dash_m_exits_2_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "switchnorm", "train", "--norm", "wn", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "switchnorm: error: unknown norm 'wn'; choose one of sn, ssn, bn, in, ln, gn, none"
    ]
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_run_only_when_asked(workspace, capsys):
    tiny = workspace / "tiny"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tiny), "--overwrite"]) == 0
    assert [r["epoch"] for r in metrics(tiny)] == [1]
    assert json.loads((tiny / "config.json").read_text())["epochs"] == 1
    assert RunDir(tiny).latest_step() == 8  # the old run's checkpoints are gone
