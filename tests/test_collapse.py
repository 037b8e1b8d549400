"""switchnorm.collapse: a trained model's chosen normalizers, and nothing else, computed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import switchnorm
from switchnorm import NORMALIZERS

SHAPE = (4, 5, 5, 8)  # N, H, W, C
EPSILON = 0.1  # large, so that a fold that mishandles it is far off


def _logits(chosen: str) -> jax.Array:
    """Logits whose sparsestmax at radius 1 is one-hot on ``chosen`` (and softmax favours it)."""
    return jnp.array([3.0 if n == chosen else 0.0 for n in NORMALIZERS])


class Net(nnx.Module):
    """conv -> norm -> relu -> conv -> norm: two layers whose choices the tests set."""

    def __init__(self, mixing: str = "sparsestmax"):
        rngs = nnx.Rngs(0)
        c = SHAPE[-1]
        self.conv1 = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.norm1 = switchnorm.SwitchNorm(c, mixing=mixing, epsilon=EPSILON, num_groups=2, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.norm2 = switchnorm.SwitchNorm(c, mixing=mixing, epsilon=EPSILON, num_groups=4, rngs=rngs)

    def __call__(self, x):
        return self.norm2(self.conv2(jax.nn.relu(self.norm1(self.conv1(x)))))


def _choose(layer, mean: str, var: str, seed: int) -> None:
    """Sets the layer's logits and gives it random scale, bias and running averages."""
    rng = np.random.default_rng(seed)
    c = layer.num_features
    layer.mean_logits[...] = _logits(mean)
    layer.var_logits[...] = _logits(var)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
    layer.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
    layer.var[...] = jnp.asarray(rng.uniform(0.2, 3.0, c), jnp.float32)


def _net(first=("bn", "bn"), second=("ln", "in"), radius=1.0, mixing="sparsestmax") -> Net:
    net = Net(mixing)
    _choose(net.norm1, *first, seed=1)
    _choose(net.norm2, *second, seed=2)
    if mixing == "sparsestmax":
        switchnorm.set_radius(net, radius)
    net.eval()
    return net


@pytest.fixture
def x():
    return jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, SHAPE), jnp.float32)


CHOICES = [("bn", "bn"), ("ln", "bn"), ("bn", "ln"), ("in", "gn"), ("gn", "in"), ("ln", "ln"), ("gn", "bn")]


@pytest.mark.parametrize("choice", CHOICES, ids="/".join)
def test_collapsed_model_equals_the_one_hot_model_in_inference(choice, x):
    net = _net(first=choice)
    collapsed, report = switchnorm.collapse(net)
    # Exact but for the fold's rounding (bn/bn), a few float32 ulps of the second layer's output.
    np.testing.assert_allclose(collapsed(x), net(x), rtol=1e-6, atol=1e-6)
    assert [(r.mean, r.var) for r in report.layers] == [choice, ("ln", "in")]
    assert [(r.mean_dropped, r.var_dropped) for r in report.layers] == [(0.0, 0.0)] * 2


def test_bn_for_both_in_inference_folds_to_a_channel_affine(x):
    net = _net(first=("bn", "bn"))
    collapsed, report = switchnorm.collapse(net)
    assert isinstance(collapsed.norm1, switchnorm.ChannelAffine)
    assert isinstance(collapsed.norm2, switchnorm.CollapsedNorm)
    assert [r.form for r in report.layers] == ["affine", "normalizer"]
    h = net.conv1(x)
    np.testing.assert_allclose(collapsed.norm1(h), net.norm1(h), rtol=0, atol=1e-6)


def test_collapsed_norm_computes_only_the_chosen_normalizers():
    collapsed, _ = switchnorm.collapse(_net(first=("ln", "bn"), second=("gn", "gn")))
    assert collapsed.norm1.normalizers == ("ln", "bn")
    assert collapsed.norm2.normalizers == ("gn",) and collapsed.norm2.num_groups == 4


def test_in_training_mode_bn_stays_a_normalizer_with_the_same_output_and_running_averages(x):
    net = _net(first=("bn", "bn"))
    net.train()
    collapsed, report = switchnorm.collapse(net)
    assert report.layers[0].form == "normalizer"
    np.testing.assert_allclose(collapsed(x), net(x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(collapsed.norm1.mean[...], net.norm1.mean[...], rtol=0, atol=1e-7)
    np.testing.assert_allclose(collapsed.norm1.var[...], net.norm1.var[...], rtol=0, atol=1e-7)


def test_one_hot_weights_report_no_change_on_a_batch(x):
    _, report = switchnorm.collapse(_net(first=("ln", "bn")), batch=x)
    assert [r.max_change for r in report.layers] == [0.0, 0.0]
    assert report.max_change == 0.0
    _, folded = switchnorm.collapse(_net(first=("bn", "bn")), batch=x)
    assert 0 < folded.layers[0].max_change <= 2e-6  # the fold rounds differently: ulps of outputs near 5


def test_weights_short_of_one_hot_report_what_they_drop_and_the_change(x):
    net = _net(first=("bn", "ln"), second=("in", "in"), mixing="softmax")
    net.norm1.mean_logits[...] = _logits("bn") * 3  # softmax weight e^9 / (e^9 + 3) > 0.99
    net.norm1.var_logits[...] = _logits("ln") * 3
    net.norm2.mean_logits[...] = jnp.zeros(4)  # 0.25 each: kept
    collapsed, report = switchnorm.collapse(net, batch=x)
    dropped = 1.0 - float(jax.nn.softmax(_logits("bn") * 3)[0])
    first, second = report.layers
    assert first.form == "normalizer" and (first.mean, first.var) == ("bn", "ln")
    np.testing.assert_allclose([first.mean_dropped, first.var_dropped], [dropped, dropped], rtol=1e-5)
    assert first.max_change > 1e-4 and report.max_change == first.max_change
    assert second.form == "kept" and second.max_change is None
    assert isinstance(collapsed.norm2, switchnorm.SwitchNorm)


def test_min_weight_decides_which_layers_collapse():
    net = _net(first=("bn", "ln"), mixing="softmax")  # logits 3: weight e^3 / (e^3 + 3) = 0.87
    assert all(not r.collapsed for r in switchnorm.collapse(net)[1].layers)
    assert all(r.collapsed for r in switchnorm.collapse(net, min_weight=0.85)[1].layers)


def test_the_input_model_is_left_untouched(x):
    net = _net(first=("bn", "bn"))
    net.train()
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(net)))
    switchnorm.collapse(net, batch=x)
    after = nnx.to_pure_dict(nnx.state(net))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert isinstance(net.norm1, switchnorm.SwitchNorm) and not net.norm1.use_running_average


def test_a_collapsed_model_runs_under_jit(x):
    collapsed, _ = switchnorm.collapse(_net(first=("bn", "bn"), second=("gn", "ln")))
    jitted = nnx.jit(lambda model, x: model(x))
    np.testing.assert_allclose(jitted(collapsed, x), collapsed(x), rtol=0, atol=1e-6)


def test_a_root_switch_norm_collapses_to_a_layer(x):
    norm = switchnorm.SwitchNorm(SHAPE[-1], mixing="sparsestmax", rngs=nnx.Rngs(0))
    _choose(norm, "in", "ln", seed=3)
    switchnorm.set_radius(norm, 1.0)
    collapsed, report = switchnorm.collapse(norm)
    assert isinstance(collapsed, switchnorm.CollapsedNorm) and report.layers[0].path == ""
    np.testing.assert_allclose(collapsed(x), norm(x), rtol=0, atol=1e-6)


class Shared(nnx.Module):
    """One SwitchNorm held at two places and called at both."""

    def __init__(self, norm):
        self.first, self.second = norm, norm

    def __call__(self, x):
        return self.second(self.first(x) * 2.0)


def test_a_shared_layer_is_collapsed_at_every_place_that_holds_it(x):
    net = _net(second=("ln", "gn"))
    shared = Shared(net.norm2)
    collapsed, report = switchnorm.collapse(shared, batch=x)
    assert [layer.path for layer in report.layers] == ["first"]  # one layer, reported once
    assert isinstance(collapsed.first, switchnorm.CollapsedNorm) and collapsed.second is collapsed.first
    np.testing.assert_allclose(collapsed(x), shared(x), atol=1e-5)
    assert isinstance(shared.second, switchnorm.SwitchNorm)  # the model given is left as it was


class Stacked(nnx.Module):
    """Three SwitchNorms stacked by ``nnx.vmap`` and applied in turn by ``nnx.scan``."""

    def __init__(self, chosen: str):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            norm = switchnorm.SwitchNorm(SHAPE[-1], mixing="sparsestmax", rngs=rngs)
            norm.mean_logits[...] = norm.var_logits[...] = _logits(chosen)
            return norm

        self.layers = make(nnx.Rngs(0))
        switchnorm.set_radius(self, 1.0)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x) + 1.0

        return body(x, self.layers)


def test_layers_stacked_by_nnx_vmap_collapse_as_one_stacked_layer(x):
    stacked = Stacked("ln")
    stacked.eval()
    collapsed, report = switchnorm.collapse(stacked, batch=x)
    assert [(layer.path, layer.mean, layer.var, layer.form) for layer in report.layers] == [
        ("layers", "ln", "ln", "normalizer")
    ]
    assert isinstance(collapsed.layers, switchnorm.CollapsedNorm)
    np.testing.assert_allclose(collapsed(x), stacked(x), atol=1e-5)
    assert report.max_change is not None and report.max_change < 1e-5


def _to_float16(args, *, dtype=None):
    """A promote_dtype that casts every array to float16, whatever ``dtype`` asks."""
    return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)


@pytest.mark.parametrize("choice", [("in", "ln"), ("bn", "bn")], ids="/".join)
def test_a_collapsed_layer_keeps_the_layers_promote_dtype(choice, x):
    norm = switchnorm.SwitchNorm(SHAPE[-1], mixing="sparsestmax", promote_dtype=_to_float16, rngs=nnx.Rngs(0))
    _choose(norm, *choice, seed=4)
    switchnorm.set_radius(norm, 1.0)
    norm.eval()
    collapsed, report = switchnorm.collapse(norm)
    assert report.layers[0].form == ("affine" if choice == ("bn", "bn") else "normalizer")
    assert collapsed.promote_dtype is _to_float16
    assert norm(x).dtype == collapsed(x).dtype == jnp.float16  # float32 x, cast by the function
    # float16 rounding: the fold casts its multiplier and offset, the layer its running averages.
    np.testing.assert_allclose(collapsed(x), norm(x), rtol=2e-3, atol=2e-3)


def _channel_norm(chosen_per_channel, mixing="sparsestmax") -> switchnorm.SwitchNorm:
    """A weights="channel" layer whose channel c favours ``chosen_per_channel[c]`` (one-hot at radius 1)."""
    c = len(chosen_per_channel)
    norm = switchnorm.SwitchNorm(c, mixing=mixing, weights="channel", epsilon=EPSILON, rngs=nnx.Rngs(0))
    gains = np.random.default_rng(4).uniform(1.0, 2.0, c)  # every channel's logits differ
    logits = jnp.stack([_logits(n) * g for n, g in zip(chosen_per_channel, gains, strict=True)], axis=1)
    norm.mean_logits[...], norm.var_logits[...] = logits, logits
    if mixing == "sparsestmax":
        switchnorm.set_radius(norm, 1.0)
    return norm


def test_a_channel_layer_whose_every_channel_chose_one_normalizer_collapses_to_it(x):
    norm = _channel_norm(["ln"] * SHAPE[-1])
    collapsed, report = switchnorm.collapse(norm)
    assert isinstance(collapsed, switchnorm.CollapsedNorm)
    assert (report.layers[0].mean, report.layers[0].var, report.layers[0].mean_dropped) == ("ln", "ln", 0.0)
    np.testing.assert_allclose(collapsed(x), norm(x), rtol=0, atol=1e-6)


def test_a_channel_layer_collapses_only_where_every_channel_chose_alike():
    # 7 of 8 channels put 0.99 on ln, one puts it on bn: 0.87 on ln on average, 0.0 at the least.
    norm = _channel_norm(["ln"] * 7 + ["bn"], mixing="softmax")
    norm.mean_logits[...] = norm.mean_logits[...] * 3
    norm.var_logits[...] = norm.var_logits[...] * 3
    assert switchnorm.mixing_weights(norm)[""]["mean"]["ln"] > 0.85
    collapsed, report = switchnorm.collapse(norm, min_weight=0.85)
    assert report.layers[0].form == "kept" and isinstance(collapsed, switchnorm.SwitchNorm)
    alike = _channel_norm(["ln"] * 8, mixing="softmax")
    alike.mean_logits[...] = alike.mean_logits[...] * 3
    alike.var_logits[...] = alike.var_logits[...] * 3
    least = float(jax.nn.softmax(alike.mean_logits[...], axis=0)[2].min())  # the channel ln is weakest in
    _, report = switchnorm.collapse(alike)
    assert report.layers[0].form == "normalizer"
    np.testing.assert_allclose(report.layers[0].mean_dropped, 1.0 - least, rtol=1e-5)


def test_a_sample_layer_is_refused_naming_it_and_its_weights():
    net = Net("softmax")
    net.norm2 = switchnorm.SwitchNorm(SHAPE[-1], weights="sample", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 'norm2' has weights='sample'.*no fixed choice"):
        switchnorm.collapse(net)


@pytest.mark.parametrize("bad", [0.5, 0.2, 1.01, float("nan")])
def test_min_weight_outside_half_to_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"min_weight must be in \(0.5, 1\], got"):
        switchnorm.collapse(_net(), min_weight=bad)


def test_a_non_number_min_weight_is_refused():
    with pytest.raises(TypeError, match="min_weight must be a number"):
        switchnorm.collapse(_net(), min_weight=True)


def test_a_model_without_switch_norm_is_refused():
    with pytest.raises(ValueError, match="no switchnorm.SwitchNorm in the Linear"):
        switchnorm.collapse(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="expects an NNX module"):
        switchnorm.collapse({"params": {}})


def test_the_module_does_not_share_the_function_s_name():
    """``switchnorm.collapse`` is the function; its module is importable as ``switchnorm._collapse``."""
    import importlib

    module = importlib.import_module("switchnorm._collapse")
    assert module.collapse is switchnorm.collapse and callable(switchnorm.collapse)
    assert not hasattr(switchnorm.collapse, "__path__") and module.__name__ == "switchnorm._collapse"


# -- switchnorm train --norm ssn, switchnorm collapse ------------------------------------------------

SSN = ["train", "--dataset", "synthetic", "--norm", "ssn", "--epochs", "2", "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def ssn_run(tmp_path_factory):
    """A finished two-epoch ssn run (16 steps) on the synthetic set, trained once per module."""
    from switchnorm.train.cli import main

    out = tmp_path_factory.mktemp("ssn") / "ssn"
    assert main([*SSN, "--out", str(out)]) == 0
    return out


def test_an_ssn_run_ends_with_every_layer_one_hot_at_radius_one(ssn_run):
    from switchnorm.train.cli import _restore_model

    _, model, _, _ = _restore_model(ssn_run)
    weights = switchnorm.mixing_weights(model)
    assert len(weights) == 2
    for layer in weights.values():
        for row in layer.values():
            assert sorted(row.values()) == [0.0, 1.0]
    radii = [float(r[...]) for r in jax.tree.leaves(nnx.state(model, switchnorm.MixingRadius))]
    assert radii == [1.0, 1.0]
    # The logits were trained: they start tied at zero, where only radius 0 has a gradient.
    for norm in model.norms:
        assert np.ptp(np.asarray(norm.mean_logits[...])) > 0 and np.ptp(np.asarray(norm.var_logits[...])) > 0


def test_the_radius_rises_linearly_during_an_ssn_run():
    from switchnorm.train import build_model, load_dataset
    from switchnorm.train.loop import TrainConfig, Trainer

    data = load_dataset("synthetic")
    model = build_model("mlp", data.input_shape, data.num_classes, norm="ssn")
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=128), data)  # 4 steps
    state = trainer.initial_state()
    for step in (1, 2, 3, 4):  # the step's radius: 0, 1/3, 2/3, 1
        state, _, _ = trainer.train_step(state, data.x_train[:128], data.y_train[:128])
        radii = jax.tree.leaves(nnx.state(trainer.model_at(state), switchnorm.MixingRadius))
        np.testing.assert_allclose([float(r[...]) for r in radii], [(step - 1) / 3] * 2, rtol=1e-6)


def test_collapse_command_writes_a_run_that_inspect_reads(ssn_run, tmp_path, capsys):
    from checkpoint_files import snapshot

    from switchnorm.train.cli import _restore_model, main

    before = snapshot(ssn_run)
    new = tmp_path / "collapsed"
    assert main(["collapse", str(ssn_run), "--out", str(new)]) == 0
    printed = capsys.readouterr().out
    _, source, _, _ = _restore_model(ssn_run)
    choices = {  # what each layer learned: its one-hot mean and variance weights
        path: tuple(max(row, key=row.get) for row in (layer["mean"], layer["var"]))
        for path, layer in switchnorm.mixing_weights(source).items()
    }
    for path, (mean, var) in choices.items():
        assert f"{path}  {mean}/{var}" in printed, printed
    assert "test accuracy before" in printed
    assert snapshot(ssn_run) == before
    summary = json.loads((new / "summary.json").read_text())
    assert summary["test_accuracy"] == summary["test_accuracy_before"]
    assert summary["max_change"] <= 1e-5 and summary["collapsed_layers"] == 2
    _, model, step, epoch = _restore_model(new)
    assert (step, epoch) == (16, 2)
    for norm, (mean, var) in zip(model.norms, choices.values(), strict=True):
        folded = (mean, var) == ("bn", "bn")
        assert isinstance(norm, switchnorm.ChannelAffine if folded else switchnorm.CollapsedNorm)
    x = jnp.ones((3, 8))
    np.testing.assert_allclose(model(x), source(x), rtol=1e-6, atol=1e-6)
    assert main(["inspect", str(new)]) == 0
    shown = capsys.readouterr().out
    for path, (mean, var) in choices.items():
        form = "x * a + b (folded bn)" if (mean, var) == ("bn", "bn") else f"mean {mean}, var {var}"
        assert f"{path}: {form}" in shown, shown
    assert main(["train", "--out", str(new), "--resume"]) == 2
    assert "cannot be trained further" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("min weight too low", ["--min-weight", "0.5"], "--min-weight: must be a number in (0.5, 1]"),
        ("out is the run", ["--out", "SELF"], "is the run itself"),
        ("out holds a run", ["--out", "OTHER"], "already holds a run"),
    ],
)
def test_collapse_command_refuses_bad_input_with_exit_2(ssn_run, run, tmp_path, capsys, case, flags, message):
    from switchnorm.train.cli import main

    flags = [{"SELF": str(ssn_run), "OTHER": str(run)}.get(f, f) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "new")]
    assert main(["collapse", str(ssn_run), *out, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_collapse_command_refuses_a_run_whose_layers_have_not_chosen(run, tmp_path, capsys):
    from switchnorm.train.cli import main

    assert main(["collapse", str(run), "--out", str(tmp_path / "new")]) == 2
    assert "train with --norm ssn" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_collapse_command_refuses_an_unfinished_run(ssn_run, tmp_path, capsys):
    import shutil

    from switchnorm.train.cli import main

    shutil.copytree(ssn_run, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "summary.json").unlink()
    assert main(["collapse", str(tmp_path / "unfinished"), "--out", str(tmp_path / "new")]) == 2
    assert "collapse needs a finished run" in capsys.readouterr().err
