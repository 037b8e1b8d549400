"""The example scripts run, train their SwitchNorm layers and read the weights a user relies on.

Each runs on a small setting (one epoch, a small model). Checked: training moves
every layer's blend away from uniform, the printed table names each layer (Linen
paths) or each stacked copy (``blocks/norm[i]``), and the per-sample example prints
its accuracies and draws its figure.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """An example script as a module (its ``main`` does not run on import)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Linen modules) look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sample_weights_example_prints_the_accuracy_and_draws(tmp_path):
    """One epoch, without --compare: that would double the compilation and only repeat ``train``."""
    out = tmp_path / "weights.png"
    script = [sys.executable, str(EXAMPLES / "sample_weights.py")]
    result = subprocess.run(
        [*script, "--epochs", "1", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert 'weights="sample": test accuracy' in result.stdout
    assert "layer 1 mean weights, median clean/altered: bn" in result.stdout
    assert out.stat().st_size > 10_000


def table_rows(text: str) -> dict[str, list[float]]:
    """``{layer: mean weights}`` from the printed format_mixing_weights table."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^(\S+)\s+mean\s+(.*)$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in re.findall(r"\d\.\d{3}", match.group(2))]
    return rows


@pytest.mark.slow
def test_linen_resnet_trains_and_prints_every_layers_weights(capsys):
    accuracy = load_example("linen_resnet").main(
        ["--epochs", "1", "--stages", "1", "1", "--batch-size", "16"]
    )
    rows = table_rows(capsys.readouterr().out)
    # stem, two norms per block, the projection of the strided block
    assert set(rows) == {
        "bn_init",
        "ResNetBlock_0/SwitchNorm_0",
        "ResNetBlock_0/SwitchNorm_1",
        "ResNetBlock_1/SwitchNorm_0",
        "ResNetBlock_1/SwitchNorm_1",
        "ResNetBlock_1/norm_proj",
    }
    assert all(len(w) == 4 for w in rows.values())
    assert max(abs(v - 0.25) for w in rows.values() for v in w) > 0.005  # the logits trained
    assert accuracy > 0.3  # one epoch of 89 steps, ten classes


@pytest.mark.slow
def test_nnx_scan_blocks_reads_one_row_per_stacked_copy(capsys):
    accuracy = load_example("nnx_scan_blocks").main(["--epochs", "1", "--blocks", "3", "--features", "8"])
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == ["blocks/norm[0]", "blocks/norm[1]", "blocks/norm[2]"]
    assert all(len(w) == 4 for w in rows.values())
    assert rows["blocks/norm[0]"] != rows["blocks/norm[2]"]  # each copy learned its own blend
    assert accuracy > 0.2
