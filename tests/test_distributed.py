"""On 8 CPU devices, SwitchNorm gives the single-device answer on the same global batch.

JAX fixes its device count at start-up and the rest of the suite runs on one
CPU device, so every scenario runs in ONE subprocess,
``tests/distributed_checks.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which reports the
largest absolute difference of each comparison. The tests below read as the
specification; each states one comparison and its tolerance. Float32
throughout; the tolerances allow reduction-order differences only (inputs have
channel means up to 20, where one float32 ulp is 2e-6).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses: training runs, several devices or processes

CHECKS = Path(__file__).with_name("distributed_checks.py")
NORMS = ["bn", "in", "ln", "gn", "sn"]  # sn: all four with random logits
TOL = 1e-5


@pytest.fixture(scope="module")
def diff():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("front_end", ["nnx", "functional"])
def test_jit_with_batch_sharded_over_mesh_equals_single_device(diff, front_end, norm):
    assert diff[f"jit/{front_end}/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_jit_with_batch_sharded_updates_running_stats_as_single_device(diff, norm):
    assert diff[f"jit/nnx/{norm}/running_stats"] < TOL


def test_linen_jit_with_batch_sharded_equals_single_device(diff):
    assert diff["jit/linen/sn/output_and_running_stats"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_shard_map_with_axis_name_equals_full_batch(diff, norm):
    assert diff[f"shard_map/axis_name/{norm}/output"] < TOL  # output and batch stats
    assert diff[f"shard_map/axis_name/nnx/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_shard_map_nnx_running_stats_are_replicated_and_global(diff, norm):
    # out_specs=P() for the state: the running averages must be replicated
    assert diff[f"shard_map/axis_name/nnx/{norm}/running_stats"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_shard_map_without_axis_name_normalizes_each_shard_alone(diff, norm):
    assert diff[f"shard_map/no_axis_name/{norm}/output"] < TOL
    if norm in ("bn", "sn"):
        assert diff[f"shard_map/no_axis_name/{norm}/batch_stats"] < TOL


def test_per_shard_and_global_bn_really_differ(diff):
    # otherwise the two tests above could not tell global from local statistics
    assert diff["shard_map/no_axis_name/bn/gap_to_full_batch"] > 1e-2


def test_sync_within_device_groups_equals_each_group_batch(diff):
    # 2 groups of 4 devices: pmap with axis_index_groups, shard_map with a 2-D mesh
    assert diff["pmap/axis_index_groups/sn/output"] < TOL
    assert diff["shard_map/2d_mesh_groups/sn/output"] < TOL


@pytest.mark.parametrize("norm", NORMS)
def test_pmap_with_axis_name_equals_full_batch(diff, norm):
    assert diff[f"pmap/axis_name/{norm}/output"] < TOL


@pytest.mark.parametrize("norm", ["bn", "sn"])
@pytest.mark.parametrize("how", ["jit", "shard_map"])
def test_training_steps_batch_sharded_equal_single_device(diff, how, norm):
    # 3 SGD-momentum steps of a conv net: parameters, running stats, losses
    assert diff[f"train/{how}/{norm}/params_and_stats"] < TOL
