"""Flax BatchNorm's arguments on SwitchNorm, each against Flax's own layer given the same argument.

``axis``, ``use_fast_variance`` (both front ends), ``promote_dtype``, ``scale_metadata`` and
``bias_metadata`` (NNX), ``force_float32_reductions`` (Linen): a Flax user's BatchNorm call
works unchanged with SwitchNorm, and with ``normalizers=("bn",)`` computes what BatchNorm does.
"""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from reference import ALL, data

import switchnorm
from switchnorm import linen as snn

C = 5
CHANNELS_FIRST = {3: (4, C, 6), 4: (3, C, 4, 3)}
"""Channels-first inputs (features on axis 1) of rank 3 and 4."""


def nnx_step(layer, x):
    return nnx.jit(lambda m, x: m(x))(layer, x)


@functools.partial(jax.jit, static_argnums=0)
def linen_train(module, variables, x):
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def linen_infer(module, variables, x):
    return module.apply(variables, x, use_running_average=True)


def train_beside_flax(ours, theirs, x):
    """One training step of a bn-only Linen SwitchNorm and a Flax BatchNorm from the same variables.

    Returns ``((y, updates), (want, want_updates))``; ours gets the one-normalizer logits added.
    """
    variables = theirs.init(jax.random.key(0), x, use_running_average=False)
    logits = {"mean_logits": jnp.zeros(1), "var_logits": jnp.zeros(1)}
    ours_variables = {**variables, "params": {**variables["params"], **logits}}
    return linen_train(ours, ours_variables, x), linen_train(theirs, variables, x)


def random_logits(layer, rng):
    k = len(layer.normalizers)
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)


# --------------------------------------------------------------------------
# The signature: every BatchNorm argument, in BatchNorm's order, documented.
# --------------------------------------------------------------------------


def documented(cls):
    """The attribute names of ``cls``'s docstring, in their order."""
    doc = inspect.getdoc(cls)
    block = doc[doc.index("Attributes:") :].splitlines()[1:]
    return [
        line.split(":")[0].strip() for line in block if line.startswith("  ") and not line.startswith("   ")
    ]


def test_the_nnx_layer_takes_every_nnx_batchnorm_argument_in_its_order():
    theirs = list(inspect.signature(nnx.BatchNorm.__init__).parameters)[1:]
    ours = list(inspect.signature(switchnorm.SwitchNorm.__init__).parameters)[1:]
    assert ours[: len(theirs)] == theirs
    assert [a for a in documented(switchnorm.SwitchNorm) if a in theirs] == theirs


def test_the_linen_layer_takes_every_batchnorm_attribute_in_its_order():
    def fields(cls):
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]

    theirs, ours = fields(nn.BatchNorm), fields(snn.SwitchNorm)
    assert ours[: len(theirs)] == theirs  # so positional arguments mean the same
    assert [a for a in documented(snn.SwitchNorm) if a in theirs] == theirs
    shared = [a for a in documented(switchnorm.SwitchNorm) if a in ours]
    assert shared == [a for a in documented(snn.SwitchNorm) if a in shared]  # NNX and Linen agree


# --------------------------------------------------------------------------
# axis: the feature axis.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank, axis", [(3, 1), (4, 1), (4, -3)])
def test_nnx_axis_equals_the_layer_on_channels_last_input_moved_back(rng, rank, axis):
    moved = switchnorm.SwitchNorm(C, axis=axis, num_groups=1, rngs=nnx.Rngs(0))
    last = switchnorm.SwitchNorm(C, num_groups=1, rngs=nnx.Rngs(0))
    random_logits(moved, rng)
    last.mean_logits[...], last.var_logits[...] = moved.mean_logits[...], moved.var_logits[...]
    for mode in ("train", "eval"):
        getattr(moved, mode)(), getattr(last, mode)()
        x = jnp.moveaxis(data(rng, CHANNELS_FIRST[rank][:1] + CHANNELS_FIRST[rank][2:] + (C,)), -1, 1)
        y = nnx_step(moved, x)
        assert y.shape == x.shape
        np.testing.assert_allclose(y, jnp.moveaxis(nnx_step(last, jnp.moveaxis(x, 1, -1)), -1, 1), atol=1e-6)
        np.testing.assert_allclose(moved.mean[...], last.mean[...], atol=1e-7)


def test_axis_1_on_rank_3_input_whose_length_equals_the_channels_is_the_channels_last_layer(rng):
    # (N, C, L) with L == C: a layer that took the last axis for the channels would give
    # output of the right shape, from the wrong statistics and parameters.
    x = jnp.moveaxis(data(rng, (4, C, C)), -1, 1)  # (N, C, L) from (N, L, C)
    moved = switchnorm.SwitchNorm(C, axis=1, num_groups=1, rngs=nnx.Rngs(0))
    last = switchnorm.SwitchNorm(C, num_groups=1, rngs=nnx.Rngs(0))
    random_logits(moved, rng)
    last.mean_logits[...], last.var_logits[...] = moved.mean_logits[...], moved.var_logits[...]
    moved.scale[...] = last.scale[...] = jnp.arange(1.0, C + 1.0)
    want = jnp.moveaxis(nnx_step(last, jnp.moveaxis(x, 1, -1)), -1, 1)
    np.testing.assert_allclose(nnx_step(moved, x), want, atol=1e-6)
    np.testing.assert_allclose(moved.mean[...], last.mean[...], atol=1e-7)

    linen_moved, linen_last = snn.SwitchNorm(axis=1, num_groups=1), snn.SwitchNorm(num_groups=1)
    variables = linen_moved.init(jax.random.key(0), x, use_running_average=False)
    params = {
        **variables["params"],
        "mean_logits": moved.mean_logits[...],
        "var_logits": moved.var_logits[...],
        "scale": moved.scale[...],
    }
    variables = {**variables, "params": params}
    y, updates = linen_train(linen_moved, variables, x)
    y_last, updates_last = linen_train(linen_last, variables, jnp.moveaxis(x, 1, -1))
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(y, jnp.moveaxis(y_last, -1, 1), atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], updates_last["batch_stats"]["mean"], atol=1e-7)


@pytest.mark.parametrize("rank", [3, 4])
def test_nnx_axis_with_bn_alone_equals_flax_batchnorm_with_that_axis(rng, rank):
    ours = switchnorm.SwitchNorm(C, axis=1, normalizers=("bn",), rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, axis=1, use_fast_variance=False, rngs=nnx.Rngs(0))
    for step in range(2):
        x = jnp.moveaxis(data(rng, (4, 3, 2, C)[: rank - 1] + (C,), offset=step), -1, 1)
        np.testing.assert_allclose(nnx_step(ours, x), nnx_step(theirs, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = jnp.moveaxis(data(rng, (4, 3, 2, C)[: rank - 1] + (C,)), -1, 1)
    np.testing.assert_allclose(nnx_step(ours, x), nnx_step(theirs, x), rtol=1e-5, atol=1e-5)


def test_linen_axis_equals_the_layer_on_channels_last_input_and_flax_batchnorm(rng):
    x = jnp.moveaxis(data(rng, (3, 4, 3, C)), -1, 1)  # (N, C, H, W)
    moved, last = snn.SwitchNorm(axis=1, num_groups=1), snn.SwitchNorm(num_groups=1)
    variables = moved.init(jax.random.key(0), x, use_running_average=False)
    params = {**variables["params"], "mean_logits": jnp.asarray(rng.normal(size=4), jnp.float32)}
    variables = {
        **variables,
        "params": {**params, "var_logits": jnp.asarray(rng.normal(size=4), jnp.float32)},
    }
    assert variables["params"]["scale"].shape == (C,)
    y, updates = linen_train(moved, variables, x)
    want, want_updates = linen_train(last, variables, jnp.moveaxis(x, 1, -1))
    np.testing.assert_allclose(y, jnp.moveaxis(want, -1, 1), atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], want_updates["batch_stats"]["var"], atol=1e-7)
    np.testing.assert_allclose(
        linen_infer(moved, variables, x),
        jnp.moveaxis(linen_infer(last, variables, jnp.moveaxis(x, 1, -1)), -1, 1),
    )

    ours, theirs = snn.SwitchNorm(axis=1, normalizers=("bn",)), nn.BatchNorm(axis=1, use_fast_variance=False)
    (y, ours_updates), (want, updates) = train_beside_flax(ours, theirs, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_updates["batch_stats"]["mean"], updates["batch_stats"]["mean"], atol=1e-6)


@pytest.mark.parametrize(
    "axis, message",
    [
        (0, r"axis=0 is the batch axis of an input of rank 4"),
        (-4, r"axis=-4 is the batch axis"),
        (4, r"axis=4 is out of range for an input of rank 4; pass a feature axis in \[1, 3\]"),
        (-5, r"axis=-5 is out of range"),
    ],
)
def test_an_axis_out_of_range_or_on_the_batch_is_refused_naming_it(axis, message):
    x = jnp.ones((2, 3, 3, C))
    layer = switchnorm.SwitchNorm(C, axis=axis, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        layer(x)
    with pytest.raises(ValueError, match=message):
        snn.SwitchNorm(axis=axis).init(jax.random.key(0), x, use_running_average=False)


@pytest.mark.parametrize("axis", [1.0, True, (1,)])
def test_an_nnx_axis_that_is_not_an_int_is_a_type_error(axis):
    # as nnx.BatchNorm: one feature axis; the message points to Linen for several
    with pytest.raises(TypeError, match=r"axis must be an int.*axis=1 for channels-first.*linen"):
        switchnorm.SwitchNorm(C, axis=axis, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("axis", [1.0, True, (1, 2.0)])
def test_a_linen_axis_that_is_not_ints_is_a_type_error(axis):
    with pytest.raises(TypeError, match=r"axis must be an int or a tuple of ints"):
        snn.SwitchNorm(axis=axis).init(jax.random.key(0), jnp.ones((2, 3, C)), use_running_average=False)


@pytest.mark.parametrize("axis, error", [((), "names no feature axis"), ((1, -2), "the same axis twice")])
def test_a_linen_axis_tuple_naming_nothing_or_an_axis_twice_is_refused(axis, error):
    with pytest.raises(ValueError, match=error):
        snn.SwitchNorm(axis=axis).init(jax.random.key(0), jnp.ones((2, 3, C)), use_running_average=False)


def test_linen_feature_axes_tuple_equals_flax_batchnorm_and_the_layer_on_flattened_channels(rng):
    # nn.BatchNorm(axis=(1, 3)) normalizes each (axis-1, axis-3) feature over the other axes;
    # with bn alone SwitchNorm does the same, with Flax's parameter shapes, and with all four
    # it is the channels-last layer on those axes moved last and flattened.
    x = data(rng, (4, 3, 5, 2))
    ours, theirs = snn.SwitchNorm(axis=(1, 3), normalizers=("bn",)), nn.BatchNorm(axis=(1, 3))
    (y, ours_updates), (want, updates) = train_beside_flax(ours, theirs, x)
    assert ours_updates["batch_stats"]["mean"].shape == (3, 2)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(ours_updates["batch_stats"][name], updates["batch_stats"][name], atol=1e-6)

    tupled, last = snn.SwitchNorm(axis=(3, 1), num_groups=2), snn.SwitchNorm(num_groups=2)
    variables = tupled.init(jax.random.key(0), x, use_running_average=False)
    assert variables["params"]["scale"].shape == (3, 2)
    params = {**variables["params"], "mean_logits": jnp.asarray(rng.normal(size=4), jnp.float32)}
    params["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (3, 2)), jnp.float32)
    variables = {**variables, "params": params}
    flat = jnp.moveaxis(x, (1, 3), (2, 3)).reshape(4, 5, 6)  # (N, 5, 3 * 2): features last, flattened
    flat_variables = jax.tree.map(lambda a: a.reshape(-1) if a.shape == (3, 2) else a, variables)
    y, updates = linen_train(tupled, variables, x)
    want, want_updates = linen_train(last, flat_variables, flat)
    np.testing.assert_allclose(y, jnp.moveaxis(want.reshape(4, 5, 3, 2), (2, 3), (1, 3)), atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"].reshape(-1), want_updates["batch_stats"]["var"])


# --------------------------------------------------------------------------
# use_fast_variance: accepted; the shifted one-pass statistics either way.
# --------------------------------------------------------------------------


def test_use_fast_variance_is_accepted_and_computes_the_same_either_way(rng):
    x = data(rng, (3, 4, 3, C), offset=100.0)  # a large mean, where E[x^2] - E[x]^2 would lose digits
    fast, stable = (switchnorm.SwitchNorm(C, use_fast_variance=v, rngs=nnx.Rngs(0)) for v in (True, False))
    assert fast.use_fast_variance and not stable.use_fast_variance
    np.testing.assert_array_equal(nnx_step(fast, x), nnx_step(stable, x))
    module = snn.SwitchNorm(use_fast_variance=True)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y, _ = linen_train(module, variables, x)
    np.testing.assert_array_equal(y, linen_train(snn.SwitchNorm(use_fast_variance=False), variables, x)[0])
    with pytest.raises(TypeError, match=r"use_fast_variance must be True or False, got 'yes'"):
        switchnorm.SwitchNorm(C, use_fast_variance="yes", rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# promote_dtype (NNX): the layer computes on what the function returns.
# --------------------------------------------------------------------------


def to_float16(args, *, dtype=None):
    """A promote_dtype that casts every array to float16, whatever ``dtype`` asks."""
    return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)


@pytest.mark.parametrize("promote", [nnx_dtypes.promote_dtype, to_float16], ids=["flax_default", "float16"])
def test_promote_dtype_casts_as_in_nnx_batchnorm(rng, promote):
    ours = switchnorm.SwitchNorm(C, normalizers=("bn",), promote_dtype=promote, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, use_fast_variance=False, promote_dtype=promote, rngs=nnx.Rngs(0))
    tolerance = 1e-2 if promote is to_float16 else 1e-5
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        x = data(rng, (4, 3, C), dtype=jnp.bfloat16)
        got, want = nnx_step(ours, x), nnx_step(theirs, x)
        assert got.dtype == want.dtype != jnp.bfloat16  # float32 from Flax's default, float16 from to_float16
        np.testing.assert_allclose(
            got.astype(np.float32), want.astype(np.float32), rtol=tolerance, atol=tolerance
        )


def test_the_layer_computes_on_every_array_promote_dtype_returns(rng):
    # A promote_dtype that changes values, not dtypes: the running averages, scale and bias it
    # returns are the ones used, as in nnx.BatchNorm with the same function.
    def altered(args, *, dtype=None):
        x, mean, var, scale, bias = args
        return x, mean + 0.5, var * 3.0, scale * 2.0 - 0.25, bias + 1.0

    ours = switchnorm.SwitchNorm(C, normalizers=("bn",), promote_dtype=altered, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, use_fast_variance=False, promote_dtype=altered, rngs=nnx.Rngs(0))
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        x = data(rng, (4, 3, C))
        np.testing.assert_allclose(nnx_step(ours, x), nnx_step(theirs, x), rtol=1e-5, atol=1e-5)


def test_promote_dtype_receives_what_nnx_batchnorm_passes_it(rng):
    calls = []

    def recording(args, *, dtype=None):
        calls.append(([None if a is None else a.shape for a in args], dtype))
        return args

    layer = switchnorm.SwitchNorm(C, dtype=jnp.float32, promote_dtype=recording, rngs=nnx.Rngs(0))
    layer(data(rng, (4, 3, C)))
    assert calls == [([(4, 3, C), (C,), (C,), (C,), (C,)], jnp.float32)]  # (x, mean, var, scale, bias)
    with pytest.raises(TypeError, match=r"promote_dtype must be a function.*got 'float32'"):
        switchnorm.SwitchNorm(C, promote_dtype="float32", rngs=nnx.Rngs(0))


def test_without_promote_dtype_half_precision_in_gives_it_out(rng):
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    assert layer(data(rng, (4, 3, C), dtype=jnp.bfloat16)).dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# scale_metadata, bias_metadata (NNX): on the Params, as nnx.BatchNorm puts them.
# --------------------------------------------------------------------------


def test_scale_and_bias_metadata_reach_the_params_as_in_nnx_batchnorm():
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    metadata = dict(
        scale_metadata={"out_sharding": ("model",)},
        bias_metadata={"out_sharding": ("model",), "note": "bias"},
    )
    with jax.set_mesh(mesh):
        ours = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0), **metadata)
        theirs = nnx.BatchNorm(C, rngs=nnx.Rngs(0), **metadata)
    for name in ("scale", "bias"):
        assert getattr(ours, name).get_metadata() == getattr(theirs, name).get_metadata()
        assert getattr(ours, name)[...].sharding == getattr(theirs, name)[...].sharding
    specs = nnx.get_partition_spec(nnx.state(ours))
    assert specs["scale"].get_value() == specs["bias"].get_value() == jax.sharding.PartitionSpec("model")
    assert ours.bias.note == "bias"


# --------------------------------------------------------------------------
# force_float32_reductions (Linen): the running averages' dtype, as Flax keeps them.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("force", [True, False])
def test_force_float32_reductions_keeps_the_running_averages_in_flax_batchnorms_dtype(force):
    x = jnp.ones((4, 3, C))
    kwargs = dict(param_dtype=jnp.bfloat16, force_float32_reductions=force)
    ours = snn.SwitchNorm(normalizers=ALL[:1], **kwargs).init(jax.random.key(0), x, use_running_average=False)
    theirs = nn.BatchNorm(**kwargs).init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.map(lambda a: a.dtype, ours["batch_stats"]) == jax.tree.map(
        lambda a: a.dtype, theirs["batch_stats"]
    )


def test_force_float32_reductions_false_equals_flax_batchnorm_on_float32(rng):
    ours = snn.SwitchNorm(normalizers=("bn",), force_float32_reductions=False)
    theirs = nn.BatchNorm(use_fast_variance=False, force_float32_reductions=False)
    x = data(rng, (4, 3, C))
    (y, ours_updates), (want, updates) = train_beside_flax(ours, theirs, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_updates["batch_stats"]["var"], updates["batch_stats"]["var"], rtol=1e-6)
    with pytest.raises(TypeError, match=r"force_float32_reductions must be True or False, got None"):
        snn.SwitchNorm(force_float32_reductions=None).init(jax.random.key(0), x, use_running_average=False)
