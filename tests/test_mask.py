"""A call-time ``mask`` (as Flax's BatchNorm, LayerNorm and GroupNorm take): every normalizer's
statistics read only the masked-in elements, and every element is normalized. Checked against
the float64 reference, Flax's own layers with the same mask, and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import linen as nn
from flax import nnx
from jax.test_util import check_grads
from reference import ALL, SHAPES, C, assert_matches, random_case

import switchnorm
from switchnorm import linen as snn
from switchnorm import switch_norm
from switchnorm._core import switch_norm_autodiff

STATIC = ("normalizers", "num_groups", "epsilon", "use_running_average", "weights")
jit_switch_norm = jax.jit(switch_norm, static_argnames=STATIC)


def normalizers_for(rank: int) -> tuple[str, ...]:
    return ALL if rank > 2 else ("bn", "ln")


def padding_mask(rng: np.random.Generator, shape, per_position: bool = True) -> jax.Array:
    """Booleans for x of ``shape``: sample 0 keeps every element, sample 1 none, the others a
    random prefix of their positions (padded sequences); per element where not ``per_position``.

    Per position, one (N, *S, 1) mask covers all channels, as a padding mask does."""
    n, c = shape[0], shape[-1]
    positions = int(np.prod(shape[1:-1], dtype=int))
    lengths = np.concatenate([[positions, 0], rng.integers(1, positions + 1, n - 2)])
    keep = np.arange(positions)[None, :] < lengths[:, None]  # (N, positions)
    if not per_position:
        keep = rng.random((n, positions, c)) < 0.6
        keep[0], keep[1] = True, False
        return jnp.asarray(keep.reshape(shape))
    return jnp.asarray(keep.reshape(*shape[:-1], 1))


def masked_case(rng: np.random.Generator, rank: int, weights: str = "layer", dtype=np.float32) -> dict:
    """A random case with a mask; padded positions hold values far from the data."""
    shape = SHAPES[rank] if rank > 2 else (8, SHAPES[2][-1])
    normalizers = normalizers_for(rank)
    case = random_case(rng, shape, len(normalizers), dtype)
    case["mask"] = padding_mask(rng, shape, per_position=rank > 2)
    case["x"] = jnp.where(case["mask"], case["x"], jnp.asarray(50.0, dtype))
    if weights == "channel":
        case["mean_logits"] = jnp.asarray(rng.normal(size=(len(normalizers), shape[-1])), dtype)
        case["var_logits"] = jnp.asarray(rng.normal(size=(len(normalizers), shape[-1])), dtype)
    if weights == "sample":
        k = len(normalizers)
        case["sample_map"] = jnp.asarray(rng.normal(size=(2, 2 * k, k)), dtype)
    return case


# --------------------------------------------------------------------------
# The output is the definition.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank, epsilon", [(2, 1e-5), (3, 0.5), (4, 1e-5)])
@pytest.mark.parametrize("weights", ["layer", "channel", "sample"])
def test_masked_layer_matches_float64_reference(rng, weights, rank, epsilon):
    case = masked_case(rng, rank, weights)
    options = dict(normalizers=normalizers_for(rank), num_groups=3, epsilon=epsilon, weights=weights)
    y, stats = reference.call(jit_switch_norm, case, **options)
    y_ref, bn_mean, bn_var = reference.call(reference.switch_norm, case, **options)
    assert_matches(y, y_ref)
    assert_matches(stats.mean, bn_mean)
    assert_matches(stats.var, bn_var)


@pytest.mark.parametrize("weights", ["layer", "sample"])
def test_masked_inference_uses_running_averages_and_masked_sample_statistics(rng, weights):
    case = masked_case(rng, 4, weights)
    c = SHAPES[4][-1]
    case["running_mean"] = jnp.asarray(rng.normal(size=c), jnp.float32)
    case["running_var"] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    options = dict(normalizers=ALL, num_groups=3, weights=weights)
    y, stats = reference.call(jit_switch_norm, case, use_running_average=True, **options)
    y_ref, _, _ = reference.call(reference.switch_norm, case, **options)
    assert stats is None
    assert_matches(y, y_ref)


def test_element_masks_that_differ_between_channels_match_the_reference(rng):
    case = random_case(rng, SHAPES[4], 4)
    case["mask"] = padding_mask(rng, SHAPES[4], per_position=False)
    y, stats = reference.call(jit_switch_norm, case, num_groups=3)
    y_ref, bn_mean, bn_var = reference.call(reference.switch_norm, case, num_groups=3)
    assert_matches(y, y_ref)
    assert_matches(stats.var, bn_var)


@pytest.mark.parametrize("rank", [2, 4])
def test_an_all_true_mask_is_no_mask(rng, rank):
    case = random_case(rng, SHAPES[rank], len(normalizers_for(rank)))
    options = dict(normalizers=normalizers_for(rank), num_groups=3)
    want, want_stats = reference.call(jit_switch_norm, case, **options)
    got, got_stats = reference.call(jit_switch_norm, dict(case, mask=jnp.ones(SHAPES[rank], bool)), **options)
    assert_matches(got, want, ulps=8)
    assert_matches(got_stats.var, want_stats.var, ulps=8)


@pytest.mark.parametrize("padding", [-1e6, 1e30, np.inf, np.nan])
def test_masked_out_values_do_not_reach_the_statistics(rng, padding):
    # Padding of any value (NaN and inf included) changes nothing at the masked-in elements.
    case = masked_case(rng, 4)
    padded = dict(case, x=jnp.where(case["mask"], case["x"], jnp.float32(padding)))
    want, want_stats = reference.call(jit_switch_norm, case, num_groups=3)
    got, got_stats = reference.call(jit_switch_norm, padded, num_groups=3)
    kept = np.broadcast_to(np.asarray(case["mask"]), want.shape)
    np.testing.assert_array_equal(np.asarray(got)[kept], np.asarray(want)[kept])
    np.testing.assert_array_equal(got_stats.mean, want_stats.mean)
    np.testing.assert_array_equal(got_stats.var, want_stats.var)


def test_masked_statistics_keep_float32_digits_at_a_large_mean(rng):
    # Data at mean 1e4, std 1, padded with zeros in front (the mask reversed): each cell's
    # shift is its first kept element, not the padding, so float32 stays within 1e-3 of float64.
    case = masked_case(rng, 4)
    case["mask"] = case["mask"][:, ::-1, ::-1]
    x = np.asarray(reference.channel_input(rng, SHAPES[4])) * 0.3 + 1e4
    case["x"] = jnp.asarray(np.where(np.asarray(case["mask"]), x, 0.0), jnp.float32)
    y, _ = reference.call(jit_switch_norm, case, num_groups=3)
    y_ref, _, _ = reference.call(
        reference.switch_norm, dict(case, x=np.asarray(case["x"], np.float64)), num_groups=3
    )
    kept = np.broadcast_to(np.asarray(case["mask"]), y.shape)
    np.testing.assert_allclose(np.asarray(y)[kept], y_ref[kept], atol=1e-3)


def test_a_scope_with_nothing_kept_has_mean_and_variance_zero(rng):
    # Sample 1 is all padding: its in, ln and gn statistics are 0, so with ln alone its
    # output is x / sqrt(epsilon) * scale + bias, finite, while the other samples are unchanged.
    case = dict(masked_case(rng, 3), mean_logits=jnp.zeros(1), var_logits=jnp.zeros(1))
    y, _ = reference.call(jit_switch_norm, case, normalizers=("ln",), epsilon=0.25)
    want = np.asarray(case["x"][1]) / 0.5 * np.asarray(case["scale"]) + np.asarray(case["bias"])
    assert_matches(y[1], want)


@pytest.mark.parametrize("rank", [2, 4])
def test_a_mask_under_vmap_with_axis_name_gives_the_whole_batchs_statistics(rng, rank):
    # Shards of 2 samples under jax.vmap(axis_name="shards"), in-process (tests/test_distributed.py
    # does it on 8 devices): shard 0 keeps everything, shard 1 nothing, shard 2 a few elements.
    # bn's statistics are the whole batch's masked ones, the same on every shard.
    shape = (6, 4, 3, C) if rank == 4 else (6, C)
    normalizers = normalizers_for(rank)
    case = random_case(rng, shape, len(normalizers))
    positions = int(np.prod(shape[1:-1], dtype=int))
    lengths = np.array([positions, positions, 0, 0, 1, positions // 2 + 1])
    keep = (np.arange(positions)[None, :] < lengths[:, None]).reshape(*shape[:-1], 1)
    case["mask"] = jnp.asarray(keep if rank == 4 else np.broadcast_to(keep, shape))
    case["x"] = jnp.where(case["mask"], case["x"], jnp.float32(50.0))
    options = dict(normalizers=normalizers, num_groups=3)

    def shard(x, mask):
        y, stats = switch_norm(**dict(case, x=x, mask=mask), axis_name="shards", **options)
        return y, stats.mean, stats.var

    split = lambda a: a.reshape(3, 2, *a.shape[1:])  # noqa: E731
    y, mean, var = jax.jit(jax.vmap(shard, axis_name="shards"))(split(case["x"]), split(case["mask"]))
    y_ref, bn_mean, bn_var = reference.call(reference.switch_norm, case, **options)
    assert_matches(np.asarray(y).reshape(shape), y_ref)
    for shard_mean, shard_var in zip(np.asarray(mean), np.asarray(var), strict=True):
        assert_matches(shard_mean, bn_mean)
        assert_matches(shard_var, bn_var)


# --------------------------------------------------------------------------
# Flax's own layers with the same mask.
# --------------------------------------------------------------------------


def one_hot_logits(k: int, num: int = 4) -> jax.Array:
    return jnp.asarray(np.where(np.arange(num) == k, 0.0, -1e4), jnp.float32)


FLAX_LAYERS = {
    "bn": lambda: nnx.BatchNorm(6, use_running_average=False, momentum=0.8, rngs=nnx.Rngs(0)),
    "ln": lambda: nnx.LayerNorm(6, reduction_axes=(1, 2, 3), rngs=nnx.Rngs(0)),
    "gn": lambda: nnx.GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", ["bn", "ln", "gn"])
def test_one_normalizer_with_a_mask_equals_flax_with_that_mask(rng, name):
    x = reference.data(rng, SHAPES[4])
    mask = jnp.broadcast_to(padding_mask(rng, SHAPES[4]), SHAPES[4])  # Flax's GroupNorm wants x's shape
    layer = switchnorm.SwitchNorm(6, normalizers=(name,), num_groups=3, momentum=0.8, rngs=nnx.Rngs(0))
    flax_layer = FLAX_LAYERS[name]()
    got = layer(x, use_running_average=False, mask=mask)
    want = flax_layer(x, mask=mask)
    others = np.arange(x.shape[0]) != 1  # sample 1 is all padding: NaN in Flax's ln and gn, finite here
    assert_matches(got[others], want[others], ulps=128)
    assert np.isfinite(np.asarray(got)).all()
    if name == "bn":  # the running averages move to the masked batch statistics, as Flax's
        np.testing.assert_allclose(layer.mean[...], flax_layer.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.var[...], flax_layer.var[...], rtol=1e-5, atol=1e-6)


def test_linen_layer_with_a_mask_equals_linen_batchnorm_with_it(rng):
    x = reference.data(rng, SHAPES[3])
    mask = padding_mask(rng, SHAPES[3])
    ours = snn.SwitchNorm(use_running_average=False, normalizers=("bn",), momentum=0.8)
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.8)
    got, got_vars = ours.apply(ours.init(jax.random.key(0), x), x, mask=mask, mutable=["batch_stats"])
    want, want_vars = theirs.apply(theirs.init(jax.random.key(0), x), x, mask=mask, mutable=["batch_stats"])
    assert_matches(got, want, ulps=128)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            got_vars["batch_stats"][name], want_vars["batch_stats"][name], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["raw-sums", "shifted-sums"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_a_mask_with_length_1_axes_equals_it_broadcast_to_x(rng, rank, dtype, offset):
    # A padding mask, (N, *S, 1) (or (N, 1) for (N, C) input), is read at its own shape, 1/C of
    # x's: counted, and multiplied into the sums, without being broadcast first. Broadcast to x's
    # shape, the same mask must give the same output and statistics, on either statistics branch
    # (mean 1e4 takes the shifted sums).
    case = masked_case(rng, rank, dtype=np.float32)
    if rank == 2:
        case["mask"] = case["mask"][:, :1]
    case["x"] = jnp.asarray(case["x"] + offset, dtype)
    options = dict(normalizers=normalizers_for(rank), num_groups=3)
    assert 1 in case["mask"].shape[1:]
    got, got_stats = reference.call(jit_switch_norm, case, **options)
    full = jnp.broadcast_to(case["mask"], case["x"].shape)
    want, want_stats = reference.call(jit_switch_norm, dict(case, mask=full), **options)
    # The same sums, maybe added in another order: equal to a few ulps.
    assert_matches(got, want, ulps=4, dtype=dtype)
    assert_matches(got_stats.mean, want_stats.mean, ulps=4)
    assert_matches(got_stats.var, want_stats.var, ulps=4)


def test_linen_feature_axes_take_a_mask_broadcast_along_some_of_them(rng):
    # axis=(1, 3): the mask's feature axes flatten into the channel axis with x's, so one that is
    # 1 along axis 3 only is broadcast along it first; one that is 1 along both stays 1.
    x = reference.data(rng, (4, 3, 5, 2))
    module = snn.SwitchNorm(use_running_average=False, axis=(1, 3), num_groups=2)
    variables = module.init(jax.random.key(0), x)
    for shape in [(4, 3, 5, 1), (4, 1, 5, 1), (5, 1)]:
        mask = jnp.asarray(rng.random(shape) < 0.7).at[..., 0, :].set(True)
        got, _ = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        full = jnp.broadcast_to(mask, x.shape)
        want, _ = module.apply(variables, x, mask=full, mutable=["batch_stats"])
        assert_matches(got, want, ulps=4)


@pytest.mark.parametrize("front_end", ["nnx", "linen"])
def test_front_ends_move_the_mask_with_a_channels_first_axis(rng, front_end):
    # axis=1 (channels first): the mask is moved with x, so the result is the
    # channels-last core's on the transposed input and mask.
    x = reference.data(rng, SHAPES[4])
    mask = padding_mask(rng, SHAPES[4], per_position=False)
    first = lambda a: jnp.moveaxis(a, -1, 1)  # noqa: E731
    if front_end == "nnx":
        layer = switchnorm.SwitchNorm(6, axis=1, num_groups=3, rngs=nnx.Rngs(0))
        got = layer(first(x), use_running_average=False, mask=first(mask))
    else:
        module = snn.SwitchNorm(use_running_average=False, axis=1, num_groups=3)
        variables = module.init(jax.random.key(0), first(x))
        got, _ = module.apply(variables, first(x), mask=first(mask), mutable=["batch_stats"])
    want, _ = switch_norm(
        x, jnp.zeros(4), jnp.zeros(4), scale=jnp.ones(6), bias=jnp.zeros(6), num_groups=3, mask=mask
    )
    assert_matches(jnp.moveaxis(got, 1, -1), want, ulps=8)


# --------------------------------------------------------------------------
# Gradients, in float64.
# --------------------------------------------------------------------------


def _loss(fn, weights: str, normalizers, args: dict):
    y, _ = reference.call(fn, args, normalizers=normalizers, num_groups=3, weights=weights)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


def _differentiable(case: dict) -> tuple[dict, jax.Array]:
    return {k: v for k, v in case.items() if k != "mask"}, case["mask"]


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("weights", ["layer", "sample"])
def test_masked_custom_vjp_gradients_equal_autodiff_in_float64(rng, x64, weights, rank):
    args, mask = _differentiable(masked_case(rng, rank, weights, dtype=np.float64))
    normalizers = normalizers_for(rank)
    got = jax.jit(jax.grad(lambda a: _loss(switch_norm, weights, normalizers, dict(a, mask=mask))))(args)
    want = jax.jit(jax.grad(lambda a: _loss(switch_norm_autodiff, weights, normalizers, dict(a, mask=mask))))(
        args
    )
    for name in args:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_masked_gradients_match_finite_differences_in_float64(rng, x64):
    args, mask = _differentiable(masked_case(rng, 3, "layer", dtype=np.float64))
    mask = mask.at[1, 0].set(True)  # an all-padding sample's y = x / sqrt(eps) defeats finite differences
    check_grads(
        jax.jit(lambda a: _loss(switch_norm, "layer", ALL, dict(a, mask=mask))),
        (args,),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
    )


def test_masked_out_elements_get_only_their_own_normalization_gradient(rng, x64):
    # A padded element enters no statistic: dy/dx there is a's diagonal term alone, so
    # the gradient of sum(y * w) at a padded element is w * scale / sqrt(mixed var + eps).
    args, mask = _differentiable(masked_case(rng, 3, "layer", dtype=np.float64))
    w = jnp.asarray(rng.normal(size=args["x"].shape))
    loss = lambda a: jnp.sum(reference.call(switch_norm, dict(a, mask=mask), num_groups=3)[0] * w)  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    grad_x = grad(args)["x"]
    moved = grad(dict(args, x=args["x"] + jnp.where(mask, 0.0, 3.0)))["x"]
    padded = ~np.broadcast_to(np.asarray(mask), grad_x.shape)
    # the padded elements' gradient does not depend on their value
    np.testing.assert_allclose(np.asarray(moved)[padded], np.asarray(grad_x)[padded], rtol=1e-12)


# --------------------------------------------------------------------------
# Bad masks are refused, naming what was wrong.
# --------------------------------------------------------------------------


def test_bad_masks_are_refused_with_what_was_wrong(rng):
    x = reference.data(rng, SHAPES[4])
    logits = jnp.zeros(4)
    with pytest.raises(TypeError, match="mask must be a boolean array.*float32"):
        switch_norm(x, logits, logits, num_groups=3, mask=jnp.ones(SHAPES[4]))
    with pytest.raises(TypeError, match="mask must be a boolean array, got list"):
        switch_norm(x, logits, logits, num_groups=3, mask=[True])
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\).*\(3, 4, 3, 6\)"):
        switch_norm(x, logits, logits, num_groups=3, mask=jnp.ones((3, 4), bool))
    layer = switchnorm.SwitchNorm(6, num_groups=3, use_running_average=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4, 3, 5\)"):
        layer(x, mask=jnp.ones((3, 4, 3, 5), bool))


# --------------------------------------------------------------------------
# Collapsed layers take the same calls: the feature axis and the mask.
# --------------------------------------------------------------------------


def one_hot_layer(choice: str, **kwargs) -> switchnorm.SwitchNorm:
    """A channels-first SwitchNorm whose weights are exactly one-hot on ``choice`` (logits 0 / -inf)."""
    layer = switchnorm.SwitchNorm(6, axis=1, num_groups=3, rngs=nnx.Rngs(0), **kwargs)
    layer.mean_logits[...] = jnp.where(jnp.arange(4) == ALL.index(choice), 0.0, -jnp.inf)
    layer.var_logits[...] = layer.mean_logits[...]
    layer.scale[...] = jnp.linspace(0.5, 1.5, 6)
    return layer


@pytest.mark.parametrize("choice", ["ln", "gn", "bn"])
def test_collapsed_channels_first_layers_equal_the_layer_with_a_mask(rng, choice):
    # The collapsed layer keeps the layer's feature axis and takes its mask; in inference bn
    # folds into a ChannelAffine, which takes (and, as nnx.BatchNorm there, needs no) mask.
    x = jnp.moveaxis(reference.data(rng, SHAPES[4]), -1, 1)
    mask = jnp.moveaxis(padding_mask(rng, SHAPES[4]), -1, 1)
    layer = one_hot_layer(choice, use_running_average=choice == "bn")
    layer.mean[...], layer.var[...] = jnp.linspace(-1.0, 1.0, 6), jnp.linspace(0.5, 2.0, 6)
    collapsed, _ = switchnorm.collapse(layer)
    assert isinstance(collapsed, switchnorm.ChannelAffine if choice == "bn" else switchnorm.CollapsedNorm)
    np.testing.assert_allclose(collapsed(x, mask=mask), layer(x, mask=mask), rtol=1e-6, atol=1e-6)
