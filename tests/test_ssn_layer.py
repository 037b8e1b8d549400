"""Sparse Switchable Normalization: the layer with ``mixing="sparsestmax"``.

The weights come from ``sparsestmax(logits, radius)`` instead of softmax; the radius is state
the training loop sets (NNX: :class:`switchnorm.MixingRadius`, Linen: the "mixing_radius"
collection). References are independent of the library: ``reference.switch_norm`` (float64
NumPy) fed the weights of ``sparse_reference.sparsestmax`` (enumeration over faces).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_reference
from flax import linen as nn
from flax import nnx
from jax.test_util import check_grads
from reference import ALL, channel_input
from reference import switch_norm as reference_switch_norm

import switchnorm
from switchnorm import linen as snn
from switchnorm._core import switch_norm_autodiff
from switchnorm._mixing import mixing_weights_from_logits

SHAPE = (3, 4, 4, 6)
TOP = float(np.sqrt(1 - 1 / len(ALL)))  # radius from which every output is one-hot


def _logits(seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=len(ALL)), rng.normal(size=len(ALL))


# Close logits: sparsemax keeps 3 normalizers, 0.32 from the centre, so from radius 0.45 on the
# constraint binds and the weights move with the radius and the logits (random normal logits
# are often one-hot already at radius 0, where the radius would change nothing).
CLOSE_MEAN_LOGITS = (0.3, 0.1, 0.25, -0.2)
CLOSE_VAR_LOGITS = (0.2, 0.35, 0.1, 0.0)


def _reference_with_weights(x, mean_weights, var_weights, **kwargs):
    """reference.switch_norm takes logits and softmaxes them: log-weights give the weights back."""
    with np.errstate(divide="ignore"):
        return reference_switch_norm(x, np.log(mean_weights), np.log(var_weights), **kwargs)[0]


def test_softmax_default_is_unchanged_bit_for_bit(rng):
    x = jnp.asarray(channel_input(rng, SHAPE), jnp.float32)
    mean_logits, var_logits = (jnp.asarray(v, jnp.float32) for v in _logits(1))
    default, _ = switchnorm.switch_norm(x, mean_logits, var_logits, normalizers=ALL)
    explicit, _ = switchnorm.switch_norm(
        x, mean_logits, var_logits, normalizers=ALL, mixing="softmax", radius=0.7
    )
    np.testing.assert_array_equal(default, explicit)
    # The softmax of a few logits is unrolled (no reduction): jax.nn.softmax's values to a few ulps.
    np.testing.assert_allclose(
        mixing_weights_from_logits(mean_logits), jax.nn.softmax(mean_logits), rtol=5e-7
    )
    layer = switchnorm.SwitchNorm(6, rngs=nnx.Rngs(0))
    assert layer.radius is None and not nnx.state(layer, switchnorm.MixingRadius)


@pytest.mark.parametrize("radius", [0.0, 0.45, 0.6, TOP])
def test_sparsestmax_layer_equals_float64_reference(x64, rng, radius):
    x = channel_input(rng, SHAPE)
    mean_logits, var_logits = np.asarray(CLOSE_MEAN_LOGITS), np.asarray(CLOSE_VAR_LOGITS)
    y, _ = switchnorm.switch_norm(
        jnp.asarray(x), jnp.asarray(mean_logits), jnp.asarray(var_logits),
        normalizers=ALL, num_groups=2, mixing="sparsestmax", radius=radius,
    )  # fmt: skip
    mean_weights = sparse_reference.sparsestmax(mean_logits, radius)
    var_weights = sparse_reference.sparsestmax(var_logits, radius)
    want = _reference_with_weights(x, mean_weights, var_weights, num_groups=2)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


def test_radius_zero_gives_sparsemax_weights(x64):
    logits = jnp.asarray([[0.9, 0.1, 0.5, -1.0], [0.2, 0.25, 0.2, 0.1]])
    got = mixing_weights_from_logits(logits, "sparsestmax", 0.0)
    want = np.stack([sparse_reference.sparsemax(row) for row in np.asarray(logits)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert np.count_nonzero(want[0]) < 4  # sparse: not a softmax


@pytest.mark.parametrize(
    "chosen, flax_layer",
    [
        ("bn", lambda: nnx.BatchNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0))),
        ("ln", lambda: nnx.LayerNorm(6, epsilon=1e-5, reduction_axes=(1, 2, 3), rngs=nnx.Rngs(0))),
    ],
)
def test_top_radius_equals_the_chosen_flax_normalizer(rng, chosen, flax_layer):
    x = jnp.asarray(channel_input(rng, SHAPE), jnp.float32)
    layer = switchnorm.SwitchNorm(6, mixing="sparsestmax", rngs=nnx.Rngs(0))
    favour = jnp.asarray([0.2 if n == chosen else 0.0 for n in ALL])  # sparsemax: not one-hot
    layer.mean_logits[...] = favour
    layer.var_logits[...] = favour
    assert switchnorm.set_radius(layer, 1.0) == 1
    np.testing.assert_allclose(layer(x), flax_layer()(x), rtol=2e-5, atol=2e-5)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.norms = nnx.List([switchnorm.SwitchNorm(6, mixing="sparsestmax", rngs=rngs) for _ in range(2)])
        self.plain = switchnorm.SwitchNorm(6, rngs=rngs)  # softmax: no radius to set


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.block = _Block(rngs)
        self.head = switchnorm.SwitchNorm(6, mixing="sparsestmax", rngs=rngs)

    def __call__(self, x):
        for norm in self.block.norms:
            x = norm(x)
        return self.head(self.block.plain(x))


def test_set_radius_reaches_every_layer_of_a_nested_nnx_model():
    model = _Model(nnx.Rngs(0))
    assert switchnorm.set_radius(model, 0.4) == 3
    radii = jax.tree.leaves(nnx.state(model, switchnorm.MixingRadius))
    assert len(radii) == 3 and all(float(r) == np.float32(0.4) for r in radii)
    assert model.block.plain.radius is None


class _LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = snn.SwitchNorm(mixing="sparsestmax", use_running_average=False)(x)
        return snn.SwitchNorm(mixing="sparsestmax", use_running_average=False)(x)


def test_linen_radius_collection_set_by_tree_map_gives_one_hot_weights(rng):
    x = jnp.asarray(channel_input(rng, SHAPE), jnp.float32)
    model = _LinenModel()
    variables = model.init(jax.random.key(0), x)
    assert len(jax.tree.leaves(variables["mixing_radius"])) == 2
    params = jax.tree.map(
        lambda p: p + jnp.arange(p.shape[-1]) * 0.1 if p.shape == (4,) else p, variables["params"]
    )
    set_to = jax.tree.map(lambda r: jnp.full_like(r, 1.0), variables["mixing_radius"])
    variables = {**variables, "params": params, "mixing_radius": set_to}
    for layer in switchnorm.mixing_weights(variables).values():
        assert layer["mean"] == {"bn": 0.0, "in": 0.0, "ln": 0.0, "gn": 1.0}


def test_linen_layer_reads_its_radius_from_the_collection(rng):
    x = jnp.asarray(channel_input(rng, SHAPE), jnp.float32)
    layer = snn.SwitchNorm(mixing="sparsestmax", use_running_average=False)
    variables = layer.init(jax.random.key(0), x)
    favour_bn = jnp.asarray([0.2, 0.0, 0.0, 0.0])  # sparsemax: not one-hot
    params = {**variables["params"], "mean_logits": favour_bn, "var_logits": favour_bn}
    radius = jax.tree.map(lambda r: jnp.full_like(r, 1.0), variables["mixing_radius"])
    variables = {**variables, "params": params, "mixing_radius": radius}
    y, _ = layer.apply(variables, x, mutable=["batch_stats"])
    batch_norm = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
    want, _ = batch_norm.apply(batch_norm.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_check_grads_float64_through_sparsestmax(x64, rng):
    x = jnp.asarray(channel_input(rng, (2, 3, 4)))
    mean_logits, var_logits = jnp.asarray(CLOSE_MEAN_LOGITS), jnp.asarray(CLOSE_VAR_LOGITS)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 4))

    def f(x, mean_logits, var_logits, scale):
        return switchnorm.switch_norm(
            x, mean_logits, var_logits, scale=scale, normalizers=ALL, mixing="sparsestmax", radius=0.45
        )[0]

    weights = sparse_reference.sparsestmax(np.asarray(mean_logits), 0.45)
    assert 1 < np.count_nonzero(weights) < 4  # a face where the weights move with the logits
    check_grads(  # jitted: still float64, without dispatching each tiny op eagerly
        jax.jit(f),
        (x, mean_logits, var_logits, scale),
        order=1,
        modes=["rev"],
        eps=1e-6,
        atol=1e-6,
        rtol=1e-6,
    )


def test_custom_vjp_equals_autodiff_with_sparsestmax(x64, rng):
    x = jnp.asarray(channel_input(rng, SHAPE))
    mean_logits, var_logits = jnp.asarray(CLOSE_MEAN_LOGITS), jnp.asarray(CLOSE_VAR_LOGITS)
    dy = jnp.asarray(rng.normal(size=SHAPE))
    kwargs = dict(normalizers=ALL, mixing="sparsestmax", radius=jnp.asarray(0.45))

    def loss(norm):
        return lambda x, m, v: jnp.sum(norm(x, m, v, **kwargs)[0] * dy)

    custom = jax.jit(jax.grad(loss(switchnorm.switch_norm), argnums=(0, 1, 2)))(x, mean_logits, var_logits)
    plain = jax.jit(jax.grad(loss(switch_norm_autodiff), argnums=(0, 1, 2)))(x, mean_logits, var_logits)
    for a, b in zip(custom, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert np.abs(custom[1]).max() > 1e-3  # the logits do get a gradient


def test_jit_grad_and_state_round_trip_with_the_radius(rng):
    x = jnp.asarray(channel_input(rng, SHAPE), jnp.float32)
    model = _Model(nnx.Rngs(0))
    model.head.mean_logits[...] = jnp.asarray(CLOSE_MEAN_LOGITS)

    @nnx.jit
    def step(model, x, step_index):
        switchnorm.set_radius(model, switchnorm.radius_schedule(step_index, 10))
        loss = lambda m: jnp.mean(m(x) ** 2 * jnp.arange(6))  # noqa: E731
        return nnx.grad(loss)(model)

    grads = step(model, x, 5)
    assert float(model.head.radius[...]) == 0.5
    assert np.abs(grads.head.mean_logits[...]).max() > 1e-4
    assert not jax.tree.leaves(nnx.state(grads, switchnorm.MixingRadius))  # not a Param
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree.leaves(nnx.state(model, switchnorm.MixingRadius))) == 3
    assert any(
        isinstance(v, switchnorm.MixingRadius)
        for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    restored = nnx.merge(graphdef, params, rest)
    np.testing.assert_array_equal(restored.head.radius[...], 0.5)
    np.testing.assert_array_equal(restored(x), model(x))


def test_mixing_weights_are_one_hot_at_the_top_radius():
    layer = switchnorm.SwitchNorm(6, mixing="sparsestmax", rngs=nnx.Rngs(0))
    layer.mean_logits[...] = jnp.asarray([0.1, 0.9, 0.2, -1.0])
    layer.var_logits[...] = jnp.asarray([0.5, 0.3, 0.2, 0.0])
    switchnorm.set_radius(layer, switchnorm.radius_schedule(100, 100))
    weights = switchnorm.mixing_weights(layer)[""]
    assert weights["mean"] == {"bn": 0.0, "in": 1.0, "ln": 0.0, "gn": 0.0}
    assert weights["var"] == {"bn": 1.0, "in": 0.0, "ln": 0.0, "gn": 0.0}
    switchnorm.set_radius(layer, 0.0)  # sparsemax, still sparse but not one-hot
    assert switchnorm.mixing_weights(layer)[""]["mean"]["gn"] == 0.0
    assert switchnorm.mixing_weights(layer)[""]["mean"]["in"] < 1.0


def test_radius_schedule_rises_linearly_to_final():
    got = [float(switchnorm.radius_schedule(s, 8, final=0.8)) for s in (0, 2, 8, 20)]
    np.testing.assert_allclose(got, [0.0, 0.2, 0.8, 0.8], rtol=1e-6)
    assert 1.0 >= TOP  # the default final reaches one-hot for every K


def test_bad_mixing_names_the_argument_and_the_choices(rng):
    x = jnp.ones((2, 3, 4))
    message = r"mixing must be one of \('softmax', 'sparsestmax'\), got 'sparsemax'"
    with pytest.raises(ValueError, match=message):
        switchnorm.switch_norm(x, jnp.zeros(4), jnp.zeros(4), mixing="sparsemax")
    with pytest.raises(ValueError, match=message):
        switchnorm.SwitchNorm(4, mixing="sparsemax", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        snn.SwitchNorm(mixing="sparsemax").init(jax.random.key(0), x, use_running_average=False)
