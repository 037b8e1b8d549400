"""Numerics: large means in float32, half-precision input, zero variance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx

import switchnorm
from switchnorm import linen as snn
from switchnorm import switch_norm

ALL = reference.ALL


@functools.partial(jax.jit, static_argnames=("normalizers", "num_groups", "dtype"))
def normalize(x, mean_logits, var_logits, scale=None, bias=None, *, normalizers, num_groups=2, dtype=None):
    y, _ = switch_norm(
        x,
        mean_logits,
        var_logits,
        scale=scale,
        bias=bias,
        normalizers=normalizers,
        num_groups=num_groups,
        dtype=dtype,
    )
    return y


# --------------------------------------------------------------------------
# |mean| >> std: no digits lost in float32.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "normalizers, shape",
    [
        (("bn",), (4, 6, 6, 8)),
        (("in",), (4, 6, 6, 8)),
        (("ln",), (4, 6, 6, 8)),
        (("gn",), (4, 6, 6, 8)),
        (ALL, (4, 6, 6, 8)),
        (("bn",), (64, 8)),
        (("ln",), (64, 8)),
        (("bn", "ln"), (64, 8)),
    ],
)
def test_float32_input_with_mean_1e4_and_std_1_matches_float64(rng, normalizers, shape):
    x64 = 1e4 + rng.normal(size=shape)
    x = jnp.asarray(x64, jnp.float32)
    k = len(normalizers)
    logits = (rng.normal(size=k), rng.normal(size=k)) if k > 1 else (np.zeros(1), np.zeros(1))
    y = normalize(x, *(jnp.asarray(lg, jnp.float32) for lg in logits), normalizers=normalizers)
    # The reference sees the float32 input exactly, so only the layer's own error counts.
    y_ref, _, _ = reference.switch_norm(np.asarray(x), *logits, normalizers=normalizers, num_groups=2)
    assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) < 1e-3


def test_nnx_layer_keeps_float32_digits_at_mean_1e4(rng):
    layer = switchnorm.SwitchNorm(8, num_groups=2, rngs=nnx.Rngs(0))
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    x = jnp.asarray(1e4 + rng.normal(size=(4, 6, 6, 8)), jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    y_ref, bn_mean, bn_var = reference.switch_norm(
        np.asarray(x), layer.mean_logits[...], layer.var_logits[...], num_groups=2
    )
    assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) < 1e-3
    # The running variance is the data's variance (about 1), not round-off of 1e8.
    np.testing.assert_allclose(layer.var[...], 0.99 + 0.01 * bn_var, rtol=1e-5)


# --------------------------------------------------------------------------
# Half precision in, half precision out, float32 statistics.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_input_gives_half_precision_output_close_to_float32(rng, half):
    x = jnp.asarray(3.0 + rng.normal(size=(4, 5, 5, 8)) * 2.0, half)
    logits = [jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(2)]
    y = normalize(x, *logits, normalizers=ALL)
    y32 = normalize(x.astype(jnp.float32), *logits, normalizers=ALL)
    assert y.dtype == half
    # Within a few units of the half type's last place of the float32 result.
    ulp = float(jnp.finfo(half).eps)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), y32, rtol=2 * ulp, atol=2 * ulp * float(jnp.max(jnp.abs(y32)))
    )


def test_bfloat16_through_both_front_ends(rng):
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 8)), jnp.bfloat16)
    layer = switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0))
    y_nnx = nnx.jit(lambda m, x: m(x))(layer, x)
    module = snn.SwitchNorm()

    @jax.jit
    def linen_forward(x):
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]

    y_linen = linen_forward(x)
    y32 = linen_forward(x.astype(jnp.float32))
    assert y_nnx.dtype == y_linen.dtype == jnp.bfloat16
    assert layer.var[...].dtype == jnp.float32  # running averages stay float32
    for y in (y_nnx, y_linen):
        np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=2**-7, atol=2**-6)


# --------------------------------------------------------------------------
# Zero variance.
# --------------------------------------------------------------------------


def constant_inputs(rng):
    shape = (3, 4, 4, 6)
    partly = rng.normal(size=shape)
    partly[1] = 7.0  # one sample constant: zero variance for its in, ln and gn scopes
    return {
        "all-constant": np.full(shape, 3.0),
        "large-constant": np.full(shape, 1e4),
        "one-sample-constant": partly,
        "constant-per-channel": np.broadcast_to(rng.normal(size=6), shape).copy(),
    }


@pytest.mark.parametrize(
    "case", ["all-constant", "large-constant", "one-sample-constant", "constant-per-channel"]
)
def test_constant_input_gives_finite_output_and_gradients(rng, case):
    x = jnp.asarray(constant_inputs(rng)[case], jnp.float32)
    args = (
        x,
        jnp.asarray(rng.normal(size=4), jnp.float32),
        jnp.asarray(rng.normal(size=4), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
        jnp.asarray(rng.normal(size=6), jnp.float32),
    )
    y = normalize(*args, normalizers=ALL)
    assert np.all(np.isfinite(y))
    if case in ("all-constant", "large-constant"):  # x equals every mean: y is the bias
        np.testing.assert_allclose(y, np.broadcast_to(args[4], x.shape), atol=1e-4)

    def loss(*args):
        return jnp.sum(jnp.sin(normalize(*args, normalizers=ALL)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    for g in grads:
        assert np.all(np.isfinite(g))
