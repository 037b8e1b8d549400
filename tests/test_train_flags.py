"""Every training flag of ``switchnorm train`` reaches training, not only config.json.

Tiny runs (one epoch of four steps on the synthetic set, bn so that no figure
is drawn), each one flag away from the default run, trained once per module
and shared. For each flag: config.json records it, the trained parameters
differ from the default run's, and one property shows the flag did its own
job (a smaller learning rate moves the parameters less, SGD leaves SGD's
optimizer state in the checkpoint, ...). The mixing-logit flags act only
where there are logits, so they are held against an sn run (MIXING_FLAGS).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from run_files import build, params, read_config, restore

from switchnorm.train import rundir
from switchnorm.train.cli import main

BASE = ["--dataset", "synthetic", "--norm", "bn", "--epochs", "1", "--batch-size", "128", "--quiet"]
FLAGS = {  # run name: (flags, the config.json entry they set)
    "default": ([], None),
    "lr": (["--lr", "1e-4"], ("learning_rate", 1e-4)),
    "optimizer": (["--optimizer", "sgd"], ("optimizer", "sgd")),
    "momentum": (["--momentum", "0.5"], ("momentum", 0.5)),
    "weight_decay": (["--weight-decay", "1"], ("weight_decay", 1.0)),  # the largest accepted
    "warmup_epochs": (["--warmup-epochs", "0"], ("warmup_epochs", 0.0)),
    "seed": (["--seed", "1"], ("seed", 1)),
    "dtype": (["--dtype", "bfloat16"], ("dtype", "bfloat16")),
    "model": (["--dataset", "digits", "--model", "mlp"], ("model", "mlp")),  # digits' default: resnet2d
}
SAME_DATA = [name for name in FLAGS if name not in ("default", "model")]
SN = ["--norm", "sn"]
MIXING_FLAGS = {  # run name: (flags, the config.json entry they set), each one flag away from "sn"
    "sn": (SN, None),
    "mixing_lr_scale": ([*SN, "--mixing-lr-scale", "0.01"], ("mixing_lr_scale", 0.01)),
    "mixing_clip": ([*SN, "--mixing-clip", "1e-3"], ("mixing_clip", 1e-3)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: the run directory of FLAGS[name], trained on first use."""
    root = tmp_path_factory.mktemp("flags")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            out = root / name
            flags = {**FLAGS, **MIXING_FLAGS}[name][0]
            assert main(["train", *BASE, *flags, "--out", str(out)]) == 0
            done[name] = out
        return done[name]

    return run


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The Euclidean distance between two parameter sets with the same paths."""
    assert a.keys() == b.keys()
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2.0) for k in a)))


def kernel_norm(p: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(v**2.0) for k, v in p.items() if "kernel" in k)))


@pytest.mark.parametrize("name", [n for n in FLAGS if n != "default"])
def test_config_json_records_the_flag(runs, name):
    key, value = FLAGS[name][1]
    config = read_config(runs(name))
    assert config[key] == value
    defaults = read_config(runs("default"))
    others = {k for k in defaults if k != key and config[k] != defaults[k]}
    assert others <= {
        "dataset",
        "epochs",
        "batch_size",
        "learning_rate",
        "input_shape",
        "num_classes",
        "steps_per_epoch",
    }
    if name != "model":
        assert others == set()


@pytest.mark.parametrize("name", SAME_DATA)
def test_the_flag_changes_the_trained_parameters(runs, name):
    trained, default = params(restore(runs(name))[0]), params(restore(runs("default"))[0])
    assert distance(trained, default) > 1e-4


def test_a_smaller_learning_rate_moves_the_parameters_less(runs):
    start = params(build(read_config(runs("default"))))
    moved = distance(params(restore(runs("default"))[0]), start)
    moved_slowly = distance(params(restore(runs("lr"))[0]), start)
    assert moved_slowly < 0.05 * moved  # 1e-4 against 1e-2


def test_sgd_leaves_sgd_optimizer_state_not_adamw(runs):
    _, state = restore(runs("optimizer"))  # the names and shapes fit SGD's state
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(state.opt_state))  # momentum traces
    with pytest.raises(rundir.RunError, match="does not match"):
        restore(runs("optimizer"), optimizer="adamw")


def test_heavy_weight_decay_shrinks_the_kernels(runs):
    decayed = kernel_norm(params(restore(runs("weight_decay"))[0]))
    # 1.0 (the largest accepted) against the default 1e-2: about 2% smaller after 4 AdamW steps.
    assert decayed < 0.99 * kernel_norm(params(restore(runs("default"))[0]))


def test_the_seed_chooses_the_initial_parameters(runs):
    trained = params(restore(runs("seed"))[0])
    from_seed_1 = distance(trained, params(build(read_config(runs("seed")))))
    from_seed_0 = distance(trained, params(build(read_config(runs("default")))))
    assert from_seed_1 < 0.2 * from_seed_0


def test_bfloat16_runs_keep_float32_parameters(runs):
    _, state = restore(runs("dtype"))  # restore checks dtypes against float32 parameters
    assert {np.asarray(leaf).dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype("float32")}


def test_the_model_flag_trains_that_model(runs):
    model, _ = restore(runs("model"))
    assert type(model).__name__ == "MLP"
    assert params(model)["['layers'][0]['kernel'].value"].shape == (64, 64)  # 8 x 8 digits, flattened
    with pytest.raises(rundir.RunError, match="does not match"):
        restore(runs("model"), model="resnet2d")


# -- the mixing logits' own optimizer treatment -------------------------------------------------


def logits(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in p.items() if "mean_logits" in k or "var_logits" in k}


def logits_first_moment_norm(state) -> float:
    """The global norm of AdamW's first moment (``mu``) over the mixing logits."""
    leaves = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if ".mu" in jax.tree_util.keystr(path) and "_logits" in jax.tree_util.keystr(path)
    ]
    assert len(leaves) == 4  # two layers, mean and var
    return float(np.sqrt(sum(np.sum(leaf**2.0) for leaf in leaves)))


@pytest.mark.parametrize("name", ["mixing_lr_scale", "mixing_clip"])
def test_config_json_records_the_mixing_flag(runs, name):
    key, value = MIXING_FLAGS[name][1]
    config, sn = read_config(runs(name)), read_config(runs("sn"))
    assert config[key] == value
    assert {k for k in sn if config[k] != sn[k]} == {key}
    assert (sn["mixing_lr_scale"], sn["mixing_clip"]) == (1.0, None)


def test_a_small_mixing_lr_scale_moves_the_logits_less(runs):
    start = logits(params(build(read_config(runs("sn")))))
    moved = distance(logits(params(restore(runs("sn"))[0])), start)
    moved_slowly = distance(logits(params(restore(runs("mixing_lr_scale"))[0])), start)
    assert 0 < moved_slowly < 0.02 * moved  # AdamW's step is about the learning rate: 1e-2 of it


def test_mixing_clip_bounds_the_logits_gradient(runs):
    # AdamW's mu is an average of the (clipped) gradients, so its norm cannot exceed the clip.
    clip = MIXING_FLAGS["mixing_clip"][1][1]
    assert logits_first_moment_norm(restore(runs("sn"))[1]) > 2 * clip
    assert logits_first_moment_norm(restore(runs("mixing_clip"))[1]) <= clip


def test_a_config_json_from_before_the_mixing_flags_loads_with_their_defaults(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs("sn"), old)
    config = read_config(old)
    del config["mixing_lr_scale"], config["mixing_clip"]
    (old / "config.json").write_text(json.dumps(config))
    loaded = rundir.RunDir(old).read_config()
    assert (loaded.mixing_lr_scale, loaded.mixing_clip) == (1.0, None)
    assert main(["inspect", str(old)]) == 0  # the checkpoint's optimizer state fits the defaults
    assert "norms/0" in capsys.readouterr().out
