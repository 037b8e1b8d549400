"""What a Flax user expects at the edges: empty input, bad arguments, huge data, NaN."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax.test_util import check_grads

import switchnorm
from switchnorm import _xla_cpu
from switchnorm import linen as snn
from switchnorm._core import switch_norm_autodiff

C = 6
EMPTY_SHAPES = [(0, 4, 4, C), (3, 0, 4, C), (0, C)]


def nnx_train_call(layer, x):
    return nnx.jit(lambda m, x: m(x))(layer, x)


# --------------------------------------------------------------------------
# Empty input: an empty output, as Flax's BatchNorm; running averages kept.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("dtype, out_dtype", [(jnp.float32, None), (jnp.bfloat16, jnp.float32)])
def test_nnx_layer_returns_an_empty_output_like_flax_batchnorm_and_keeps_its_running_averages(
    shape, dtype, out_dtype
):
    x = jnp.zeros(shape, dtype)
    layer = switchnorm.SwitchNorm(C, dtype=out_dtype, rngs=nnx.Rngs(0))
    y = nnx_train_call(layer, x)
    flax_y = nnx_train_call(nnx.BatchNorm(C, dtype=out_dtype, rngs=nnx.Rngs(0)), x)
    assert y.shape == flax_y.shape == shape
    assert y.dtype == (out_dtype or dtype)
    np.testing.assert_array_equal(layer.mean[...], np.zeros(C))
    np.testing.assert_array_equal(layer.var[...], np.ones(C))


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_linen_layer_returns_an_empty_output_like_flax_batchnorm_and_keeps_its_running_averages(shape):
    x = jnp.zeros(shape)
    outputs = {}
    for name, module in (("sn", snn.SwitchNorm()), ("bn", nn.BatchNorm())):
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        apply = jax.jit(
            lambda v, x, m=module: m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        )
        outputs[name] = apply(variables, x)
    (y, updates), (flax_y, _) = outputs["sn"], outputs["bn"]
    assert y.shape == flax_y.shape == shape and y.dtype == flax_y.dtype
    np.testing.assert_array_equal(updates["batch_stats"]["mean"], np.zeros(C))
    np.testing.assert_array_equal(updates["batch_stats"]["var"], np.ones(C))


def test_functional_core_on_empty_input_returns_no_batch_statistics_and_zero_gradients():
    x = jnp.zeros((0, 4, C))
    y, stats = switchnorm.switch_norm(x, jnp.zeros(4), jnp.zeros(4), dtype=jnp.bfloat16)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16 and stats is None
    grads = jax.grad(lambda m: jnp.sum(switchnorm.switch_norm(x, m, m)[0]))(jnp.zeros(4))
    np.testing.assert_array_equal(grads, np.zeros(4))


@pytest.mark.parametrize("shape", [(2, 4, 0), (3, 0)], ids=str)
def test_zero_channels_are_refused_naming_the_shape(shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    logits = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(ValueError, match=re.escape(f"shape {shape}: no channels")):
        jax.eval_shape(lambda x, a: switchnorm.switch_norm(x, a, a, normalizers=("bn", "ln")), x, logits)
    with pytest.raises(ValueError, match=re.escape(f"shape {shape}: no channels")):
        jax.eval_shape(lambda x: snn.SwitchNorm().init(jax.random.key(0), x, use_running_average=False), x)


# --------------------------------------------------------------------------
# Bad arguments: each named, at construction (NNX) or trace time (core, Linen).
# --------------------------------------------------------------------------

ARGUMENT_ERRORS = {
    "momentum-above-one": (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\].*1\.5"),
    "momentum-negative": (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\].*-0\.1"),
    "momentum-nan": (dict(momentum=float("nan")), ValueError, r"momentum must be in \[0, 1\].*nan"),
    "epsilon-zero": (dict(epsilon=0.0), ValueError, r"epsilon must be > 0.*0\.0"),
    "epsilon-negative": (dict(epsilon=-1e-5), ValueError, r"epsilon must be > 0.*-1e-05"),
    "epsilon-nan": (dict(epsilon=float("nan")), ValueError, r"epsilon must be > 0.*nan"),
    "epsilon-string": (dict(epsilon="1e-5"), TypeError, r"epsilon must be a float"),
    "num-groups-float": (dict(num_groups=2.0), TypeError, r"num_groups must be an int, got 2\.0"),
    "num-groups-bool": (dict(num_groups=True), TypeError, r"num_groups must be an int, got True"),
    "group-size-float": (dict(group_size=3.0), TypeError, r"group_size must be an int, got 3\.0"),
    "group-size-bool": (dict(group_size=True), TypeError, r"group_size must be an int, got True"),
}
CORE_ONLY = {"momentum-above-one", "momentum-negative", "momentum-nan"}  # the core keeps no averages
IMAGE = jax.ShapeDtypeStruct((2, 4, 4, C), jnp.float32)


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
def test_nnx_constructor_names_the_bad_argument(case):
    kwargs, error, match = ARGUMENT_ERRORS[case]
    with pytest.raises(error, match=match):
        switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("case", list(ARGUMENT_ERRORS))
def test_linen_names_the_bad_argument_at_trace_time(case):
    kwargs, error, match = ARGUMENT_ERRORS[case]
    module = snn.SwitchNorm(use_running_average=False, **kwargs)
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x), IMAGE)


@pytest.mark.parametrize("case", sorted(set(ARGUMENT_ERRORS) - CORE_ONLY))
def test_functional_core_names_the_bad_argument_at_trace_time(case):
    kwargs, error, match = ARGUMENT_ERRORS[case]
    logits = jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda x, a: switchnorm.switch_norm(x, a, a, **kwargs), IMAGE, logits)


@pytest.mark.parametrize("name", ["scale", "bias", "running_mean", "running_var"])
def test_functional_core_names_a_per_channel_array_of_the_wrong_shape(name):
    logits = jnp.zeros(4)
    arrays = {"running_mean": jnp.zeros(C), "running_var": jnp.ones(C), name: jnp.ones(C + 1)}
    with pytest.raises(
        ValueError, match=rf"{name} has shape \(7,\), expected \(6,\) for an input of 6 channels"
    ):
        jax.eval_shape(
            lambda x: switchnorm.switch_norm(x, logits, logits, use_running_average=True, **arrays), IMAGE
        )


def test_functional_core_refuses_normalizers_none_and_names_the_default():
    with pytest.raises(TypeError, match=r"normalizers=None.*default_normalizers\(x.ndim\)"):
        switchnorm.switch_norm(jnp.ones((2, 3, C)), jnp.zeros(4), jnp.zeros(4), normalizers=None)


# --------------------------------------------------------------------------
# Range: normalization is scale invariant, and so is this layer up to ~1e19 in float32.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("magnitude", [1e19, 1e-15])
@pytest.mark.parametrize("normalizers", [("bn",), ("in",), ("ln",), ("gn",), reference.ALL], ids="+".join)
def test_float32_data_of_huge_magnitude_matches_float64(rng, magnitude, normalizers):
    x = jnp.asarray(rng.normal(size=(4, 5, 5, C)) * magnitude, jnp.float32)
    x64 = np.asarray(x, np.float64)  # the same float32-rounded input
    k = len(normalizers)
    mean_logits, var_logits = rng.normal(size=k), rng.normal(size=k)
    y, stats = jax.jit(
        lambda x: switchnorm.switch_norm(
            x, mean_logits, var_logits, normalizers=normalizers, num_groups=3, epsilon=1e-5
        )
    )(x)
    y_ref, bn_mean, bn_var = reference.switch_norm(
        x64, mean_logits, var_logits, normalizers=normalizers, num_groups=3
    )
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    if "bn" in normalizers and magnitude > 1:
        np.testing.assert_allclose(stats.mean, bn_mean, rtol=1e-5, atol=1e-6 * magnitude)
        np.testing.assert_allclose(stats.var, bn_var, rtol=1e-5)


def test_nnx_running_variance_stays_finite_for_float32_data_at_1e19(rng):
    x = jnp.asarray(rng.normal(size=(8, 4, 4, C)) * 1e19, jnp.float32)
    layer = switchnorm.SwitchNorm(C, momentum=0.0, rngs=nnx.Rngs(0))
    y = nnx_train_call(layer, x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(layer.var[...], np.asarray(x, np.float64).var(axis=(0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 3, C), (16, C)], ids=["spatial", "dense"])
@pytest.mark.parametrize("weights", ["layer", "sample"])
def test_float32_data_whose_variance_overflows_gives_nan_not_zeros(rng, shape, weights):
    # At std 1e20 the variance, 1e40, is beyond float32: the output cannot be computed,
    # and says so (1 / sqrt(inf) would have made it silently 0); bn's variance is inf.
    x = jnp.asarray(rng.normal(size=shape) * 1e20, jnp.float32)
    normalizers = switchnorm.default_normalizers(len(shape))
    k = len(normalizers)
    sample_map = jnp.zeros((2, 2 * k, k)) if weights == "sample" else None
    y, stats = switchnorm.switch_norm(
        x, jnp.zeros(k), jnp.zeros(k), normalizers=normalizers, weights=weights, sample_map=sample_map
    )
    assert np.all(np.isnan(y))
    assert np.all(np.isinf(stats.var))
    y, _ = switchnorm.switch_norm(x / 10.0, jnp.zeros(k), jnp.zeros(k), normalizers=normalizers)
    assert np.all(np.isfinite(y))  # std 1e19: within range


def test_custom_vjp_equals_autodiff_at_1e19_in_float32(rng):
    x = jnp.asarray(rng.normal(size=(3, 4, 4, C)) * 1e19, jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

    def grads(f):
        loss = lambda x, lg: jnp.sum(f(x, lg[0], lg[1], num_groups=2)[0] * dy)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, logits)

    custom, plain = grads(switchnorm.switch_norm), grads(switch_norm_autodiff)
    assert all(np.all(np.isfinite(g)) for g in custom)
    np.testing.assert_allclose(custom[0] * 1e19, plain[0] * 1e19, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(custom[1], plain[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shifted", [False, True], ids=["raw-sums", "shifted-in-units"])
def test_custom_vjp_passes_check_grads_in_float64_where_the_squares_are_in_units_of_u(
    x64, rng, monkeypatch, shifted
):
    # The shifted path always sums (x - K) u, u a power of two near 1 / |K|
    # (2^-9 to 2^-12 at this magnitude), the raw path x with u = 1; each path is
    # forced here: the backward pass must carry u, dx = a dy + u g1 + 2 u^2 g2 d.
    monkeypatch.setattr(_xla_cpu, "within_bound", lambda *_: jnp.asarray(not shifted))
    jax.clear_caches()  # the layer's graphs are cached by configuration, not by the patch
    z = jnp.asarray(rng.normal(size=(3, 4, 2, C)) + 3.0, jnp.float64)
    unit = _xla_cpu.statistics_pass(z * 1e3, None, jnp.float64).unit
    assert bool(jnp.all(unit < 2**-8)) == shifted
    assert bool(jnp.all(unit == 1.0)) == (not shifted)
    logits = jnp.asarray(rng.normal(size=(2, 4)), jnp.float64)
    f = lambda z, lg: switchnorm.switch_norm(z * 1e3, lg[0], lg[1], num_groups=2)[0]  # noqa: E731
    try:
        check_grads(jax.jit(f), (z, logits), order=1, modes=["rev"])  # traced here, under the patch
    finally:
        jax.clear_caches()  # no later test may reuse a graph traced under the patch


# --------------------------------------------------------------------------
# NaN: as in Flax, a NaN in a training batch poisons its channel's running averages.
# --------------------------------------------------------------------------


def test_nan_in_a_training_batch_poisons_the_running_averages_of_its_channel_as_in_flax(rng):
    x = jnp.asarray(rng.normal(size=(4, 3, 3, C)), jnp.float32).at[1, 2, 0, 3].set(jnp.nan)
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    flax_bn = nnx.BatchNorm(C, rngs=nnx.Rngs(0))
    nnx_train_call(layer, x)
    nnx_train_call(flax_bn, x)
    for ours, flax in ((layer.mean, flax_bn.mean), (layer.var, flax_bn.var)):
        np.testing.assert_array_equal(np.isnan(ours[...]), np.isnan(flax[...]))
        assert np.isnan(ours[...]).tolist() == [c == 3 for c in range(C)]
    nnx_train_call(layer, jnp.asarray(rng.normal(size=x.shape), jnp.float32))
    assert np.isnan(layer.mean[...][3]) and np.isnan(layer.var[...][3])  # for good


# --------------------------------------------------------------------------
# Inspection: nnx.tabulate, and the dominant-weight marker.
# --------------------------------------------------------------------------


class ConvNorm(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, C, (3, 3), rngs=rngs)
        self.norm = switchnorm.SwitchNorm(C, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.conv(x))


def test_nnx_tabulate_summarises_a_model_holding_switchnorm_and_leaves_it_usable():
    model = ConvNorm(nnx.Rngs(0))
    x = jnp.ones((2, 5, 5, 3))
    table = nnx.tabulate(model, x)
    assert "SwitchNorm" in table
    assert model(x).shape == (2, 5, 5, C)


def test_format_mixing_weights_marks_no_dominant_weight_when_the_largest_tie():
    fresh = switchnorm.mixing_weights(switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0)))
    assert "*" not in switchnorm.format_mixing_weights(fresh)
    nearly = {"": {"mean": {"bn": 0.5, "ln": 0.5 * (1 + 2**-23)}, "var": {"bn": 0.7, "ln": 0.3}}}
    lines = switchnorm.format_mixing_weights(nearly).splitlines()
    assert "*" not in lines[2]  # mean: equal up to float32 rounding
    assert lines[3].split() == ["var", "0.700*", "0.300"]
    a_few_steps_in = {
        "": {"mean": {"bn": 0.2502, "ln": 0.2499, "in": 0.2499}, "var": {"bn": 0.2506, "ln": 0.2494}}
    }
    lines = switchnorm.format_mixing_weights(a_few_steps_in).splitlines()
    assert "*" not in lines[2]  # 0.250 0.250 0.250: no visible lead, no mark
    assert lines[3].split() == ["var", "0.251*", "0.249", "-"]


def test_nnx_layer_can_be_called_in_eval_mode_under_a_transform_that_closes_over_it():
    # NNX refuses mutation from another trace level: recording the input's
    # rank must not make the call itself fail there.
    layer = switchnorm.SwitchNorm(C, use_running_average=True, rngs=nnx.Rngs(0))
    assert nnx.eval_shape(lambda: layer(jnp.ones((2, C)))).shape == (2, C)
    assert jax.jit(lambda x: layer(x))(jnp.ones((2, 3, C))).shape == (2, 3, C)
