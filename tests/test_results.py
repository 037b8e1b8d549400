"""`make results` (benchmarks/results.py): the pages it writes, and README's table drawn from them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import results

ROOT = Path(__file__).resolve().parent.parent


def test_the_recorded_page_and_the_readme_table_are_what_the_renderer_draws_from_results_json():
    recorded = json.loads((ROOT / "docs" / "results.json").read_text())
    page = (ROOT / "docs" / "results.md").read_text()
    assert results.render(recorded) == page, "run: python -m benchmarks.results --render docs/results.json"
    assert results.readme_block(page) in (ROOT / "README.md").read_text()


def test_the_summary_table_reads_back_every_norm_of_every_dataset():
    recorded = json.loads((ROOT / "docs" / "results.json").read_text())
    accuracy, speed, fine_tune = results.parse_tables(results.summary_block(recorded))
    assert set(accuracy) == {"digits", "MNIST-1D"}
    for row in accuracy.values():
        assert list(row) == ["sn", "bn", "gn", "ssn", "ssn collapsed"]
        assert all(50 < float(cell) <= 100 for cell in row.values())
    assert "32x32x32x64" in speed and float(speed["32x32x32x64"]["forward + backward"]) > 0
    assert list(fine_tune) == ["batch 2", "batch 4"]
    for row in fine_tune.values():
        assert list(row) == ["BatchNorm", "converted, sn(0.5)", "GroupNorm"]
        assert all(0 < float(cell) <= 100 for cell in row.values())


@pytest.mark.slow
def test_quick_run_writes_the_page_and_redraws_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{results.BEGIN}\nold\n{results.END}\n\nafter\n")
    out = tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks.results", "--quick", "--out", str(out)]
    command += ["--readme", str(readme), "--no-fine-tune"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)

    page = (out / "results.md").read_text()
    accuracy, speed = results.parse_tables(results.readme_block(page))
    cells = accuracy["digits"]
    assert [float(cells[c]) for c in ("sn", "ssn", "ssn collapsed")]  # the norms --quick trains
    assert cells["bn"] == cells["gn"] == "-"
    assert abs(float(cells["ssn collapsed"]) - float(cells["ssn"])) < 0.3  # at most one of 360 digits moves
    assert float(speed["8x8x8x16"]["forward + backward"]) > 0
    assert readme.read_text() == f"# title\n\n{results.readme_block(page)}\n\nafter\n"
    assert (out / "figures" / "ssn_weights.png").stat().st_size > 0
    assert results.render(json.loads((out / "results.json").read_text())) == page
