"""What ``switchnorm inspect``, ``plot`` and a repeated ``--resume`` show of a finished run.

One small SwitchNorm run on the synthetic set, trained through the command
with a learning rate high enough that the mixing weights leave 0.5; every test
holds one of the command's outputs against the run's files.
"""

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from run_files import parse_weights_table, restore

import switchnorm
from switchnorm.train import rundir
from switchnorm.train.cli import main

RUN = ["--dataset", "synthetic", "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--quiet"]
PRINTED = 0.0005 + 1e-9  # the table prints three decimals


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sn"
    assert main(["train", *RUN, "--out", str(out)]) == 0
    return out


def contents(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_inspect_prints_the_trained_weights_of_the_last_record_and_the_checkpoint(run, capsys):
    assert main(["inspect", str(run)]) == 0
    printed = parse_weights_table(capsys.readouterr().out)
    logged = rundir.RunDir(run).read_metrics()[0][-1]["weights"]
    saved = switchnorm.mixing_weights(restore(run)[0])
    assert set(printed) == set(logged) == set(saved) == {"norms/0", "norms/1"}
    moved = 0.0
    for layer in logged:
        for kind in ("mean", "var"):
            assert set(printed[layer][kind]) == set(logged[layer][kind]) == {"bn", "ln"}
            for name, weight in logged[layer][kind].items():
                assert printed[layer][kind][name] == pytest.approx(weight, abs=PRINTED)
                assert float(saved[layer][kind][name]) == pytest.approx(weight, abs=1e-6)
                moved = max(moved, abs(weight - 0.5))
    assert moved > 0.01  # else an untrained model's 0.500 would pass


def test_resuming_a_finished_run_says_so_and_changes_no_file(run, capsys):
    before = contents(run)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert "the run is complete (3 epochs)" in capsys.readouterr().out
    assert contents(run) == before
    assert [r["epoch"] for r in rundir.RunDir(run).read_metrics()[0]] == [1, 2, 3]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


# Figure size in inches times the 110 dpi of switchnorm.train.plots, for 2 layers:
# over training, 2 panels of 4.2 x (2.9 + 0.9); final weights, max(6, 1.1 * 2 + 2) x 4.8.
FIGURE_PIXELS = {"weights_over_training.png": (924, 418), "final_weights.png": (660, 528)}


@pytest.mark.parametrize("name", list(FIGURE_PIXELS))
def test_plot_writes_a_real_png_of_the_figure_size(run, tmp_path, name, capsys):
    import shutil

    import matplotlib.image

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / name).unlink()
    assert main(["plot", str(copy)]) == 0
    assert str(copy / name) in capsys.readouterr().out
    assert png_size(copy / name) == FIGURE_PIXELS[name]
    pixels = matplotlib.image.imread(copy / name)  # decodes: not just a header
    width, height = FIGURE_PIXELS[name]
    assert pixels.shape == (height, width, 4)
    assert np.ptp(pixels[..., :3]) > 0.5  # something drawn on the white page
