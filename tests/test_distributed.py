"""On 8 CPU devices, SwitchNorm gives the single-device answer on the same global batch.

JAX fixes its device count at start-up and the rest of the suite runs on one
CPU device, so every scenario runs in ONE subprocess,
``tests/distributed_checks.py`` with
``JAX_NUM_CPU_DEVICES=8``, which reports each
scenario on its own line: the largest absolute difference of each comparison,
or the traceback of what the scenario raised. Each test below reads only the
scenarios it names, so a scenario that raises fails its own tests with its own
traceback, and a crash of the whole subprocess fails every test with its
stderr. The tests read as the specification; each states one comparison and
its tolerance. Float32 throughout; the tolerances allow reduction-order
differences only (inputs have channel means up to 20, where one float32 ulp
is 2e-6).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # subprocesses: training runs, several devices or processes

CHECKS = Path(__file__).with_name("distributed_checks.py")
NORMS = ["bn", "in", "ln", "gn", "sn"]  # sn: all four with random logits
WEIGHTED = ["sn-channel", "sn-sample"]  # all four, per-channel or per-sample weights
TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Report:
    """What the checks subprocess said: its exit status, stderr, and each scenario's line."""

    returncode: int
    stderr: str
    scenarios: dict[str, dict[str, Any]]

    def results(self, scenario: str) -> dict[str, float]:
        """The comparisons of ``scenario``; fails the calling test if it raised or never ran."""
        line = self.scenarios.get(scenario)
        if line is None:
            pytest.fail(
                f"scenario {scenario!r} reported nothing; the checks subprocess exited with status "
                f"{self.returncode}, its stderr ends:\n{self.stderr[-4000:]}",
                pytrace=False,
            )
        if "error" in line:
            pytest.fail(
                f"scenario {scenario!r} raised in the checks subprocess:\n{line['error']}", pytrace=False
            )
        return line["results"]


def parse_report(returncode: int, stdout: str, stderr: str) -> Report:
    """The scenario lines of the subprocess's stdout; anything else there is ignored."""
    scenarios = {}
    for text in stdout.splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and "scenario" in line:
            scenarios[line["scenario"]] = line
    return Report(returncode, stderr, scenarios)


@pytest.fixture(scope="module")
def report() -> Report:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True, timeout=600)
    return parse_report(done.returncode, done.stdout, done.stderr)


def test_a_raising_scenario_fails_only_its_own_tests_with_its_traceback():
    lines = [
        json.dumps({"scenario": "pmap/bn", "results": {"pmap/axis_name/bn/output": 0.0}}),
        json.dumps({"scenario": "pmap/gn", "error": "Traceback ...\nZeroDivisionError: boom"}),
    ]
    report = parse_report(1, "\n".join(lines), "")
    assert report.results("pmap/bn") == {"pmap/axis_name/bn/output": 0.0}
    with pytest.raises(pytest.fail.Exception, match="(?s)'pmap/gn' raised.*ZeroDivisionError: boom"):
        report.results("pmap/gn")
    crashed = parse_report(-11, "", "Fatal Python error: Segmentation fault")
    with pytest.raises(pytest.fail.Exception, match="(?s)status -11.*Segmentation fault"):
        crashed.results("pmap/bn")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("front_end", ["nnx", "functional"])
def test_jit_with_batch_sharded_over_mesh_equals_single_device(report, front_end, norm):
    assert report.results(f"jit/{norm}")[f"jit/{front_end}/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_jit_with_batch_sharded_updates_running_stats_as_single_device(report, norm):
    assert report.results(f"jit/{norm}")[f"jit/nnx/{norm}/running_stats"] < TOL


def test_linen_jit_with_batch_sharded_equals_single_device(report):
    assert report.results("linen")["jit/linen/sn/output_and_running_stats"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_shard_map_with_axis_name_equals_full_batch(report, norm):
    diff = report.results(f"shard_map/{norm}")
    assert diff[f"shard_map/axis_name/{norm}/output"] < TOL  # output and batch stats
    assert diff[f"shard_map/axis_name/nnx/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_shard_map_nnx_running_stats_are_replicated_and_global(report, norm):
    # out_specs=P() for the state: the running averages must be replicated
    assert report.results(f"shard_map/{norm}")[f"shard_map/axis_name/nnx/{norm}/running_stats"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_shard_map_without_axis_name_normalizes_each_shard_alone(report, norm):
    diff = report.results(f"shard_map/{norm}")
    assert diff[f"shard_map/no_axis_name/{norm}/output"] < TOL
    if norm in ("bn", "sn"):
        assert diff[f"shard_map/no_axis_name/{norm}/batch_stats"] < TOL


def test_per_shard_and_global_bn_really_differ(report):
    # otherwise the two tests above could not tell global from local statistics
    assert report.results("shard_map/bn")["shard_map/no_axis_name/bn/gap_to_full_batch"] > 1e-2


def test_sync_within_device_groups_equals_each_group_batch(report):
    # 2 groups of 4 devices: pmap with axis_index_groups, shard_map with a 2-D mesh
    diff = report.results("groups")
    assert diff["pmap/axis_index_groups/sn/output"] < TOL
    assert diff["shard_map/2d_mesh_groups/sn/output"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_pmap_with_axis_name_equals_full_batch(report, norm):
    assert report.results(f"pmap/{norm}")[f"pmap/axis_name/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
@pytest.mark.parametrize("how", ["jit", "shard_map"])
def test_training_steps_batch_sharded_equal_single_device(report, how, norm):
    # 3 SGD-momentum steps of a conv net: parameters, running stats, losses
    assert report.results(f"train/{norm}")[f"train/{how}/{norm}/params_and_stats"] < TOL


@pytest.mark.parametrize("norm", WEIGHTED)
def test_per_channel_and_per_sample_weights_sharded_equal_single_device(report, norm):
    jit = report.results(f"jit/{norm}")
    assert jit[f"jit/nnx/{norm}/output"] < TOL
    assert jit[f"jit/nnx/{norm}/running_stats"] < TOL
    assert jit[f"jit/functional/{norm}/output"] < TOL
    shard_map = report.results(f"shard_map/{norm}")
    assert shard_map[f"shard_map/axis_name/{norm}/output"] < TOL  # output and batch stats
    assert shard_map[f"shard_map/axis_name/nnx/{norm}/output"] < TOL
    assert shard_map[f"shard_map/axis_name/nnx/{norm}/running_stats"] < TOL
    assert shard_map[f"shard_map/no_axis_name/{norm}/output"] < TOL
    assert report.results(f"pmap/{norm}")[f"pmap/axis_name/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", WEIGHTED)
def test_per_channel_and_per_sample_gradients_under_shard_map_equal_single_device(report, norm):
    # the per-sample descriptors read bn's global statistics, so their gradient crosses devices
    diff = report.results(f"gradients/{norm}")
    assert diff[f"gradients/{norm}/params_relative"] < 2e-6
    assert diff[f"gradients/{norm}/x_relative"] < 2e-6


def test_a_mask_under_shard_map_gives_the_whole_batchs_masked_statistics(report):
    # masked-in counts differ between devices (one holds none): bn's statistics, the output
    # and the gradients equal one device's on the full batch, not an average of devices
    diff = report.results("mask")
    assert diff["mask/shard_map/output_relative"] < 2e-6
    assert diff["mask/shard_map/batch_stats"] < TOL
    assert diff["mask/gradients/params_relative"] < 2e-6
    assert diff["mask/gradients/x_relative"] < 2e-6
    assert diff["mask/equal_weights_gap"] > 0.1  # the comparisons above can tell the two apart
