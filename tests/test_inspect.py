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
    # Without a forward pass the dense head's four logits read as all four normalizers; with
    # one, the head reports bn and ln, the two it blends on (N, C) input.
    params = linen_variables["params"]
    forward = lambda v, x: LinenModel().apply(v, x, train=False)  # noqa: E731
    for weights, head in (
        (switchnorm.mixing_weights(linen_variables), switchnorm.NORMALIZERS),
        (
            switchnorm.mixing_weights(linen_variables, batch=jnp.ones((2, 4, 4, 4)), forward=forward),
            ("bn", "ln"),
        ),
    ):
        assert set(weights) == {"stem", "block/norm", "head_norm"}
        used = [switchnorm.NORMALIZERS.index(n) for n in head]
        for path, names, layer, index in (
            ("stem", switchnorm.NORMALIZERS, params["stem"], slice(None)),
            ("block/norm", switchnorm.NORMALIZERS, params["block"]["norm"], slice(None)),
            ("head_norm", head, params["head_norm"], used),
        ):
            mean_logits, var_logits = (np.asarray(layer[k])[index] for k in ("mean_logits", "var_logits"))
            assert_weights_are_softmax(weights[path], names, mean_logits, var_logits)


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


def test_abstract_parameters_from_eval_shape_are_refused_naming_what_they_are():
    # jax.eval_shape / nnx.eval_shape give shapes, no values: a clear error, not "shape ()".
    module = nnx.eval_shape(lambda: switchnorm.SwitchNorm(4, rngs=nnx.Rngs(0)))
    init = functools.partial(snn.SwitchNorm().init, use_running_average=False)
    variables = jax.eval_shape(init, jax.random.key(0), jnp.ones((2, 3, 3, 4)))
    for abstract in (module, variables, variables["params"]):
        with pytest.raises(TypeError, match=r"mean_logits is a jax.ShapeDtypeStruct of shape \(4,\)"):
            switchnorm.mixing_weights(abstract)


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


# --------------------------------------------------------------------------
# Finer weights: weights="channel" (per channel) and "sample" (per sample).
# --------------------------------------------------------------------------


def per_channel_softmax(logits):
    """(K, C) logits -> (C, K): each channel's softmax over the normalizers, in NumPy."""
    return np.stack([reference.softmax(column) for column in np.asarray(logits, np.float64).T])


def per_sample_weights(x, logits, sample_map, normalizers, num_groups=1, epsilon=1e-5):
    """(2, N, K): the weights of each sample from the definition in switchnorm._mixing, in NumPy.

    ``logits`` is the (2, K) stack of the mean and variance logits; bn's statistics are the batch's.
    """
    x = np.asarray(x, np.float64)
    spatial = tuple(range(1, x.ndim - 1))
    cell_mean, cell_var = x.mean(axis=spatial), x.var(axis=spatial)  # (N, C)
    descriptors = []
    for name in normalizers:
        mean, var = (
            np.broadcast_to(a, x.shape).mean(axis=spatial) for a in reference.scope_stats(x, name, num_groups)
        )
        descriptors.append(np.log1p(np.mean((cell_mean - mean) ** 2 / (var + epsilon), axis=1)))
        descriptors.append(np.mean(np.log((cell_var + epsilon) / (var + epsilon)), axis=1))
    d = np.stack(descriptors, axis=1)  # (N, 2K)
    z = np.asarray(logits, np.float64)[:, None, :] + np.einsum(
        "nd,tdk->tnk", d, np.asarray(sample_map, np.float64)
    )
    return np.stack([[reference.softmax(row) for row in z[t]] for t in range(2)])


def channel_layer(rng, channels=6, **kwargs):
    layer = switchnorm.SwitchNorm(channels, weights="channel", rngs=nnx.Rngs(0), **kwargs)
    k = len(layer.normalizers)
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=(k, channels)), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=(k, channels)), jnp.float32)
    return layer


def test_a_channel_layer_reports_the_mean_of_its_channels_softmaxes(rng):
    layer = channel_layer(rng)
    arrays = switchnorm.mixing_weight_arrays(layer)[""]
    weights = switchnorm.mixing_weights(layer)[""]
    for kind, logits in (("mean", layer.mean_logits[...]), ("var", layer.var_logits[...])):
        want = per_channel_softmax(logits)
        np.testing.assert_allclose(getattr(arrays, kind), want, rtol=1e-6)
        assert list(weights[kind]) == list(switchnorm.NORMALIZERS)
        np.testing.assert_allclose(list(weights[kind].values()), want.mean(axis=0), rtol=1e-6)
    assert arrays.weights == "channel" and arrays.names == switchnorm.NORMALIZERS


def test_a_linen_channel_layer_reads_from_its_variables_as_the_nnx_one(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
    variables = snn.SwitchNorm(weights="channel").init(jax.random.key(0), x, use_running_average=False)
    nnx_layer = channel_layer(rng)
    params = {
        **variables["params"],
        "mean_logits": nnx_layer.mean_logits[...],
        "var_logits": nnx_layer.var_logits[...],
    }
    linen = switchnorm.mixing_weights({**variables, "params": params})
    assert linen == switchnorm.mixing_weights(nnx_layer)


class ChannelStack(nnx.Module):
    """``copies`` channel layers of 4 channels built by nnx.vmap: logits (copies, K, C)."""

    def __init__(self, copies, rngs):
        @nnx.split_rngs(splits=copies)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NormBlock(rngs, weights="channel")

        self.blocks = create(rngs)


@pytest.mark.parametrize("copies", [3, 4])  # 4 == K == C: a transposed read keeps every shape
def test_a_stack_of_channel_layers_reads_one_entry_per_copy(rng, copies):
    model = ChannelStack(copies, nnx.Rngs(0))
    mean_logits = rng.normal(size=(copies, 4, 4))
    var_logits = rng.normal(size=(copies, 4, 4))
    model.blocks.norm.mean_logits[...] = jnp.asarray(mean_logits, jnp.float32)
    model.blocks.norm.var_logits[...] = jnp.asarray(var_logits, jnp.float32)
    arrays = switchnorm.mixing_weight_arrays(model)
    assert list(arrays) == [f"blocks/norm[{i}]" for i in range(copies)]
    for i in range(copies):
        np.testing.assert_allclose(
            arrays[f"blocks/norm[{i}]"].mean, per_channel_softmax(mean_logits[i]), rtol=1e-6
        )
        np.testing.assert_allclose(
            arrays[f"blocks/norm[{i}]"].var, per_channel_softmax(var_logits[i]), rtol=1e-6
        )


def sample_layer(rng, channels=6, **kwargs):
    layer = switchnorm.SwitchNorm(channels, weights="sample", rngs=nnx.Rngs(0), **kwargs)
    k = len(layer.normalizers)
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.sample_map[...] = jnp.asarray(rng.normal(size=(2, 2 * k, k)) * 0.5, jnp.float32)
    return layer


class SampleModel(nnx.Module):
    """A convolution, then one weights="sample" layer: its input is not the model's."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.norm = switchnorm.SwitchNorm(6, weights="sample", num_groups=3, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


def test_a_sample_layer_reports_the_mean_over_the_batch_of_each_samples_weights(rng):
    model = SampleModel(nnx.Rngs(0))
    randomized = sample_layer(rng, num_groups=3)
    model.norm.mean_logits[...], model.norm.var_logits[...] = (
        randomized.mean_logits[...],
        randomized.var_logits[...],
    )
    model.norm.sample_map[...] = randomized.sample_map[...]
    x = reference.channel_input(rng, (5, 4, 4, 3)).astype(np.float32)
    want = per_sample_weights(
        model.conv(x),  # the layer's own input
        np.stack([model.norm.mean_logits[...], model.norm.var_logits[...]]),
        model.norm.sample_map[...],
        switchnorm.NORMALIZERS,
        num_groups=3,
    )
    arrays = switchnorm.mixing_weight_arrays(model, batch=x)["norm"]
    assert arrays.weights == "sample" and arrays.mean.shape == (5, 4)
    np.testing.assert_allclose(arrays.mean, want[0], rtol=1e-4)
    np.testing.assert_allclose(arrays.var, want[1], rtol=1e-4)
    assert np.ptp(want[0], axis=0).max() > 0.05  # the samples do differ
    weights = switchnorm.mixing_weights(model, batch=x)["norm"]
    np.testing.assert_allclose(list(weights["mean"].values()), want[0].mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(list(weights["var"].values()), want[1].mean(axis=0), rtol=1e-4)


def test_sample_weights_read_under_a_mask_are_those_of_the_masked_in_elements(rng):
    # Padding at the end of each sequence, masked out: the weights each sample got are those
    # of its unpadded elements alone, as the layer's statistics are.
    layer = sample_layer(rng, num_groups=3)
    x = jnp.asarray(reference.channel_input(rng, (4, 5, 6)), jnp.float32)
    padded = jnp.concatenate([x, 1e3 * jnp.ones((4, 3, 6))], axis=1)
    mask = jnp.arange(8)[None, :, None] < 5
    masked = switchnorm.mixing_weight_arrays(
        layer, batch=padded, forward=lambda m, b: m(b, mask=jnp.broadcast_to(mask, b.shape))
    )[""]
    unpadded = switchnorm.mixing_weight_arrays(layer, batch=x)[""]
    np.testing.assert_allclose(masked.mean, unpadded.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked.var, unpadded.var, rtol=1e-5, atol=1e-6)


def test_reading_sample_weights_in_training_mode_leaves_the_running_averages(rng):
    layer = sample_layer(rng)
    before = np.asarray(layer.mean[...])
    switchnorm.mixing_weights(
        layer, batch=jnp.asarray(reference.channel_input(rng, (4, 3, 3, 6)), jnp.float32)
    )
    np.testing.assert_array_equal(layer.mean[...], before)


def test_sample_weights_in_evaluation_mode_use_the_running_averages_for_bn(rng):
    layer = sample_layer(rng, normalizers=("bn", "in"))
    layer.mean[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=6), jnp.float32)
    layer.eval()
    x = reference.channel_input(rng, (4, 3, 3, 6))
    got = switchnorm.mixing_weight_arrays(layer, batch=jnp.asarray(x, jnp.float32))[""]
    cell_mean, cell_var = x.mean(axis=(1, 2)), x.var(axis=(1, 2))
    running_mean, running_var = (
        np.asarray(layer.mean[...], np.float64),
        np.asarray(layer.var[...], np.float64),
    )
    d = np.stack(
        [
            np.log1p(np.mean((cell_mean - running_mean) ** 2 / (running_var + 1e-5), axis=1)),
            np.mean(np.log((cell_var + 1e-5) / (running_var + 1e-5)), axis=1),
            np.zeros(4),  # in: each sample's own statistics
            np.zeros(4),
        ],
        axis=1,
    )
    logits = np.stack([layer.mean_logits[...], layer.var_logits[...]]).astype(np.float64)
    z = logits[:, None, :] + np.einsum("nd,tdk->tnk", d, np.asarray(layer.sample_map[...], np.float64))
    np.testing.assert_allclose(got.mean, [reference.softmax(row) for row in z[0]], rtol=1e-4)
    np.testing.assert_allclose(got.var, [reference.softmax(row) for row in z[1]], rtol=1e-4)


def test_a_sample_layer_without_a_batch_is_an_error_naming_it_and_batch():
    model = SampleModel(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"layer 'norm' has weights='sample'.*pass batch="):
        switchnorm.mixing_weights(model)
    with pytest.raises(ValueError, match=r"layer 'norm' has weights='sample'.*pass batch="):
        switchnorm.mixing_weight_arrays(model)


def test_a_linen_sample_layer_reads_through_forward_as_the_nnx_one(rng):
    layer = sample_layer(rng)
    x = jnp.asarray(reference.channel_input(rng, (4, 3, 3, 6)), jnp.float32)
    module = snn.SwitchNorm(weights="sample")
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    params = {
        **variables["params"],
        **{k: getattr(layer, k)[...] for k in ("mean_logits", "var_logits", "sample_map")},
    }
    variables = {**variables, "params": params}
    with pytest.raises(ValueError, match=r"layer '' has weights='sample'.*forward="):
        switchnorm.mixing_weights(variables, batch=x)

    def forward(v, batch):
        return module.apply(v, batch, use_running_average=False, mutable=["batch_stats"])

    linen = switchnorm.mixing_weight_arrays(variables, batch=x, forward=forward)[""]
    nnx_arrays = switchnorm.mixing_weight_arrays(layer, batch=x)[""]
    np.testing.assert_allclose(linen.mean, nnx_arrays.mean, rtol=1e-6)
    np.testing.assert_allclose(linen.var, nnx_arrays.var, rtol=1e-6)


def test_a_sample_layer_called_under_a_transform_is_refused(rng):
    model = ScannedStack(2, nnx.Rngs(0), weights="sample")
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    with pytest.raises(ValueError, match="eager forward pass.*under a JAX transform"):
        switchnorm.mixing_weights(model, batch=x)


def test_format_shows_mean_and_spread_for_channel_and_sample_layers_only(rng):
    model = nnx.List(
        [channel_layer(rng, 4), sample_layer(rng, 4), switchnorm.SwitchNorm(4, rngs=nnx.Rngs(0))]
    )
    x = jnp.asarray(reference.channel_input(rng, (5, 3, 3, 4)), jnp.float32)
    forward = lambda m, b: m[2](m[1](m[0](b)))  # noqa: E731
    arrays = switchnorm.mixing_weight_arrays(model, batch=x, forward=forward)
    lines = switchnorm.format_mixing_weights(arrays).splitlines()
    assert lines[0].split() == ["layer", "kind", "bn", "in", "ln", "gn"]
    rows = [(path, kind) for path in ("0", "1", "2") for kind in ("mean", "var")]
    for line, (path, kind) in zip(lines[2:], rows, strict=True):
        cells = [cell.rstrip("*") for cell in line.split()[-4:]]
        if path == "2":  # layer weights: as before, no spread
            assert cells == ["0.250"] * 4
            continue
        w = getattr(arrays[path], kind).astype(np.float64)
        spread = zip(w.mean(axis=0), w.std(axis=0), strict=True)
        assert cells == [f"{m:.3f}±{s:.3f}" for m, s in spread]
    summaries = switchnorm.mixing_weights(model, batch=x, forward=forward)
    assert "±" not in switchnorm.format_mixing_weights(summaries)  # floats alone carry no spread


# --------------------------------------------------------------------------
# switchnorm inspect / plot of a run whose layers blend per sample.
# --------------------------------------------------------------------------


class SampleRunConfig:
    """A run's config as config.json says it for ``weights="sample"`` layers."""

    weights = "sample"

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        return getattr(self._config, name)


@pytest.fixture
def sample_run(run, monkeypatch, rng):
    """The finished synthetic run, read as if its two layers blended per sample (random maps)."""
    from switchnorm.train import cli
    from switchnorm.train.rundir import RunDir

    config, model, step, epoch = cli._restore_model(run)
    for i, norm in enumerate(model.norms):
        layer = sample_layer(rng, norm.num_features, normalizers=("bn", "ln"))
        layer.mean[...], layer.var[...] = norm.mean[...], norm.var[...]
        layer.eval()
        model.norms[i] = layer
    read_config = RunDir.read_config
    monkeypatch.setattr(RunDir, "read_config", lambda self: SampleRunConfig(read_config(self)))
    monkeypatch.setattr(cli, "_restore_model", lambda out: (SampleRunConfig(config), model, step, epoch))
    return model


def test_inspect_shows_a_sample_runs_weights_over_its_test_set(run, sample_run, capsys):
    from switchnorm.train import data, report
    from switchnorm.train.cli import main

    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    test_set = jnp.asarray(data.load_dataset("synthetic", 0).x_test)
    want = switchnorm.mixing_weight_arrays(sample_run, batch=test_set)
    assert want["norms/0"].mean.shape == (256, 2)
    assert switchnorm.format_mixing_weights(report.learned(want)) in out
    assert "±" in out and "mean±std" in out


def test_plot_draws_a_sample_runs_spread_and_its_per_sample_distribution(workspace, sample_run, capsys):
    from switchnorm.train import rundir
    from switchnorm.train.cli import main

    tiny = workspace / "tiny"
    (tiny / "final_weights.png").unlink()
    assert main(["plot", str(tiny)]) == 0
    for name in ("final_weights.png", rundir.DISTRIBUTION_FIGURE):
        assert (tiny / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tiny / rundir.DISTRIBUTION_FIGURE) in capsys.readouterr().out


def test_the_distribution_figure_splits_samples_by_group_and_checks_the_labels(rng, tmp_path):
    from switchnorm.train import plots

    layer = sample_layer(rng, 4)
    arrays = switchnorm.mixing_weight_arrays(
        layer, batch=jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
    )
    path = plots.plot_weight_distribution(arrays, tmp_path / "d.png", groups=["clean"] * 3 + ["altered"] * 3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="groups has 5 labels for a batch of 6 samples"):
        plots.plot_weight_distribution(arrays, tmp_path / "e.png", groups=["clean"] * 5)
    assert (
        plots.plot_weight_distribution(
            switchnorm.mixing_weight_arrays(channel_layer(rng)), tmp_path / "f.png"
        )
        is None
    )
