"""Values where tests used to stop at "it runs" or "it has the right dtype".

Half-precision parameters and outputs against float32, zero-variance outputs and
gradients against the float64 reference, and the front ends' gradients against
the functional core's with the same parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from reference import SHAPES, C, assert_matches, data

import switchnorm
from switchnorm import linen as snn

BF16_HALF_ULP = 2.0**-8
"""bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it."""


def random_layer(rng, **kwargs) -> switchnorm.SwitchNorm:
    """An NNX layer over all four normalizers with random logits, scale and bias."""
    layer = switchnorm.SwitchNorm(C, num_groups=2, rngs=nnx.Rngs(0), **kwargs)
    dtype = layer.scale[...].dtype
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=4), dtype)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=4), dtype)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), dtype)
    layer.bias[...] = jnp.asarray(rng.normal(size=C), dtype)
    return layer


def params_of(layer) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()}


def reference_y(layer, x):
    y, _, _ = reference.call(reference.switch_norm, {"x": x, **params_of(layer)}, num_groups=2)
    return y


def linen_forward(module, params, x):
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    variables = {**variables, "params": params}
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]


# --------------------------------------------------------------------------
# param_dtype and dtype: values, not only dtypes.
# --------------------------------------------------------------------------


def front_end_forward(front_end: str, layer, x, **dtypes):
    """``layer``'s training-mode output through the NNX layer itself or, for "linen", a Linen
    SwitchNorm built with ``dtypes`` and given ``layer``'s parameters."""
    if front_end == "nnx":
        return nnx.jit(lambda m, x: m(x))(layer, x)
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    return jax.jit(linen_forward, static_argnums=0)(snn.SwitchNorm(num_groups=2, **dtypes), params, x)


@pytest.mark.parametrize("front_end", ["nnx", "linen"])
def test_bfloat16_parameters_compute_in_float32(rng, front_end):
    # The statistics, blend and normalize step run in float32 whatever the parameters'
    # dtype: with the bfloat16 parameter values given exactly to the float64 reference,
    # only float32 round-off remains (a bfloat16 cast anywhere inside costs ~1e-3).
    layer = random_layer(rng, param_dtype=jnp.bfloat16)
    x = data(rng, SHAPES[4])
    y = front_end_forward(front_end, layer, x, param_dtype=jnp.bfloat16)
    assert y.dtype == jnp.float32
    assert_matches(y, reference_y(layer, x))


@pytest.mark.parametrize("front_end", ["nnx", "linen"])
def test_bfloat16_output_is_the_float32_result_rounded_once(rng, front_end):
    layer = random_layer(rng)
    layer16 = random_layer(np.random.default_rng(0), dtype=jnp.bfloat16)
    nnx.update(layer16, nnx.state(layer, nnx.Param))
    x = data(rng, SHAPES[4])
    y = front_end_forward(front_end, layer16, x, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    y_ref = reference_y(layer, x)
    error = np.abs(np.asarray(y, np.float64) - y_ref)
    # One rounding to bfloat16 of a float32 result that is itself within round-off.
    assert np.all(error <= BF16_HALF_ULP * np.abs(y_ref) + reference.float32_tolerance(y_ref))


# --------------------------------------------------------------------------
# Zero variance: outputs and gradients against the reference.
# --------------------------------------------------------------------------


def zero_variance_inputs(rng):
    shape = SHAPES[4]
    partly = reference.channel_input(rng, shape)
    partly[1] = 7.0  # one sample constant: zero variance for its in, ln and gn scopes
    return {
        "all-constant": np.full(shape, 3.0),
        "one-sample-constant": partly,
        "constant-per-channel": np.broadcast_to(rng.normal(size=C), shape).copy(),
    }


ZERO_VARIANCE_CASES = ["all-constant", "one-sample-constant", "constant-per-channel"]


def core_loss(args, dy):
    y, _ = reference.call(switchnorm.switch_norm, args, num_groups=2)
    return jnp.sum(y * dy), y


@pytest.mark.parametrize("case", ZERO_VARIANCE_CASES)
def test_zero_variance_output_matches_reference(rng, case):
    args = reference.random_case(rng, SHAPES[4], 4)
    args["x"] = jnp.asarray(zero_variance_inputs(rng)[case], jnp.float32)
    _, y = jax.jit(core_loss)(args, jnp.zeros(SHAPES[4]))
    y_ref, _, _ = reference.call(reference.switch_norm, args, num_groups=2)
    assert_matches(y, y_ref)


@pytest.mark.parametrize("case", ZERO_VARIANCE_CASES)
def test_zero_variance_gradients_match_central_differences_of_the_reference(x64, case):
    rng = np.random.default_rng(3)
    args = reference.random_case(rng, SHAPES[4], 4, dtype=np.float64)
    args["x"] = jnp.asarray(zero_variance_inputs(rng)[case])
    dy = rng.normal(size=SHAPES[4])
    grads = jax.jit(jax.grad(lambda a: core_loss(a, dy)[0]))(args)

    def ref_loss(a):
        y, _, _ = reference.call(reference.switch_norm, a, num_groups=2)
        return float(np.sum(y * dy))

    # var + eps is about 1e-5 here, so the reference's own float64 round-off, divided by
    # 2h, is about 1e-6: atol covers that; a real error is orders of magnitude larger.
    h = 1e-6
    for name, value in args.items():
        v = rng.normal(size=value.shape)
        numeric = (ref_loss({**args, name: value + h * v}) - ref_loss({**args, name: value - h * v})) / (
            2 * h
        )
        np.testing.assert_allclose(
            float(jnp.sum(grads[name] * v)), numeric, rtol=1e-6, atol=1e-5, err_msg=name
        )


# --------------------------------------------------------------------------
# The front ends' gradients are the core's.
# --------------------------------------------------------------------------


def core_grads(params, x, target):
    def loss(p, x):
        y, _ = reference.call(switchnorm.switch_norm, {"x": x, **p}, num_groups=2)
        return jnp.sum(y * target)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("front_end", ["nnx", "linen"])
def test_front_end_gradients_equal_the_core_gradients(rng, front_end):
    layer = random_layer(rng)
    x, target = data(rng, SHAPES[4]), data(rng, SHAPES[4])
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    want_params, want_x = core_grads(params, x, target)
    if front_end == "nnx":

        @nnx.jit
        def grads(layer, x):
            return nnx.grad(lambda m, x: jnp.sum(m(x) * target), argnums=(0, 1))(layer, x)

        got_state, got_x = grads(layer, x)
        got_params = nnx.to_pure_dict(got_state)
    else:
        module = snn.SwitchNorm(num_groups=2)

        def loss(p, x):
            return jnp.sum(linen_forward(module, p, x) * target)

        got_params, got_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    assert set(got_params) == set(want_params) == {"mean_logits", "var_logits", "scale", "bias"}
    for name in want_params:
        assert_matches(got_params[name], want_params[name], err_msg=name)
        assert np.any(np.abs(want_params[name]) > 1e-3), name  # a real gradient, not zeros
    assert_matches(got_x, want_x)
