"""Reading learned mixing weights: ``switchnorm.mixing_weights`` and its table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import linen as nn
from flax import nnx

import switchnorm
from switchnorm import linen as snn


def randomize_logits(layer, rng):
    k = len(layer.normalizers)
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)


def assert_weights_are_softmax(layer_weights, names, mean_logits, var_logits):
    for kind, logits in (("mean", mean_logits), ("var", var_logits)):
        weights = layer_weights[kind]
        assert list(weights) == list(names)
        assert all(isinstance(w, float) for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(list(weights.values()), reference.softmax(logits), rtol=1e-6)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.norm = switchnorm.SwitchNorm(4, normalizers=("gn", "ln"), num_groups=2, rngs=rngs)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.stem = switchnorm.SwitchNorm(4, rngs=rngs)
        self.block = Block(rngs)
        self.head_norm = switchnorm.SwitchNorm(4, normalizers=("bn", "ln"), rngs=rngs)


def test_nnx_model_with_nested_layers(rng):
    model = Model(nnx.Rngs(0))
    for layer in (model.stem, model.block.norm, model.head_norm):
        randomize_logits(layer, rng)
    weights = switchnorm.mixing_weights(model)
    assert set(weights) == {"stem", "block/norm", "head_norm"}
    for path, layer in (
        ("stem", model.stem),
        ("block/norm", model.block.norm),
        ("head_norm", model.head_norm),
    ):
        assert_weights_are_softmax(
            weights[path], layer.normalizers, layer.mean_logits[...], layer.var_logits[...]
        )


def test_a_single_nnx_layer_has_the_empty_path_and_starts_uniform():
    weights = switchnorm.mixing_weights(switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0)))
    assert list(weights) == [""]
    for kind in ("mean", "var"):
        assert weights[""][kind] == {"bn": 0.25, "in": 0.25, "ln": 0.25, "gn": 0.25}


def test_nnx_state_reads_like_the_module(rng):
    model = Model(nnx.Rngs(0))
    for layer in (model.stem, model.head_norm):
        randomize_logits(layer, rng)
    from_state = switchnorm.mixing_weights(nnx.state(model), normalizers={"block/norm": ("gn", "ln")})
    assert from_state == switchnorm.mixing_weights(model)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        return snn.SwitchNorm(name="norm")(x, use_running_average=not train)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = snn.SwitchNorm(name="stem")(x, use_running_average=not train)
        x = LinenBlock(name="block")(x, train)
        x = x.reshape(x.shape[0], -1)
        return snn.SwitchNorm(name="head_norm")(x, use_running_average=not train)


@functools.cache
def init_linen_model():
    init = jax.jit(lambda x: LinenModel().init(jax.random.key(0), x, train=True))
    return init(jnp.ones((2, 4, 4, 4)))


@pytest.fixture
def linen_variables(rng):
    variables = init_linen_model()
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: (
            jnp.asarray(rng.normal(size=p.shape), p.dtype) if path[-1].key.endswith("logits") else p
        ),
        variables["params"],
    )
    return {**variables, "params": params}


def test_layers_come_in_the_order_of_the_tree():
    logits = {"mean_logits": np.zeros(4), "var_logits": np.zeros(4)}
    tree = {"stem": logits, "block": {"norm": logits, "dense": {"kernel": np.ones(2)}}, "head": logits}
    assert list(switchnorm.mixing_weights(tree)) == ["stem", "block/norm", "head"]


def test_linen_variables_dict(linen_variables):
    weights = switchnorm.mixing_weights(linen_variables)
    assert set(weights) == {"stem", "block/norm", "head_norm"}
    params = linen_variables["params"]
    for path, names, layer in (
        ("stem", switchnorm.NORMALIZERS, params["stem"]),
        ("block/norm", switchnorm.NORMALIZERS, params["block"]["norm"]),
        ("head_norm", ("bn", "ln"), params["head_norm"]),  # dense input: the 2-logit default
    ):
        assert_weights_are_softmax(weights[path], names, layer["mean_logits"], layer["var_logits"])


def test_params_tree_reads_like_the_variables_dict(linen_variables):
    assert switchnorm.mixing_weights(linen_variables["params"]) == switchnorm.mixing_weights(linen_variables)


def test_ambiguous_logits_length_is_an_error_until_named(rng):
    tree = {"norm": {"mean_logits": np.zeros(3), "var_logits": rng.normal(size=3)}}
    with pytest.raises(ValueError, match=r"'norm' has 3 logits.*normalizers="):
        switchnorm.mixing_weights(tree)
    names = ("in", "ln", "gn")
    for normalizers in (names, {"norm": names}):
        weights = switchnorm.mixing_weights(tree, normalizers=normalizers)
        assert_weights_are_softmax(
            weights["norm"], names, tree["norm"]["mean_logits"], tree["norm"]["var_logits"]
        )


def test_names_that_do_not_match_the_logits_length_are_an_error():
    tree = {"norm": {"mean_logits": np.zeros(4), "var_logits": np.zeros(4)}}
    with pytest.raises(ValueError, match=r"4 logits but normalizers=\('bn', 'ln'\) names 2"):
        switchnorm.mixing_weights(tree, normalizers=("bn", "ln"))


def test_anything_else_is_a_type_error():
    with pytest.raises(TypeError, match="NNX module, a Linen variables dict or a params tree"):
        switchnorm.mixing_weights([1, 2, 3])


def test_format_mixing_weights_shows_every_layer_and_marks_the_dominant_weight():
    tree = {
        "a": {"mean_logits": np.array([2.0, 0, 0, 0]), "var_logits": np.array([0, 0, 0, 3.0])},
        "b": {"mean_logits": np.array([0, 1.0]), "var_logits": np.array([0, 0.0])},
    }
    table = switchnorm.format_mixing_weights(switchnorm.mixing_weights(tree))
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "kind", "bn", "in", "ln", "gn"]
    a_mean, a_var, b_mean = lines[2], lines[3], lines[4]
    top = reference.softmax([2.0, 0, 0, 0])[0]
    assert a_mean.split()[:3] == ["a", "mean", f"{top:.3f}*"]
    assert a_var.split()[-1] == f"{reference.softmax([0, 0, 0, 3.0])[-1]:.3f}*"
    assert b_mean.split()[0] == "b" and "-" in b_mean.split()  # "in"/"gn" absent from layer b


# --------------------------------------------------------------------------
# Stacked layers (nnx.vmap / nnx.scan, nn.scan): one row per copy.
# --------------------------------------------------------------------------


class NormBlock(nnx.Module):
    def __init__(self, rngs, **kwargs):
        self.norm = switchnorm.SwitchNorm(4, rngs=rngs, **kwargs)

    def __call__(self, x):
        return self.norm(x)


class ScannedStack(nnx.Module):
    """``copies`` blocks built by nnx.vmap and run one after the other by nnx.scan."""

    def __init__(self, copies, rngs, **kwargs):
        @nnx.split_rngs(splits=copies)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NormBlock(rngs, **kwargs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return block(x)

        return step(x, self.blocks)


def unstacked_report(mean_logits, var_logits, x=None, **kwargs):
    """What one NNX layer holding these logits reports (after a call on ``x``, if given)."""
    layer = switchnorm.SwitchNorm(4, rngs=nnx.Rngs(0), **kwargs)
    layer.mean_logits[...] = jnp.asarray(mean_logits)
    layer.var_logits[...] = jnp.asarray(var_logits)
    if x is not None:
        layer(x)
    return switchnorm.mixing_weights(layer)[""]


@pytest.mark.parametrize("copies", [3, 4])  # 4 == K: a transposed read would still have the right shape
def test_an_nnx_scan_stack_reads_one_row_per_copy_as_the_unstacked_layer(rng, copies):
    model = ScannedStack(copies, nnx.Rngs(0))
    mean_logits = jnp.asarray(rng.normal(size=(copies, 4)), jnp.float32)
    var_logits = jnp.asarray(rng.normal(size=(copies, 4)), jnp.float32)
    model.blocks.norm.mean_logits[...] = mean_logits
    model.blocks.norm.var_logits[...] = var_logits
    model(jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32))
    weights = switchnorm.mixing_weights(model)
    paths = [f"blocks/norm[{i}]" for i in range(copies)]
    assert list(weights) == paths
    for i, path in enumerate(paths):
        assert weights[path] == unstacked_report(mean_logits[i], var_logits[i])
    table = switchnorm.format_mixing_weights(weights).splitlines()
    assert [line.split()[0] for line in table[2::2]] == paths


def test_an_nnx_stack_called_on_dense_features_reports_the_two_it_blends_per_copy(rng):
    model = ScannedStack(3, nnx.Rngs(0))
    logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    model.blocks.norm.mean_logits[...] = logits
    model.blocks.norm.var_logits[...] = -logits
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    model(x)
    weights = switchnorm.mixing_weights(model)
    for i in range(3):
        assert list(weights[f"blocks/norm[{i}]"]["mean"]) == ["bn", "ln"]
        assert weights[f"blocks/norm[{i}]"] == unstacked_report(logits[i], -logits[i], x)


def test_a_stack_of_sparsestmax_layers_reads_each_copy_at_its_own_radius(rng):
    radii = jnp.array([0.0, 0.45, 0.9], jnp.float32)
    model = ScannedStack(3, nnx.Rngs(0), mixing="sparsestmax")
    logits = jnp.asarray(rng.normal(size=(3, 4)) * 0.3, jnp.float32)
    model.blocks.norm.mean_logits[...] = logits
    model.blocks.norm.var_logits[...] = logits[::-1]
    model.blocks.norm.radius[...] = radii
    weights = switchnorm.mixing_weights(model)
    for i in range(3):
        single = switchnorm.SwitchNorm(4, mixing="sparsestmax", rngs=nnx.Rngs(0))
        single.mean_logits[...], single.var_logits[...] = logits[i], logits[::-1][i]
        switchnorm.set_radius(single, radii[i])
        assert weights[f"blocks/norm[{i}]"] == switchnorm.mixing_weights(single)[""]
    tree = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    tree["mixing_radius"] = {"blocks": {"norm": {"radius": radii}}}
    assert switchnorm.mixing_weights(tree) == weights  # the Linen path reads the radius per copy too


class LinenNormBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return snn.SwitchNorm(name="norm")(x, use_running_average=False), None


class LinenScannedModel(nn.Module):
    copies: int

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            LinenNormBlock,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=self.copies,
        )
        return scan(name="blocks")(x, None)[0]


@pytest.mark.parametrize("copies", [3, 4])
def test_a_linen_scan_stack_reads_one_row_per_copy_as_the_unstacked_layer(rng, copies):
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    variables = LinenScannedModel(copies).init(jax.random.key(0), x)
    stacked = variables["params"]["blocks"]["norm"]
    assert stacked["mean_logits"].shape == (copies, 4)
    mean_logits = jnp.asarray(rng.normal(size=(copies, 4)), jnp.float32)
    var_logits = jnp.asarray(rng.normal(size=(copies, 4)), jnp.float32)
    params = {"blocks": {"norm": {**stacked, "mean_logits": mean_logits, "var_logits": var_logits}}}
    weights = switchnorm.mixing_weights({**variables, "params": params})
    assert list(weights) == [f"blocks/norm[{i}]" for i in range(copies)]
    single = snn.SwitchNorm().init(jax.random.key(0), x, use_running_average=False)
    for i in range(copies):
        one = {
            **single,
            "params": {**single["params"], "mean_logits": mean_logits[i], "var_logits": var_logits[i]},
        }
        assert weights[f"blocks/norm[{i}]"] == switchnorm.mixing_weights(one)[""]


def test_logits_with_the_normalizers_off_the_last_axis_are_refused_naming_the_shape():
    layer = switchnorm.SwitchNorm(4, rngs=nnx.Rngs(0))
    layer.mean_logits = nnx.Param(jnp.zeros((4, 3)))  # a stack on axis 1
    layer.var_logits = nnx.Param(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*must be the last axis"):
        switchnorm.mixing_weights(layer)
    with pytest.raises(
        ValueError, match=r"'norm': mean_logits of shape \(3, 4\) and var_logits of shape \(4,\)"
    ):
        switchnorm.mixing_weights({"norm": {"mean_logits": np.zeros((3, 4)), "var_logits": np.zeros(4)}})
    tree = {"params": {"norm": {"mean_logits": np.zeros((3, 4)), "var_logits": np.zeros((3, 4))}}}
    tree["mixing_radius"] = {"norm": {"radius": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"radius of shape \(2,\).*one per copy \(3,\)"):
        switchnorm.mixing_weights(tree)
