"""The Flax Linen front end, ``switchnorm.linen.SwitchNorm``, and its agreement with NNX."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import linen as nn
from flax import nnx
from reference import ALL, SHAPES, SINGLE_CASES, C, assert_matches, data

import switchnorm
from switchnorm import linen as snn


@functools.partial(jax.jit, static_argnums=0)
def train(module, variables, x):
    """A training-mode call: (y, updated batch_stats)."""
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


@functools.partial(jax.jit, static_argnums=0)
def infer(module, variables, x):
    return module.apply(variables, x, use_running_average=True)


@functools.partial(jax.jit, static_argnums=0)
def init(module, x):
    return module.init(jax.random.key(0), x, use_running_average=False)


def with_random_params(variables, rng, names=("scale", "bias", "mean_logits", "var_logits")):
    """variables with its scale, bias and (if present) logits replaced by random values."""
    params = dict(variables["params"])
    for name in names:
        if name in params:
            shape = params[name].shape
            values = rng.uniform(0.5, 1.5, shape) if name == "scale" else rng.normal(size=shape)
            params[name] = jnp.asarray(values, jnp.float32)
    return {**variables, "params": params}


def flax_counterpart(name, rank):
    """The Flax layer a single-normalizer SwitchNorm equals, each at its default epsilon."""
    if name == "bn":
        return nn.BatchNorm(use_fast_variance=False)
    if name == "in":
        return nn.InstanceNorm(use_fast_variance=False)
    if name == "ln":
        return nn.LayerNorm(
            reduction_axes=tuple(range(1, rank)),
            feature_axes=-1,
            use_fast_variance=False,
        )
    return nn.GroupNorm(num_groups=3, use_fast_variance=False)


@pytest.mark.parametrize("name, rank", SINGLE_CASES)
def test_single_normalizer_equals_the_flax_layer(rng, name, rank):
    ours, theirs = snn.SwitchNorm(normalizers=(name,), num_groups=3), flax_counterpart(name, rank)
    x = data(rng, SHAPES[rank])
    ours_vars = with_random_params(init(ours, x), rng, names=("scale", "bias"))
    params = {k: ours_vars["params"][k] for k in ("scale", "bias")}
    if name == "bn":
        theirs_vars = {
            "params": params,
            "batch_stats": nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)["batch_stats"],
        }
        for step in range(2):
            x = data(rng, SHAPES[rank], offset=step)
            y, ours_stats = train(ours, ours_vars, x)
            y_flax, theirs_stats = theirs.apply(
                theirs_vars, x, use_running_average=False, mutable=["batch_stats"]
            )
            np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
            ours_vars = {**ours_vars, **ours_stats}
            theirs_vars = {**theirs_vars, **theirs_stats}
        for stat in ("mean", "var"):
            np.testing.assert_allclose(
                ours_vars["batch_stats"][stat],
                theirs_vars["batch_stats"][stat],
                rtol=1e-5,
                atol=1e-6,
            )
        np.testing.assert_allclose(
            infer(ours, ours_vars, x),
            theirs.apply(theirs_vars, x, use_running_average=True),
            rtol=1e-5,
            atol=1e-5,
        )
    else:
        assert "batch_stats" not in ours_vars
        y, _ = train(ours, ours_vars, x)
        np.testing.assert_allclose(y, theirs.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(infer(ours, ours_vars, x), y, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Variables: Flax BatchNorm's names, logits start at zero.
# --------------------------------------------------------------------------


def test_variables_are_named_and_initialised_like_batchnorm(rng):
    variables = init(snn.SwitchNorm(), data(rng, SHAPES[4]))
    params, stats = variables["params"], variables["batch_stats"]
    assert set(params) == {"scale", "bias", "mean_logits", "var_logits"}
    assert set(stats) == {"mean", "var"}
    np.testing.assert_array_equal(params["mean_logits"], np.zeros(4))
    np.testing.assert_array_equal(params["var_logits"], np.zeros(4))
    np.testing.assert_array_equal(params["scale"], np.ones(C))
    np.testing.assert_array_equal(params["bias"], np.zeros(C))
    # As in flax.linen.BatchNorm, init does not move the running averages.
    np.testing.assert_array_equal(stats["mean"], np.zeros(C))
    np.testing.assert_array_equal(stats["var"], np.ones(C))


def test_default_layers_hold_all_four_logits_at_every_rank_and_blend_bn_and_ln_on_dense(rng):
    # The NNX layer's rule: its parameters are fixed before it sees an input.
    dense = init(snn.SwitchNorm(), data(rng, SHAPES[2]))
    image = init(snn.SwitchNorm(), data(rng, SHAPES[4]))
    assert dense["params"]["mean_logits"].shape == image["params"]["mean_logits"].shape == (4,)
    x = data(rng, SHAPES[2])
    logits = np.array([0.3, 9.0, -0.4, 9.0])  # in's and gn's logits (index 1, 3) must not count
    params = {**dense["params"], "mean_logits": logits, "var_logits": -logits}
    y, _ = train(snn.SwitchNorm(), {**dense, "params": params}, x)
    want, _, _ = reference.switch_norm(x, logits[[0, 2]], -logits[[0, 2]], normalizers=("bn", "ln"))
    assert_matches(y, want)


def test_logits_of_two_saved_for_a_default_dense_layer_are_refused_with_the_fix(rng):
    x = data(rng, SHAPES[2])
    old = init(snn.SwitchNorm(normalizers=("bn", "ln")), x)  # what a default layer held before
    with pytest.raises(ValueError, match=r"normalizers=\('bn', 'ln'\) to load these logits"):
        snn.SwitchNorm().apply(old, x, use_running_average=False, mutable=["batch_stats"])


def test_without_bn_there_is_no_batch_stats_collection(rng):
    variables = init(snn.SwitchNorm(normalizers=("in", "gn")), data(rng, SHAPES[3]))
    assert set(variables) == {"params"}


def test_use_scale_and_use_bias_false_leave_those_parameters_out(rng):
    module = snn.SwitchNorm(use_scale=False, use_bias=False)
    x = data(rng, SHAPES[4])
    variables = init(module, x)
    assert set(variables["params"]) == {"mean_logits", "var_logits"}
    y_ref, _, _ = reference.switch_norm(x, np.zeros(4), np.zeros(4), num_groups=3)
    assert_matches(train(module, variables, x)[0], y_ref)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_random_parameters_match_float64_reference(rng, rank):
    module = snn.SwitchNorm(num_groups=2)
    x = data(rng, SHAPES[rank])
    variables = with_random_params(init(module, x), rng)
    p = variables["params"]
    normalizers = ALL if rank > 2 else ("bn", "ln")
    used = [ALL.index(n) for n in normalizers]  # a default layer holds all four logits
    y_ref, _, _ = reference.switch_norm(
        x,
        np.asarray(p["mean_logits"])[used],
        np.asarray(p["var_logits"])[used],
        scale=p["scale"],
        bias=p["bias"],
        normalizers=normalizers,
        num_groups=2,
    )
    assert_matches(train(module, variables, x)[0], y_ref)


@pytest.mark.parametrize("channels", [1, 3, 7, 37, 64, 100])
def test_defaults_work_for_any_channel_count(rng, channels):
    module = snn.SwitchNorm()
    x = data(rng, (2, 3, 2, channels))
    y, _ = train(module, init(module, x), x)
    y_ref, _, _ = reference.switch_norm(
        x, np.zeros(4), np.zeros(4), num_groups=switchnorm.default_num_groups(channels)
    )
    assert_matches(y, y_ref)


def test_dtype_and_param_dtype(rng):
    module = snn.SwitchNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = data(rng, SHAPES[4])
    variables = init(module, x)
    assert variables["params"]["scale"].dtype == jnp.bfloat16
    assert train(module, variables, x)[0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Running averages.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.99, 0.5])
def test_training_updates_running_averages_with_the_flax_ema_rule(rng, momentum):
    module = snn.SwitchNorm(momentum=momentum)
    x = data(rng, SHAPES[4])
    variables = init(module, x)
    _, updates = train(module, variables, x)
    _, bn_mean, bn_var = reference.switch_norm(x, np.zeros(4), np.zeros(4), num_groups=3)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], (1 - momentum) * bn_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], momentum + (1 - momentum) * bn_var, rtol=1e-5, atol=1e-5
    )


def test_inference_uses_running_averages_for_bn_only(rng):
    module = snn.SwitchNorm(num_groups=2)
    x = data(rng, SHAPES[4])
    variables = with_random_params(init(module, x), rng)
    running = {
        "mean": jnp.asarray(rng.normal(size=C), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32),
    }
    variables = {**variables, "batch_stats": running}
    p = variables["params"]
    y_ref, _, _ = reference.switch_norm(
        x,
        p["mean_logits"],
        p["var_logits"],
        scale=p["scale"],
        bias=p["bias"],
        num_groups=2,
        running_mean=running["mean"],
        running_var=running["var"],
    )
    assert_matches(infer(module, variables, x), y_ref)
    # The attribute works as well as the call argument.
    y_attr = snn.SwitchNorm(num_groups=2, use_running_average=True).apply(variables, x)
    assert_matches(y_attr, y_ref)


# --------------------------------------------------------------------------
# NNX and Linen: the same layer.
# --------------------------------------------------------------------------


AGREEMENT = list(
    itertools.product(
        [jnp.float32, jnp.bfloat16],  # dtype of the input and the output
        [jnp.float32, jnp.bfloat16],  # param_dtype
        [ALL, ("bn", "ln"), ("in", "gn")],  # ("bn", "ln") runs on (N, C) features
    )
)


@pytest.mark.parametrize(
    "dtype, param_dtype, normalizers",
    AGREEMENT,
    ids=[f"{jnp.dtype(d).name}-{jnp.dtype(p).name}-{'-'.join(n)}" for d, p, n in AGREEMENT],
)
def test_nnx_and_linen_agree_given_the_same_parameters(rng, dtype, param_dtype, normalizers):
    rank = 2 if normalizers == ("bn", "ln") else 4
    x = data(rng, SHAPES[rank]).astype(dtype)
    kwargs = dict(normalizers=normalizers, num_groups=2, dtype=dtype, param_dtype=param_dtype)
    layer = switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0), **kwargs)
    for name, size in (("mean_logits", len(normalizers)), ("var_logits", len(normalizers)), ("bias", C)):
        getattr(layer, name)[...] = jnp.asarray(rng.normal(size=size), param_dtype)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), param_dtype)
    uses_bn = "bn" in normalizers
    if uses_bn:
        layer.mean[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
        layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)

    module = snn.SwitchNorm(**kwargs)
    variables = {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}  # copied from the NNX layer
    if uses_bn:
        variables["batch_stats"] = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
    nnx_forward = nnx.jit(lambda m, x: m(x))

    def assert_same(a, b):  # one computation twice: at most a rounding of the output dtype apart
        assert a.dtype == b.dtype == dtype
        tol = reference.float32_tolerance(np.asarray(b, np.float32), ulps=1, dtype=dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=tol)

    assert_same(infer(module, variables, x), nnx_forward(nnx.view(layer, use_running_average=True), x))
    y_linen, updates = train(module, variables, x)
    assert_same(y_linen, nnx_forward(layer, x))
    if uses_bn:
        for stat in ("mean", "var"):
            assert_matches(updates["batch_stats"][stat], getattr(layer, stat)[...], err_msg=stat)


# --------------------------------------------------------------------------
# Transformations: jit, grad, an ensemble under vmap, checkpoint.
# --------------------------------------------------------------------------


def test_jit_gives_the_eager_result(rng):
    module = snn.SwitchNorm()
    x = data(rng, SHAPES[4])
    variables = with_random_params(init(module, x), rng)
    eager = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    jitted = train(module, variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), eager, jitted)


def test_grad_reaches_every_parameter(rng):
    module = snn.SwitchNorm()
    x, target = data(rng, SHAPES[4]), data(rng, SHAPES[4])
    variables = with_random_params(init(module, x), rng)

    def loss(params):
        y, _ = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"]
        )
        return jnp.sum(y * target)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert set(grads) == {"scale", "bias", "mean_logits", "var_logits"}
    for name, value in grads.items():
        assert np.all(np.isfinite(value)) and np.any(np.abs(value) > 1e-4), name


def test_vmap_over_an_ensemble_of_variables(rng):
    module = snn.SwitchNorm()
    x = data(rng, SHAPES[4])
    keys = jax.random.split(jax.random.key(0), 3)
    members = [with_random_params(module.init(k, x, use_running_average=False), rng) for k in keys]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    y, updates = jax.jit(jax.vmap(lambda v: train(module, v, x)))(stacked)
    for i, member in enumerate(members):
        y_i, updates_i = train(module, member, x)
        np.testing.assert_allclose(y[i], y_i, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            updates["batch_stats"]["var"][i], updates_i["batch_stats"]["var"], rtol=1e-6
        )
    assert not np.allclose(y[0], y[1])


def test_checkpoint_and_remat_give_the_same_gradients(rng):
    x, target = data(rng, SHAPES[3]), data(rng, SHAPES[3])
    variables = with_random_params(init(snn.SwitchNorm(), x), rng)

    def loss(module, params):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * target)

    def grads(module, checkpoint=False):
        f = functools.partial(loss, module)
        return jax.jit(jax.grad(jax.checkpoint(f) if checkpoint else f))(variables["params"])

    plain = grads(snn.SwitchNorm(use_running_average=False))
    checkpointed = grads(snn.SwitchNorm(use_running_average=False), checkpoint=True)
    remat = grads(nn.remat(snn.SwitchNorm)(use_running_average=False))
    for other in (checkpointed, remat):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, other)
