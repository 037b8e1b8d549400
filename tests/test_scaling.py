"""``switchnorm train`` scales out: several devices and processes, same parameters as one.

Each run is a real ``switchnorm train`` subprocess on the synthetic set (the
rest of the suite keeps one CPU device in this process). The multi-process
run is 2 processes on localhost joined by ``jax.distributed``, each with 2 CPU
devices (``--devices 2``), so the global batch of 32 is split 4 ways across
two processes; it must end with the parameters and running averages of a
one-process, one-device run, up to float32 reduction order.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from switchnorm.train import cli

pytestmark = pytest.mark.slow  # subprocesses: training runs, several devices or processes

RUN = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]
TOL = 1e-5


def switchnorm_train(*args, env=None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    # --devices alone must give the CPU its devices: no device count from the environment
    env.pop("JAX_NUM_CPU_DEVICES", None)
    flags = env.pop("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "force_host_platform_device_count" not in f)
    return subprocess.Popen(
        [sys.executable, "-m", "switchnorm", "train", *RUN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(*processes, timeout=300) -> list[tuple[int, str, str]]:
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:  # one failed: do not leave the other waiting
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def final_state(run: Path):
    _, model, step, epoch = cli._restore_model(run)
    return jax.tree.map(np.asarray, nnx.state(model)), step


def largest_difference(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    [(code, _, err)] = finish(switchnorm_train("--out", out))
    assert code == 0, err[-3000:]
    return out


def test_two_processes_with_two_devices_each_end_with_one_device_parameters(one_device, tmp_path):
    out = tmp_path / "two"
    port = free_port()
    first = switchnorm_train(
        "--out",
        out,
        "--devices",
        2,
        "--coordinator-address",
        f"localhost:{port}",
        "--num-processes",
        2,
        "--process-id",
        0,
    )
    second = switchnorm_train(
        "--out",
        out,
        "--devices",
        2,
        env={  # the same, from env vars
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1",
        },
    )
    for code, _, err in finish(first, second):
        assert code == 0, err[-3000:]

    expected, step = final_state(one_device)
    got, got_step = final_state(out)
    assert got_step == step
    assert largest_difference(expected, got) < TOL
    # process 0 alone wrote the metrics: one record per epoch, not two
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one_device / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["test_accuracy"] == reference[-1]["test_accuracy"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--devices", "3"], "batch_size=32 must be a multiple of the 3 devices"),
        (["--num-processes", "2"], "missing ['coordinator_address', 'process_id']"),
    ],
)
def test_bad_scaling_flags_get_one_line_and_status_2(tmp_path, flags, message):
    [(code, _, err)] = finish(switchnorm_train("--out", tmp_path / "run", *flags))
    assert code == 2
    assert err.startswith("switchnorm: error:") and message in err
    assert not (tmp_path / "run").exists()
