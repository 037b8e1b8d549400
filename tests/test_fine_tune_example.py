"""examples/fine_tune_small_batch.py runs end to end and records every method at every batch size.

``--quick`` shrinks only the run lengths (2 pretraining epochs, 30 fine-tuning steps, one
seed here), so the accuracies are low; what is checked is the record a user reads.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fine_tune_small_batch.py"


@pytest.mark.slow
def test_quick_run_records_every_method_and_batch_size(tmp_path):
    command = [sys.executable, str(SCRIPT), "--quick", "--seeds", "0", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    record = json.loads((tmp_path / "fine_tune.json").read_text())
    assert record["methods"] == ["bn", "sn(0.5)", "sn(0.9)", "sn(1.0)", "gn"]
    accuracy = record["results"]["0"]["accuracy"]
    assert {(m, b) for m in accuracy for b in accuracy[m]} == {
        (m, b) for m in record["methods"] for b in ("2", "4")
    }
    assert all(0.0 <= a <= 1.0 for by_batch in accuracy.values() for a in by_batch.values())
    weights = record["results"]["0"]["mixing_weights"]["sn(0.5)"]["2"]
    assert list(weights) == ["norms/0", "norms/1", "norms/2"]  # one SwitchNorm per former BatchNorm
    assert set(weights["norms/0"]["mean"]) == {"bn", "in", "ln", "gn"}
    assert record["command"][-3:] == ["0", "--out", str(tmp_path)]
    assert "| sn(0.5) | 2 |" in result.stdout  # the printed markdown table
    report = (tmp_path / "fine_tune.md").read_text()  # what make results puts in docs/results.md
    assert "| sn(0.5) | 2 |" in report and "weights after fine-tuning" in report
