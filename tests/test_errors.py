"""Bad input is refused at trace time, with a message that names the problem."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import switchnorm
from switchnorm import linen as snn
from switchnorm import switch_norm

IMAGE = jax.ShapeDtypeStruct((2, 4, 4, 6), jnp.float32)
DENSE = jax.ShapeDtypeStruct((8, 6), jnp.float32)


def trace_core(x, normalizers=("bn", "in", "ln", "gn"), logits=None, **kwargs):
    """Traces the core abstractly (jax.eval_shape): any error is a trace-time error."""
    k = len(normalizers) if logits is None else logits
    logits = jax.ShapeDtypeStruct((k,), jnp.float32)
    return jax.eval_shape(
        lambda x, a, b: switch_norm(x, a, b, normalizers=normalizers, **kwargs), x, logits, logits
    )


CORE_ERRORS = {
    "rank-1": (dict(x=jax.ShapeDtypeStruct((6,), jnp.float32)), ValueError, r"rank >= 2.*\(6,\)"),
    "rank-0": (dict(x=jax.ShapeDtypeStruct((), jnp.float32)), ValueError, r"rank >= 2"),
    "groups-do-not-divide": (
        dict(x=IMAGE, num_groups=4),
        ValueError,
        r"num_groups=4 does not divide the 6 channels",
    ),
    "group-size-does-not-divide": (
        dict(x=IMAGE, group_size=4),
        ValueError,
        r"group_size=4 does not divide the 6 channels",
    ),
    "zero-groups": (dict(x=IMAGE, num_groups=0), ValueError, r"num_groups=0"),
    "both-group-arguments": (
        dict(x=IMAGE, num_groups=2, group_size=3),
        ValueError,
        r"num_groups or group_size, not both.*num_groups=2.*group_size=3",
    ),
    "unknown-normalizer": (dict(x=IMAGE, normalizers=("bn", "xn")), ValueError, r"unknown normalizer 'xn'"),
    "repeated-normalizer": (
        dict(x=IMAGE, normalizers=("bn", "ln", "bn")),
        ValueError,
        r"'bn'.*more than once",
    ),
    "empty-normalizers": (dict(x=IMAGE, normalizers=()), ValueError, r"at least one"),
    "normalizers-as-a-string": (dict(x=IMAGE, normalizers="bn", logits=1), TypeError, r"\('bn',\)"),
    "in-on-dense": (dict(x=DENSE, normalizers=("bn", "in")), ValueError, r"\['in'\].*spatial extent"),
    "gn-on-dense": (dict(x=DENSE, normalizers=("gn",)), ValueError, r"\['gn'\].*spatial extent"),
    "integer-input": (
        dict(x=jax.ShapeDtypeStruct((2, 4, 4, 6), jnp.int32)),
        TypeError,
        r"floating-point.*int32",
    ),
    "logits-of-wrong-length": (
        dict(x=IMAGE, normalizers=("bn", "ln"), logits=3),
        ValueError,
        r"mean_logits has shape \(3,\)",
    ),
    "negative-radius": (
        dict(x=IMAGE, mixing="sparsestmax", radius=-0.1),
        ValueError,
        r"radius must be >= 0, got -0.1",
    ),
    "radius-per-channel": (
        dict(x=IMAGE, mixing="sparsestmax", radius=jnp.zeros(6)),
        ValueError,
        r"radius.*\(6,\).*one radius per layer",
    ),
}


@pytest.mark.parametrize("case", list(CORE_ERRORS))
def test_core_refuses_bad_input_at_trace_time(case):
    kwargs, error, match = CORE_ERRORS[case]
    with pytest.raises(error, match=match):
        trace_core(**kwargs)


def test_inference_with_bn_needs_running_averages():
    with pytest.raises(ValueError, match="running_mean and running_var"):
        trace_core(IMAGE, use_running_average=True)


# --------------------------------------------------------------------------
# NNX: constructor arguments are checked when the layer is built.
# --------------------------------------------------------------------------

NNX_CONSTRUCTOR_ERRORS = {
    "groups-do-not-divide": (dict(num_groups=4), r"num_groups=4 does not divide the 6 channels"),
    "group-size-does-not-divide": (dict(group_size=4), r"group_size=4 does not divide"),
    "both-group-arguments": (dict(num_groups=2, group_size=3), r"not both"),
    "unknown-normalizer": (dict(normalizers=("bn", "batch")), r"unknown normalizer 'batch'"),
    "repeated-normalizer": (dict(normalizers=("gn", "gn")), r"more than once"),
    "empty-normalizers": (dict(normalizers=[]), r"at least one"),
}


@pytest.mark.parametrize("case", list(NNX_CONSTRUCTOR_ERRORS))
def test_nnx_constructor_refuses_bad_arguments(case):
    kwargs, match = NNX_CONSTRUCTOR_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        switchnorm.SwitchNorm(6, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("num_features", [0, -3, 2.5])
def test_nnx_constructor_refuses_a_bad_channel_count(num_features):
    with pytest.raises(ValueError, match=f"num_features must be a positive int, got {num_features}"):
        switchnorm.SwitchNorm(num_features, rngs=nnx.Rngs(0))


NNX_CALL_ERRORS = {
    "channel-count-differs": (
        dict(),
        jnp.zeros((2, 4, 4, 8)),
        ValueError,
        r"8 channels.*built for num_features=6",
    ),
    "rank-1": (dict(), jnp.zeros((6,)), ValueError, r"rank >= 2"),
    "integer-input": (dict(), jnp.zeros((2, 4, 4, 6), jnp.int32), TypeError, r"floating-point"),
    "in-on-dense": (dict(normalizers=("in", "ln")), jnp.zeros((8, 6)), ValueError, r"spatial extent"),
    "gn-on-dense": (dict(normalizers=("bn", "gn")), jnp.zeros((8, 6)), ValueError, r"spatial extent"),
}


@pytest.mark.parametrize("case", list(NNX_CALL_ERRORS))
def test_nnx_call_refuses_bad_input_at_trace_time(case):
    kwargs, x, error, match = NNX_CALL_ERRORS[case]
    layer = switchnorm.SwitchNorm(6, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(error, match=match):
        nnx.jit(lambda m, x: m(x))(layer, x)


# --------------------------------------------------------------------------
# Linen: checked at init, and params built for another channel count refused.
# --------------------------------------------------------------------------

LINEN_ERRORS = {
    "groups-do-not-divide": (dict(num_groups=4), IMAGE, ValueError, r"num_groups=4 does not divide"),
    "both-group-arguments": (dict(num_groups=2, group_size=3), IMAGE, ValueError, r"not both"),
    "unknown-normalizer": (dict(normalizers=("bn", "xn")), IMAGE, ValueError, r"unknown normalizer"),
    "repeated-normalizer": (dict(normalizers=("ln", "ln")), IMAGE, ValueError, r"more than once"),
    "empty-normalizers": (dict(normalizers=()), IMAGE, ValueError, r"at least one"),
    "in-on-dense": (dict(normalizers=("bn", "in")), DENSE, ValueError, r"spatial extent"),
    "rank-1": (dict(), jax.ShapeDtypeStruct((6,), jnp.float32), ValueError, r"rank >= 2"),
    "integer-input": (dict(), jax.ShapeDtypeStruct((2, 4, 4, 6), jnp.int8), TypeError, r"floating-point"),
}


@pytest.mark.parametrize("case", list(LINEN_ERRORS))
def test_linen_refuses_bad_input_at_trace_time(case):
    kwargs, x, error, match = LINEN_ERRORS[case]
    module = snn.SwitchNorm(**kwargs)
    with pytest.raises(error, match=match):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x, use_running_average=False), x)


@pytest.mark.parametrize("normalizers", [None, ("in", "ln")], ids=["with-bn", "without-bn"])
def test_linen_refuses_params_built_for_another_channel_count(normalizers):
    module = snn.SwitchNorm(normalizers=normalizers)
    variables = jax.eval_shape(  # abstract: only shapes matter here
        lambda x: module.init(jax.random.key(0), x, use_running_average=False), IMAGE
    )
    wider = jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"8 channels.*built for num_features=6"):
        jax.eval_shape(lambda v, x: module.apply(v, x, use_running_average=True), variables, wider)


def test_linen_with_neither_attribute_nor_argument_for_the_mode_raises():
    module = snn.SwitchNorm()
    with pytest.raises(ValueError, match="use_running_average"):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x), IMAGE)
