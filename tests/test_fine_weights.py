"""Per-channel and per-sample mixing weights (``weights="channel"``, ``"sample"``) in the core and
both front ends, against the float64 reference written from their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from jax.test_util import check_grads
from reference import ALL, SHAPES, assert_matches, random_case

import switchnorm
from switchnorm import linen as snn
from switchnorm import switch_norm
from switchnorm._core import switch_norm_autodiff

STATIC = ("normalizers", "num_groups", "epsilon", "use_running_average", "weights", "mixing")
jit_switch_norm = jax.jit(switch_norm, static_argnames=STATIC)


def normalizers_for(rank: int) -> tuple[str, ...]:
    return ALL if rank > 2 else ("bn", "ln")


def fine_case(rng: np.random.Generator, rank: int, weights: str, dtype=np.float32) -> dict:
    """A random case whose logits (and sample map) fit ``weights``; the map is large enough
    that every descriptor moves the weights by tenths."""
    shape = SHAPES[rank]
    k = len(normalizers_for(rank))
    case = random_case(rng, shape, k, dtype)
    if weights == "channel":
        case["mean_logits"] = jnp.asarray(rng.normal(size=(k, shape[-1])), dtype)
        case["var_logits"] = jnp.asarray(rng.normal(size=(k, shape[-1])), dtype)
    if weights == "sample":
        case["sample_map"] = jnp.asarray(rng.normal(size=(2, 2 * k, k)), dtype)
    return case


def with_rows(x: np.ndarray, scaled: int = 2) -> jax.Array:
    """x whose first samples are rescaled and shifted, so samples' descriptors differ widely."""
    x = np.array(x)
    x[:scaled] = 7.0 * x[:scaled] + 3.0
    return jnp.asarray(x)


# --------------------------------------------------------------------------
# The reductions to one blend per layer.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 4])
def test_channel_logits_equal_across_channels_give_the_layer_result(rng, rank):
    case = random_case(rng, SHAPES[rank], len(normalizers_for(rank)))
    options = dict(normalizers=normalizers_for(rank), num_groups=3, scale=case["scale"], bias=case["bias"])
    want, want_stats = jit_switch_norm(case["x"], case["mean_logits"], case["var_logits"], **options)
    columns = lambda v: jnp.tile(v[:, None], (1, SHAPES[rank][-1]))  # noqa: E731
    got, got_stats = jit_switch_norm(
        case["x"], columns(case["mean_logits"]), columns(case["var_logits"]), weights="channel", **options
    )
    # the same arithmetic, fused differently by XLA: equal up to a few float32 ulps
    assert_matches(got, want, ulps=4)
    np.testing.assert_array_equal(got_stats.var, want_stats.var)


@pytest.mark.parametrize("rank", [2, 4])
def test_a_zero_sample_map_gives_the_layer_result(rng, rank):
    case = random_case(rng, SHAPES[rank], len(normalizers_for(rank)))
    k = len(normalizers_for(rank))
    options = dict(normalizers=normalizers_for(rank), num_groups=3, scale=case["scale"], bias=case["bias"])
    want, _ = jit_switch_norm(case["x"], case["mean_logits"], case["var_logits"], **options)
    got, _ = jit_switch_norm(
        case["x"],
        case["mean_logits"],
        case["var_logits"],
        weights="sample",
        sample_map=jnp.zeros((2, 2 * k, k)),
        **options,
    )
    assert_matches(got, want, ulps=4)  # the same arithmetic, fused differently by XLA


# --------------------------------------------------------------------------
# The output is the definition.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-5, 0.5])
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_fine_weights_match_float64_reference(rng, weights, rank, epsilon):
    case = fine_case(rng, rank, weights)
    case["x"] = with_rows(case["x"])
    options = dict(normalizers=normalizers_for(rank), num_groups=3, epsilon=epsilon, weights=weights)
    y, stats = reference.call(jit_switch_norm, case, **options)
    y_ref, bn_mean, bn_var = reference.call(reference.switch_norm, case, **options)
    assert_matches(y, y_ref)
    assert_matches(stats.mean, bn_mean)
    assert_matches(stats.var, bn_var)


@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_fine_weights_in_inference_use_the_running_averages_against_the_reference(rng, weights):
    case = fine_case(rng, 4, weights)
    case["x"] = with_rows(case["x"])
    c = SHAPES[4][-1]
    case["running_mean"] = jnp.asarray(rng.normal(size=c), jnp.float32)
    case["running_var"] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    options = dict(normalizers=ALL, num_groups=3, weights=weights)
    y, stats = reference.call(jit_switch_norm, case, use_running_average=True, **options)
    y_ref, _, _ = reference.call(reference.switch_norm, case, **options)
    assert stats is None
    assert_matches(y, y_ref)


def test_per_sample_weights_differ_between_samples(rng):
    # The two rescaled samples get other weights than the rest: compare each sample's
    # output with the output of the layer given that sample's reference weights.
    case = fine_case(rng, 4, "sample")
    x = np.asarray(with_rows(case["x"]), np.float64)
    stats = [reference.scope_stats(x, n, 3) for n in ALL]
    logits = np.stack([case["mean_logits"], case["var_logits"]])
    w = reference.sample_weights(x, stats, logits, np.asarray(case["sample_map"]), 1e-5)
    assert np.abs(w[..., 0] - w[..., -1]).max() > 0.1  # a sample map that matters


@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_channel_and_sample_weights_with_sparsestmax_at_full_radius_pick_one_normalizer(rng, weights):
    # At radius 1 every channel's (or sample's) weights are one-hot on its largest logit: the
    # reference with those one-hot weights (as logits 0 / -1e3) must agree.
    case = fine_case(rng, 4, weights)
    options = dict(normalizers=ALL, num_groups=3, weights=weights)
    y, _ = reference.call(jit_switch_norm, case, mixing="sparsestmax", radius=1.0, **options)
    if weights == "channel":
        one_hot = lambda z: np.where(z == z.max(axis=0), 0.0, -1e3)  # noqa: E731
        picked = dict(case, mean_logits=one_hot(case["mean_logits"]), var_logits=one_hot(case["var_logits"]))
        y_ref, _, _ = reference.call(reference.switch_norm, picked, **options)
        assert_matches(y, y_ref)
    else:  # the per-sample logits are the reference's; each sample on its own largest one
        x = np.asarray(case["x"], np.float64)
        stats = [reference.scope_stats(x, n, 3) for n in ALL]
        logits = np.stack([case["mean_logits"], case["var_logits"]])
        soft = reference.sample_weights(x, stats, logits, np.asarray(case["sample_map"]), 1e-5)
        hard = (soft == soft.max(axis=1, keepdims=True)).astype(np.float64)  # (2, K, N)
        mu = sum(
            hard[0, k].reshape(-1, 1, 1, 1) * np.broadcast_to(s[0], x.shape) for k, s in enumerate(stats)
        )
        var = sum(
            hard[1, k].reshape(-1, 1, 1, 1) * np.broadcast_to(s[1], x.shape) for k, s in enumerate(stats)
        )
        y_ref = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(case["scale"]) + np.asarray(case["bias"])
        assert_matches(y, y_ref)


# --------------------------------------------------------------------------
# Gradients, in float64.
# --------------------------------------------------------------------------


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _loss(fn, weights: str, normalizers, args: dict):
    y, _ = reference.call(fn, args, normalizers=normalizers, num_groups=3, weights=weights)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_custom_vjp_gradients_equal_autodiff_in_float64(rng, x64, weights, rank):
    case = fine_case(rng, rank, weights, dtype=np.float64)
    case["x"] = with_rows(case["x"])
    normalizers = normalizers_for(rank)
    # jit: eagerly, the backward pass dispatches hundreds of tiny float64 ops one by one
    got = jax.jit(jax.grad(lambda a: _loss(switch_norm, weights, normalizers, a)))(case)
    want = jax.jit(jax.grad(lambda a: _loss(switch_norm_autodiff, weights, normalizers, a)))(case)
    for name in case:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    if weights == "sample":  # the map's gradient is not zero at a random point
        assert np.abs(got["sample_map"]).max() > 1e-3


@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_gradients_match_finite_differences_in_float64(rng, x64, weights):
    case = fine_case(rng, 3, weights, dtype=np.float64)
    case["x"] = with_rows(case["x"])
    loss = jax.jit(lambda a: _loss(switch_norm, weights, ALL, a))  # still float64, without eager dispatch
    check_grads(loss, (case,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_sample_map_gradient_at_zero_is_descriptors_times_logit_gradient(rng, x64):
    # At a zero map, dL/dmap[t, d, k] = sum_n D[n, d] * dL/dz[t, n, k]: the map learns from the start.
    case = fine_case(rng, 4, "sample", dtype=np.float64)
    case["sample_map"] = jnp.zeros_like(case["sample_map"])
    case["x"] = with_rows(case["x"])
    grad = jax.grad(lambda a: _loss(switch_norm, "sample", ALL, a))(case)
    assert np.abs(grad["sample_map"]).max() > 1e-3


# --------------------------------------------------------------------------
# The front ends hold the parameters and call the same core.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["channel", "sample"])
def test_nnx_and_linen_layers_hold_the_shapes_and_equal_the_core(rng, weights):
    x = with_rows(reference.channel_input(rng, (4, 5, 5, 6)).astype(np.float32))
    layer = switchnorm.SwitchNorm(6, weights=weights, num_groups=3, rngs=nnx.Rngs(0))
    linen = snn.SwitchNorm(weights=weights, num_groups=3)
    variables = linen.init(jax.random.key(0), x, use_running_average=False)
    params = variables["params"]
    want_shape = (4, 6) if weights == "channel" else (4,)
    assert layer.mean_logits.shape == params["mean_logits"].shape == want_shape
    sample_map = None
    if weights == "sample":
        assert layer.sample_map.shape == params["sample_map"].shape == (2, 8, 4)
        sample_map = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
        layer.sample_map[...] = sample_map
        params = {**params, "sample_map": sample_map}
    else:
        assert layer.sample_map is None and "sample_map" not in params
    mean_logits = jnp.asarray(rng.normal(size=want_shape), jnp.float32)
    layer.mean_logits[...] = mean_logits
    params = {**params, "mean_logits": mean_logits}
    want, _ = switch_norm(
        x, mean_logits, jnp.zeros(want_shape), num_groups=3, weights=weights, sample_map=sample_map
    )
    y_linen, _ = linen.apply({**variables, "params": params}, x, use_running_average=False, mutable=True)
    np.testing.assert_array_equal(layer(x), want)
    np.testing.assert_array_equal(y_linen, want)


def test_nnx_sample_layer_on_dense_features_uses_the_bn_and_ln_part_of_its_map(rng):
    # A default layer holds all four normalizers' map and blends bn and ln on (N, C):
    # rows (offset, spread) and columns of those two only.
    x = with_rows(reference.channel_input(rng, (8, 6)).astype(np.float32))
    layer = switchnorm.SwitchNorm(6, weights="sample", rngs=nnx.Rngs(0))
    full_map = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)
    layer.sample_map[...] = full_map
    layer.mean_logits[...] = jnp.asarray([0.5, 9.0, -0.3, 9.0], jnp.float32)  # in, gn unused
    part = full_map[:, jnp.array([0, 1, 4, 5])][:, :, jnp.array([0, 2])]
    want, _ = switch_norm(
        x, jnp.asarray([0.5, -0.3]), jnp.zeros(2), normalizers=("bn", "ln"), weights="sample", sample_map=part
    )
    np.testing.assert_array_equal(layer(x), want)


# --------------------------------------------------------------------------
# Bad arguments.
# --------------------------------------------------------------------------


def test_bad_weights_and_shapes_are_refused_with_what_was_wrong(rng):
    x = jnp.ones((2, 3, 3, 6))
    with pytest.raises(ValueError, match="weights must be one of .*'rows'"):
        switch_norm(x, jnp.zeros(4), jnp.zeros(4), weights="rows")
    with pytest.raises(ValueError, match=r"mean_logits has shape \(4,\), expected \(4, 6\).*'channel'"):
        switch_norm(x, jnp.zeros(4), jnp.zeros(4), weights="channel")
    with pytest.raises(ValueError, match="weights='sample' needs sample_map"):
        switch_norm(x, jnp.zeros(4), jnp.zeros(4), weights="sample")
    with pytest.raises(ValueError, match=r"sample_map has shape \(2, 4, 4\), expected \(2, 8, 4\)"):
        switch_norm(x, jnp.zeros(4), jnp.zeros(4), weights="sample", sample_map=jnp.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="weights must be one of"):
        switchnorm.SwitchNorm(6, weights="Channel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weights must be one of"):
        snn.SwitchNorm(weights=None).init(jax.random.key(0), x, use_running_average=False)
