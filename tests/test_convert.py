"""From and to plain Flax: ``switchnorm.convert`` and ``switchnorm.collapse(..., flax_layers=True)``.

The references are Flax's own layers: a model of nnx.BatchNorm and nnx.GroupNorm, converted,
must compute what it computed, and collapsed back must be that model again.
"""

import math
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from plain_flax_model import PlainNet

import switchnorm

TESTS = Path(__file__).parent


def batch(seed=0, n=6):
    """Input with an offset and a spread per sample, so that the normalizers' statistics differ."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 7, 7, 3)) * rng.uniform(0.5, 3.0, (n, 1, 1, 1)) + rng.normal(size=(n, 1, 1, 1))
    return jnp.asarray(x, jnp.float32)


def trained_plain_net(steps=3):
    """A PlainNet whose scales, biases and running averages have moved off their initial values."""
    model = PlainNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    target = jnp.arange(6) % 5

    def loss(model, x):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), target).mean()

    for step in range(steps):
        optimizer.update(model, nnx.grad(loss)(model, batch(step)))
    return model


def states_close(a, b, rtol=1e-6, atol=1e-6):
    flat_a, flat_b = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (key, va), (_, vb) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(va[...], vb[...], rtol=rtol, atol=atol, err_msg=str(key))


@pytest.fixture(scope="module")
def plain():
    return trained_plain_net()


def test_converted_model_computes_the_source_in_training_and_evaluation(plain):
    source, converted = nnx.clone(plain), switchnorm.convert(plain)
    assert [type(m).__name__ for m in (converted.bn1, converted.gn, converted.bn2)] == ["SwitchNorm"] * 3
    assert converted.gn.num_groups == 4 and converted.gn.epsilon == 1e-6
    assert converted.bn1.momentum == 0.9 and converted.bn2.epsilon == 1e-3
    for step in range(2):  # training mode: batch statistics; the running averages move alike
        x = batch(10 + step)
        np.testing.assert_allclose(converted(x), source(x), rtol=1e-5, atol=1e-5)
        for name in ("bn1", "bn2"):
            for stat in ("mean", "var"):
                ours, theirs = getattr(converted, name), getattr(source, name)
                np.testing.assert_allclose(
                    getattr(ours, stat)[...], getattr(theirs, stat)[...], rtol=1e-5, atol=1e-6
                )
    converted.eval()
    source.eval()
    np.testing.assert_allclose(converted(batch(20)), source(batch(20)), rtol=1e-5, atol=1e-5)


def test_the_input_model_is_untouched(plain):
    before = nnx.clone(plain)
    converted = switchnorm.convert(plain, 0.5)
    converted(batch(3))  # a training call updates the converted layers' running averages only
    assert type(plain.bn1) is nnx.BatchNorm and type(plain.gn) is nnx.GroupNorm
    states_close(plain, before, rtol=0, atol=0)


@pytest.mark.parametrize("mixing", ["softmax", "sparsestmax"])
@pytest.mark.parametrize("source_weight", [0.7, 1.0])
def test_weights_read_back_and_every_logit_gets_a_gradient(plain, mixing, source_weight):
    model = switchnorm.convert(plain, source_weight, mixing=mixing)
    model(batch(1))  # records each layer's input rank: bn2 on (N, C) blends bn and ln
    weights = switchnorm.mixing_weights(model)
    for path, source, names in (("bn1", "bn", 4), ("gn", "gn", 4), ("bn2", "bn", 2)):
        for kind in ("mean", "var"):
            row = weights[path][kind]
            assert len(row) == names
            if source_weight == 1:  # the others share 2**-24 (float32 rounding may double it)
                assert 1 - 4e-7 <= row[source] <= 1.0
            elif names == 4:
                assert row[source] == pytest.approx(source_weight, abs=1e-6)
                others = [w for n, w in row.items() if n != source]
                np.testing.assert_allclose(others, (1 - source_weight) / 3, atol=1e-6)
            else:  # the documented (N, C) case: bn's and ln's logits alone, so bn weighs more
                assert source_weight < row[source] < 1

    def loss(model):
        return jnp.sum(model(batch(2)) * jnp.arange(5.0))

    grads = nnx.grad(loss)(model)
    for layer, source, blended in (("bn1", 0, [0, 1, 2, 3]), ("gn", 3, [0, 1, 2, 3]), ("bn2", 0, [0, 2])):
        if source_weight == 1:  # the source's own gradient, sum of the others' times -1, rounds to 0
            blended = [i for i in blended if i != source]
        for kind in ("mean_logits", "var_logits"):
            g = np.asarray(grads[layer][kind][...])[blended]
            assert np.all(g != 0), (layer, kind, g)


def test_channel_weights_start_on_the_source_in_every_channel(plain):
    model = switchnorm.convert(plain, 0.8, weights="channel")
    assert model.bn1.mean_logits[...].shape == (4, 8)
    weights = switchnorm.mixing_weight_arrays(model)
    np.testing.assert_allclose(np.asarray(weights["gn"].mean)[..., 3], 0.8, rtol=1e-6)


def test_a_shared_layer_becomes_one_shared_switch_norm():
    model = nnx.List([nnx.BatchNorm(4, rngs=nnx.Rngs(0))])
    model.append(model[0])
    converted = switchnorm.convert(model)
    assert isinstance(converted[0], switchnorm.SwitchNorm) and converted[0] is converted[1]


class ScannedBlocks(nnx.Module):
    """Three Dense + BatchNorm blocks stacked with ``nnx.vmap`` and run with ``nnx.scan``."""

    def __init__(self):
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(key):
            rngs = nnx.Rngs(key)
            return nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs))

        self.blocks = make(jax.random.split(jax.random.key(0), 3))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return nnx.relu(block(x))

        return body(x, self.blocks)


def test_a_stack_of_batch_norms_becomes_a_stack_of_switch_norms():
    source, x = ScannedBlocks(), batch(7)[:, 0, :6, :].repeat(3, axis=-1)[..., :8]  # (N, 6, 8)
    source(x)
    converted = switchnorm.convert(source, 0.6)
    assert converted.blocks.layers[1].mean_logits[...].shape == (3, 4)
    weights = switchnorm.mixing_weights(converted)
    assert [round(weights[f"blocks/layers/1[{i}]"]["var"]["bn"], 6) for i in range(3)] == [0.6] * 3
    exact = switchnorm.convert(source)
    np.testing.assert_allclose(exact(x), source(x), rtol=1e-5, atol=1e-5)


def test_collapse_of_convert_is_the_model_again(plain):
    back, report = switchnorm.collapse(switchnorm.convert(plain), flax_layers=True)
    assert [layer.form for layer in report.layers] == ["flax"] * 3
    assert [type(m) for m in (back.bn1, back.gn, back.bn2)] == [nnx.BatchNorm, nnx.GroupNorm, nnx.BatchNorm]
    for name in ("bn1", "gn", "bn2"):
        for attribute in ("epsilon", "use_fast_variance", "momentum", "num_groups", "axis"):
            assert getattr(getattr(back, name), attribute, None) == getattr(
                getattr(plain, name), attribute, None
            )
    states_close(back, plain, rtol=0, atol=0)
    source = nnx.clone(plain)
    np.testing.assert_allclose(back(batch(4)), source(batch(4)), rtol=1e-6, atol=1e-6)


def layer_choosing(name, rank, axis=-1, var=None):
    """A called SwitchNorm whose logits give ``name`` (and ``var`` for the variance) all the weight."""
    layer = switchnorm.SwitchNorm(8, axis=axis, num_groups=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
    for kind, chosen in (("mean_logits", name), ("var_logits", var or name)):
        getattr(layer, kind)[...] = jnp.where(jnp.arange(4) == layer.normalizers.index(chosen), 0.0, -1e4)
    shape = (4, 5, 6, 8)[: rank - 1] + (8,) if axis == -1 else (4, 8, 5, 6)[:rank]
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    layer(x)
    return layer, x


@pytest.mark.parametrize(
    "name, rank, flax_class",
    [
        ("bn", 4, nnx.BatchNorm),
        ("in", 4, nnx.InstanceNorm),
        ("ln", 4, nnx.LayerNorm),
        ("ln", 3, nnx.LayerNorm),
        ("gn", 4, nnx.GroupNorm),
    ],
)
def test_a_layer_that_chose_one_normalizer_becomes_the_flax_layer(name, rank, flax_class):
    layer, x = layer_choosing(name, rank)
    collapsed, report = switchnorm.collapse(layer, flax_layers=True)
    assert type(collapsed) is flax_class and report.layers[0].form == "flax"
    np.testing.assert_allclose(collapsed(x), layer(x), rtol=1e-5, atol=1e-5)


def test_layers_flax_cannot_express_stay_collapsed_norms():
    mixed, _ = layer_choosing("bn", 4, var="ln")
    channels_first_gn, _ = layer_choosing("gn", 4, axis=1)
    uncalled_ln = switchnorm.SwitchNorm(8, normalizers=("ln",), rngs=nnx.Rngs(0))
    for layer in (mixed, channels_first_gn, uncalled_ln):
        collapsed, report = switchnorm.collapse(layer, flax_layers=True)
        assert type(collapsed) is switchnorm.CollapsedNorm and report.layers[0].form == "normalizer"


def test_a_collapsed_model_of_flax_layers_runs_without_switchnorm(tmp_path, plain):
    converted = switchnorm.convert(plain, 0.999)
    converted.eval()
    collapsed, _ = switchnorm.collapse(converted, min_weight=0.99, flax_layers=True)
    classes = {type(node).__module__ for _, node in nnx.iter_graph(collapsed) if isinstance(node, nnx.Module)}
    assert not any(module.startswith("switchnorm") for module in classes), classes
    x = batch(5)
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(collapsed)))
    (tmp_path / "model.pkl").write_bytes(
        pickle.dumps({"state": state, "x": np.asarray(x), "y": np.asarray(collapsed(x))})
    )
    script = textwrap.dedent(
        f"""
        import pickle, sys
        sys.modules["switchnorm"] = None  # any import of switchnorm now fails
        sys.path.insert(0, {str(TESTS)!r})
        import numpy as np
        from flax import nnx
        from plain_flax_model import PlainNet
        saved = pickle.loads(open({str(tmp_path / "model.pkl")!r}, "rb").read())
        model = PlainNet(nnx.Rngs(1))
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, saved["state"])
        nnx.update(model, state)
        model.eval()
        np.testing.assert_allclose(model(saved["x"]), saved["y"], rtol=1e-6, atol=1e-6)
        try:
            import switchnorm
        except ImportError:
            print("ok without switchnorm")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok without switchnorm" in result.stdout


def test_training_a_collapsed_copy_leaves_the_model_as_it_was(plain):
    model = switchnorm.convert(plain, 0.999)
    before = nnx.clone(model)
    collapsed, _ = switchnorm.collapse(model, flax_layers=True)
    optimizer = nnx.Optimizer(collapsed, optax.sgd(0.1), wrt=nnx.Param)
    optimizer.update(collapsed, nnx.grad(lambda m: jnp.sum(m(batch(6)) ** 2))(collapsed))
    assert not np.allclose(collapsed.conv1.kernel[...], before.conv1.kernel[...])
    states_close(model, before, rtol=0, atol=0)


def test_channel_affine_refuses_training_mode(plain):
    converted = switchnorm.convert(plain)
    converted.eval()
    folded, report = switchnorm.collapse(converted)
    assert {layer.form for layer in report.layers} == {"affine", "normalizer"}
    folded(batch(1))  # inference: fine
    folded.train()
    with pytest.raises(ValueError, match="ChannelAffine .* training mode"):
        folded(batch(1))


# -- Flax's defaults for a layer of one normalizer --------------------------------------------


def test_a_gn_only_layer_takes_group_norms_defaults():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 64)), jnp.float32)
    ours = switchnorm.SwitchNorm(64, normalizers=("gn",), rngs=nnx.Rngs(0))
    theirs = nnx.GroupNorm(64, rngs=nnx.Rngs(0))
    assert (ours.num_groups, ours.epsilon) == (theirs.num_groups, theirs.epsilon) == (32, 1e-6)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="default of 32 groups, which does not divide its 16 channels"):
        switchnorm.SwitchNorm(16, normalizers=("gn",), rngs=nnx.Rngs(0))
    assert switchnorm.SwitchNorm(16, rngs=nnx.Rngs(0)).num_groups == 8  # a blend keeps its default


def test_a_linen_layer_without_bn_needs_no_use_running_average():
    from switchnorm import linen as snn

    x = jnp.ones((2, 4, 4, 32))
    layer = snn.SwitchNorm(normalizers=("gn", "ln"))
    variables = layer.init(jax.random.key(0), x)
    assert layer.apply(variables, x).shape == x.shape
    with pytest.raises(ValueError, match="use_running_average"):
        snn.SwitchNorm().init(jax.random.key(0), x)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0.0, ValueError, r"\(0, 1\]"),
        (1.5, ValueError, "1.5"),
        (math.nan, ValueError, "nan"),
        (True, TypeError, "True"),
        ("a", TypeError, "'a'"),
    ],
)
def test_source_weight_outside_the_interval_is_refused(plain, value, error, match):
    with pytest.raises(error, match=match):
        switchnorm.convert(plain, value)


def test_bad_models_and_arguments_are_refused(plain):
    with pytest.raises(ValueError, match="no nnx.BatchNorm or nnx.GroupNorm in the Linear"):
        switchnorm.convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="expects an NNX module, got dict"):
        switchnorm.convert({"bn": nnx.BatchNorm(2, rngs=nnx.Rngs(0))})
    with pytest.raises(TypeError, match=r"\['epsilon'\]"):
        switchnorm.convert(plain, epsilon=1e-3)
    with pytest.raises(ValueError, match="'bn1'.*leave out 'bn'"):
        switchnorm.convert(plain, normalizers=("ln", "gn"))
    with pytest.raises(ValueError, match="num_groups= but the model holds a GroupNorm at 'gn'"):
        switchnorm.convert(plain, num_groups=2)
    custom = nnx.GroupNorm(8, num_groups=2, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reduction_axes=\\(2, 3\\)"):
        switchnorm.convert(custom)
