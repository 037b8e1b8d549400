"""The Flax NNX front end, ``switchnorm.SwitchNorm``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from reference import ALL, SHAPES, SINGLE_CASES, C, assert_matches, data

import switchnorm


@nnx.jit
def forward(model, x):
    """One jitted call of any NNX layer; state updates flow back into ``model``."""
    return model(x)


def flax_counterpart(name, rank):
    """The Flax layer that computes what a single-normalizer SwitchNorm computes, at Flax's defaults.

    Each takes its own default epsilon (1e-5 for BatchNorm, 1e-6 for the others), as the
    SwitchNorm of that one normalizer does.
    """
    rngs = nnx.Rngs(0)
    if name == "bn":
        return nnx.BatchNorm(C, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
    if name == "in":
        return nnx.InstanceNorm(C, use_fast_variance=False, rngs=rngs)
    if name == "ln":  # the ln scope: every non-batch axis
        return nnx.LayerNorm(
            C,
            reduction_axes=tuple(range(1, rank)),
            feature_axes=-1,
            use_fast_variance=False,
            rngs=rngs,
        )
    return nnx.GroupNorm(C, num_groups=3, use_fast_variance=False, rngs=rngs)


@pytest.mark.parametrize("name, rank", SINGLE_CASES)
def test_single_normalizer_equals_the_flax_layer(rng, name, rank):
    ours = switchnorm.SwitchNorm(C, normalizers=(name,), num_groups=3, rngs=nnx.Rngs(0))
    theirs = flax_counterpart(name, rank)
    scale, bias = rng.uniform(0.5, 1.5, C), rng.normal(size=C)
    for layer in (ours, theirs):
        layer.scale[...] = jnp.asarray(scale, jnp.float32)
        layer.bias[...] = jnp.asarray(bias, jnp.float32)
    for step in range(2):  # two training steps: running averages compound
        x = data(rng, SHAPES[rank], offset=step)
        np.testing.assert_allclose(forward(ours, x), forward(theirs, x), rtol=1e-5, atol=1e-5)
    if name == "bn":
        np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-5, atol=1e-6)
        assert not np.allclose(ours.mean[...], 0.0)  # the averages did move
    ours.eval()
    theirs.eval()
    x = data(rng, SHAPES[rank])
    np.testing.assert_allclose(forward(ours, x), forward(theirs, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Parameters and state: Flax BatchNorm's names, logits start at zero.
# --------------------------------------------------------------------------


def test_parameters_and_running_averages_are_named_and_initialised_like_batchnorm():
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
    assert set(params) == {"scale", "bias", "mean_logits", "var_logits"}
    assert set(stats) == {"mean", "var"}
    np.testing.assert_array_equal(params["mean_logits"], np.zeros(4))
    np.testing.assert_array_equal(params["var_logits"], np.zeros(4))
    np.testing.assert_array_equal(params["scale"], np.ones(C))
    np.testing.assert_array_equal(params["bias"], np.zeros(C))
    np.testing.assert_array_equal(stats["mean"], np.zeros(C))
    np.testing.assert_array_equal(stats["var"], np.ones(C))
    assert layer.momentum == 0.99 and layer.epsilon == 1e-5
    assert layer.use_running_average is False


def test_without_bn_there_are_no_running_averages():
    layer = switchnorm.SwitchNorm(C, normalizers=("in", "ln"), rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(layer, nnx.BatchStat))
    assert nnx.state(layer, nnx.Param)["mean_logits"][...].shape == (2,)


def test_use_scale_and_use_bias_false_leave_those_parameters_out(rng):
    layer = switchnorm.SwitchNorm(C, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == {"mean_logits", "var_logits"}
    x = data(rng, SHAPES[4])
    y_ref, _, _ = reference.switch_norm(x, np.zeros(4), np.zeros(4), num_groups=3)
    assert_matches(forward(layer, x), y_ref)


def test_dtype_and_param_dtype(rng):
    layer = switchnorm.SwitchNorm(C, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer.scale[...].dtype == jnp.bfloat16
    assert layer.mean_logits[...].dtype == jnp.bfloat16
    assert forward(layer, data(rng, SHAPES[4])).dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# The blend, through the module.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_random_logits_match_float64_reference(rng, rank):
    layer = switchnorm.SwitchNorm(C, num_groups=2, rngs=nnx.Rngs(0))
    for name in ("mean_logits", "var_logits"):
        getattr(layer, name)[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
    x = data(rng, SHAPES[rank])
    y_ref, _, _ = reference.switch_norm(
        x,
        layer.mean_logits[...],
        layer.var_logits[...],
        scale=layer.scale[...],
        bias=layer.bias[...],
        num_groups=2,
    )
    assert_matches(forward(layer, x), y_ref)


def test_default_layer_blends_bn_and_ln_on_dense_features(rng):
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    mean_logits = jnp.asarray(rng.normal(size=4), jnp.float32)
    var_logits = jnp.asarray(rng.normal(size=4), jnp.float32)
    layer.mean_logits[...], layer.var_logits[...] = mean_logits, var_logits
    x = data(rng, SHAPES[2])
    bn_ln = jnp.array([0, 2])  # positions of "bn" and "ln" in the default order
    y_ref, _, _ = reference.switch_norm(x, mean_logits[bn_ln], var_logits[bn_ln], normalizers=("bn", "ln"))
    assert_matches(forward(layer, x), y_ref)


@pytest.mark.parametrize("channels", [1, 3, 7, 37, 64, 100])
def test_defaults_work_for_any_channel_count(rng, channels):
    layer = switchnorm.SwitchNorm(channels, rngs=nnx.Rngs(0))
    groups = switchnorm.default_num_groups(channels)
    for shape in ((4, channels), (2, 3, 2, channels)):
        x = data(rng, shape)
        y = forward(layer, x)
        normalizers = ALL if len(shape) > 2 else ("bn", "ln")
        k = len(normalizers)
        y_ref, _, _ = reference.switch_norm(
            x, np.zeros(k), np.zeros(k), normalizers=normalizers, num_groups=groups
        )
        assert y.shape == shape and np.all(np.isfinite(y))
        assert_matches(y, y_ref)


# --------------------------------------------------------------------------
# Modes: running averages and model.train() / model.eval().
# --------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.99, 0.5])
def test_training_updates_running_averages_with_the_flax_ema_rule(rng, momentum):
    layer = switchnorm.SwitchNorm(C, momentum=momentum, rngs=nnx.Rngs(0))
    x1, x2 = data(rng, SHAPES[4]), data(rng, SHAPES[4], offset=2.0)
    forward(layer, x1)
    forward(layer, x2)
    _, mean1, var1 = reference.switch_norm(x1, np.zeros(4), np.zeros(4), num_groups=3)
    _, mean2, var2 = reference.switch_norm(x2, np.zeros(4), np.zeros(4), num_groups=3)
    expected_mean = momentum * (momentum * 0.0 + (1 - momentum) * mean1) + (1 - momentum) * mean2
    expected_var = momentum * (momentum * 1.0 + (1 - momentum) * var1) + (1 - momentum) * var2
    np.testing.assert_allclose(layer.mean[...], expected_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.var[...], expected_var, rtol=1e-5, atol=1e-5)


def set_random_running_averages(layer, rng):
    layer.mean[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
    layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)


def test_eval_uses_running_averages_for_bn_and_train_switches_back(rng):
    layer = switchnorm.SwitchNorm(C, num_groups=2, rngs=nnx.Rngs(0))
    for name in ("mean_logits", "var_logits"):
        getattr(layer, name)[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    set_random_running_averages(layer, rng)
    running = (np.array(layer.mean[...]), np.array(layer.var[...]))
    logits = (layer.mean_logits[...], layer.var_logits[...])
    x = data(rng, SHAPES[4])

    layer.eval()
    assert layer.use_running_average is True
    y_ref, _, _ = reference.switch_norm(
        x, *logits, num_groups=2, running_mean=running[0], running_var=running[1]
    )
    assert_matches(forward(layer, x), y_ref)
    np.testing.assert_array_equal(layer.mean[...], running[0])  # eval leaves them alone
    np.testing.assert_array_equal(layer.var[...], running[1])

    layer.train()
    assert layer.use_running_average is False
    y_ref, _, _ = reference.switch_norm(x, *logits, num_groups=2)
    assert_matches(forward(layer, x), y_ref)
    assert not np.allclose(layer.mean[...], running[0])


def test_eval_and_train_reach_layers_nested_in_a_model(rng):
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(C, C, rngs=rngs)
            self.norm = switchnorm.SwitchNorm(C, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.linear(x))

    model = Block(nnx.Rngs(0))
    model.eval()
    assert model.norm.use_running_average is True
    model.train()
    assert model.norm.use_running_average is False
    evaluated = nnx.view(model, use_running_average=True)
    assert evaluated.norm.use_running_average is True
    assert model.norm.use_running_average is False
    set_random_running_averages(model.norm, rng)
    x = data(rng, SHAPES[4])
    hidden = model.linear(x)
    y_ref, _, _ = reference.switch_norm(
        hidden,
        np.zeros(4),
        np.zeros(4),
        num_groups=3,
        running_mean=model.norm.mean[...],
        running_var=model.norm.var[...],
    )
    assert_matches(forward(evaluated, x), y_ref)


def test_call_argument_overrides_the_attribute(rng):
    layer = switchnorm.SwitchNorm(C, normalizers=("bn",), rngs=nnx.Rngs(0))
    set_random_running_averages(layer, rng)
    x = data(rng, SHAPES[3])
    running = (layer.mean[...], layer.var[...])
    y = layer(x, use_running_average=True)
    expected = (x - running[0]) / jnp.sqrt(running[1] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Transformations: jit, grad, an ensemble under vmap, remat.
# --------------------------------------------------------------------------


def test_jit_gives_the_eager_result(rng):
    eager_layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    jit_layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    x = data(rng, SHAPES[4])
    np.testing.assert_allclose(forward(jit_layer, x), eager_layer(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jit_layer.var[...], eager_layer.var[...], rtol=1e-6, atol=1e-6)


def test_grad_reaches_every_parameter(rng):
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    for name in ("mean_logits", "var_logits"):
        getattr(layer, name)[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    x, target = data(rng, SHAPES[4]), data(rng, SHAPES[4])

    @nnx.jit
    def grads(layer, x):
        return nnx.grad(lambda m: jnp.sum(m(x) * target))(layer)

    g = nnx.to_pure_dict(grads(layer, x))
    assert set(g) == {"scale", "bias", "mean_logits", "var_logits"}
    for name, value in g.items():
        assert np.all(np.isfinite(value)) and np.any(np.abs(value) > 1e-4), name


def test_vmap_over_an_ensemble_of_layers(rng):
    members = 3

    @nnx.split_rngs(splits=members)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return switchnorm.SwitchNorm(C, scale_init=nnx.initializers.normal(1.0), rngs=rngs)

    @nnx.jit
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def ensemble_forward(model, x):
        return model(x)

    ensemble = create(nnx.Rngs(0))
    graphdef, state = nnx.split(ensemble)
    singles = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(members)]
    x = data(rng, SHAPES[4])
    y = ensemble_forward(ensemble, x)
    assert y.shape == (members, *SHAPES[4])
    assert ensemble.mean[...].shape == (members, C)
    for i, member in enumerate(singles):
        np.testing.assert_allclose(y[i], forward(member, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ensemble.mean[...][i], member.mean[...], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[0], y[1])  # the members really differ


def test_remat_gives_the_same_output_and_gradients(rng):
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0))
    x, target = data(rng, SHAPES[3]), data(rng, SHAPES[3])

    def loss(model, x):
        return jnp.sum(model(x) * target)

    @nnx.jit(static_argnames="remat")
    def grads(layer, x, remat):
        f = nnx.remat(loss) if remat else loss
        return nnx.grad(f)(layer, x)

    plain = grads(layer, x, remat=False)
    remat = grads(layer, x, remat=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, remat)

    # The same through plain JAX: jax.checkpoint around a pure function of the state.
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def pure_loss(params, rest, x):
        return loss(nnx.merge(graphdef, params, rest), x)

    checkpointed = jax.jit(jax.grad(jax.checkpoint(pure_loss)))(params, rest, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, checkpointed)
