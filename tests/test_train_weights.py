"""``switchnorm train --weights layer|channel|sample`` reaches every layer, is saved, resumed and checked.

The model-level tests build the three models without training. The run tests
train tiny sn runs on the synthetic set (two epochs of four steps, trained
once per module and shared): a ``--weights channel`` run and a
``--weights sample`` run.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from run_files import params, read_config, restore

from switchnorm import SwitchNorm
from switchnorm.train import data, models, rundir
from switchnorm.train.cli import main
from switchnorm.train.loop import WEIGHTS_BATCH, model_weights

BASE = ["--dataset", "synthetic", "--norm", "sn", "--epochs", "2", "--batch-size", "128", "--quiet"]
SHAPES = {"resnet1d": (40, 1), "resnet2d": (8, 8, 1), "mlp": (8,)}  # one example of each model's input


def switchnorm_layers(model: nnx.Module) -> list[SwitchNorm]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, SwitchNorm)]


@pytest.mark.parametrize("norm", ["sn", "ssn"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("weights", ["layer", "channel", "sample"])
def test_build_model_gives_every_layer_the_weights_mode(name, weights, norm):
    model = models.build_model(name, SHAPES[name], 3, norm=norm, weights=weights)
    layers = switchnorm_layers(model)
    assert len(layers) >= 2  # every block's layers, the stem's and shortcuts' included
    for layer in layers:
        k, c = len(layer.normalizers), layer.scale.shape[0]
        assert layer.weights == weights
        assert layer.mean_logits.shape == layer.var_logits.shape == ((k, c) if weights == "channel" else (k,))
        assert (layer.sample_map is not None) == (weights == "sample")
        if weights == "sample":
            assert layer.sample_map.shape == (2, 2 * k, k)


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_build_model_refuses_finer_weights_for_a_norm_without_mixing_weights(norm):
    with pytest.raises(ValueError, match=f"weights 'channel' needs .* but norm is '{norm}'"):
        models.build_model("resnet1d", SHAPES["resnet1d"], 3, norm=norm, weights="channel")


def flat(weights: dict) -> dict[tuple[str, str, str], float]:
    """``{path: {kind: {name: w}}}`` as ``{(path, kind, name): w}``, which pytest.approx compares."""
    return {(p, k, n): w for p, kinds in weights.items() for k, row in kinds.items() for n, w in row.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(weights)``: the run directory of the tiny sn run with ``--weights weights``."""
    root = tmp_path_factory.mktemp("weights")
    done: dict[str, Path] = {}

    def run(weights: str) -> Path:
        if weights not in done:
            out = root / weights
            assert main(["train", *BASE, "--weights", weights, "--out", str(out)]) == 0
            done[weights] = out
        return done[weights]

    return run


@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_the_run_trains_layers_of_that_mode_and_saves_it(runs, weights):
    assert read_config(runs(weights))["weights"] == weights
    trained = params(restore(runs(weights))[0])  # restore refuses a checkpoint of other shapes
    logits = {k: v for k, v in trained.items() if "_logits" in k}
    shape = (2, 64) if weights == "channel" else (2,)  # bn and ln, per channel of the 64-wide MLP
    assert len(logits) == 4 and all(v.shape == shape for v in logits.values())
    maps = {k: v for k, v in trained.items() if "sample_map" in k}
    assert len(maps) == (2 if weights == "sample" else 0)
    assert all(np.abs(v).max() > 0 for v in maps.values())  # starts at zero: it was trained


def test_every_record_summarises_the_sample_weights_on_the_first_test_examples(runs):
    run = runs("sample")
    logged = flat(rundir.RunDir(run).read_metrics()[0][-1]["weights"])
    batch = data.load_dataset("synthetic", 0).x_test[:WEIGHTS_BATCH]
    assert logged == pytest.approx(flat(model_weights(restore(run)[0], batch)), abs=1e-6)
    assert {key[0] for key in logged} == {"norms/0", "norms/1"}


def test_a_resumed_run_keeps_its_weights_and_ends_as_if_never_stopped(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs("sample"), copy)
    # What a kill after epoch 1's checkpoint leaves.
    shutil.rmtree(copy / "checkpoints" / "8")
    (copy / "summary.json").unlink()
    assert main(["train", "--out", str(copy), "--resume", "--quiet"]) == 0
    assert read_config(copy)["weights"] == "sample"
    resumed, uninterrupted = params(restore(copy)[0]), params(restore(runs("sample"))[0])
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_a_resume_with_other_weights_is_refused(runs, capsys):
    run = runs("channel")
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--weights", "sample", "--quiet"]) == 2
    assert "--weights sample differs from the run's channel" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--weights", "pixel"], "unknown weights 'pixel'; choose one of layer, channel, sample"),
        (["--norm", "bn", "--weights", "channel"], "--weights 'channel' needs .* but norm is 'bn'"),
    ],
)
def test_a_bad_weights_flag_exits_2_before_writing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *BASE, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchnorm: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err)
    assert not out.exists()


def test_a_config_json_without_weights_reads_as_layer(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs("channel"), old)
    config = read_config(old)
    del config["weights"]
    (old / "config.json").write_text(json.dumps(config))
    assert rundir.RunDir(old).read_config().weights == "layer"


def test_a_config_json_with_finer_weights_for_bn_is_refused(runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(runs("channel"), bad)
    config = {**read_config(bad), "norm": "bn"}
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(bad), "--resume", "--quiet"]) == 2
    assert "weights 'channel' needs" in capsys.readouterr().err
