"""The functional core, ``switchnorm.switch_norm``, against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads
from reference import ALL, NON_DEFAULT_EPSILONS, SHAPES, assert_matches, near_epsilon_input, random_case

import switchnorm
from switchnorm import switch_norm

STATIC = ("normalizers", "num_groups", "group_size", "epsilon", "use_running_average", "dtype")
jit_switch_norm = jax.jit(switch_norm, static_argnames=STATIC)


def run_core(case, **kwargs):
    """The core under jit: one compiled program per configuration keeps the suite fast."""
    return jit_switch_norm(
        case["x"],
        case["mean_logits"],
        case["var_logits"],
        scale=case["scale"],
        bias=case["bias"],
        **kwargs,
    )


def run_reference(case, **kwargs):
    return reference.switch_norm(
        case["x"],
        case["mean_logits"],
        case["var_logits"],
        scale=case["scale"],
        bias=case["bias"],
        **kwargs,
    )


# --------------------------------------------------------------------------
# The output is the definition.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_all_four_normalizers_with_random_logits_match_float64_reference(rng, rank):
    case = random_case(rng, SHAPES[rank], 4)
    y, batch_stats = run_core(case, normalizers=ALL, num_groups=3)
    y_ref, bn_mean, bn_var = run_reference(case, normalizers=ALL, num_groups=3)
    assert y.dtype == jnp.float32 and y.shape == case["x"].shape
    assert_matches(y, y_ref)
    assert_matches(batch_stats.mean, bn_mean)
    assert_matches(batch_stats.var, bn_var)


def test_bn_and_ln_on_dense_features_match_float64_reference(rng):
    case = random_case(rng, SHAPES[2], 2)
    y, batch_stats = run_core(case, normalizers=("bn", "ln"))
    y_ref, bn_mean, bn_var = run_reference(case, normalizers=("bn", "ln"))
    assert_matches(y, y_ref)
    assert_matches(batch_stats.var, bn_var)


@pytest.mark.parametrize(
    "normalizers", [("gn", "bn"), ("ln", "in"), ("in", "gn", "ln"), ("gn", "ln", "bn", "in")]
)
def test_subsets_in_any_order_match_reference(rng, normalizers):
    case = random_case(rng, SHAPES[4], len(normalizers))
    y, _ = run_core(case, normalizers=normalizers, num_groups=2)
    y_ref, _, _ = run_reference(case, normalizers=normalizers, num_groups=2)
    assert_matches(y, y_ref)


def test_logits_follow_the_order_of_normalizers(rng):
    case = random_case(rng, SHAPES[4], 4)
    y, _ = run_core(case, normalizers=ALL, num_groups=2)
    order = [2, 0, 3, 1]  # ("ln", "bn", "gn", "in")
    permuted = dict(
        case,
        mean_logits=case["mean_logits"][jnp.array(order)],
        var_logits=case["var_logits"][jnp.array(order)],
    )
    y_permuted, _ = run_core(permuted, normalizers=tuple(ALL[i] for i in order), num_groups=2)
    np.testing.assert_allclose(y_permuted, y, rtol=1e-5, atol=1e-5)
    # ...and the order matters: the same logits under another order give another output.
    y_wrong, _ = run_core(case, normalizers=tuple(ALL[i] for i in order), num_groups=2)
    assert np.max(np.abs(y_wrong - y)) > 1e-2


def test_group_size_is_the_other_way_to_give_num_groups(rng):
    case = random_case(rng, SHAPES[4], 1)
    by_size, _ = run_core(case, normalizers=("gn",), group_size=2)
    by_count, _ = run_core(case, normalizers=("gn",), num_groups=3)
    y_ref, _, _ = run_reference(case, normalizers=("gn",), num_groups=3)
    np.testing.assert_allclose(by_size, by_count, rtol=1e-6, atol=1e-6)
    assert_matches(by_size, y_ref)


def test_gn_with_one_group_is_ln_and_with_one_channel_per_group_is_in(rng):
    case = random_case(rng, SHAPES[3], 1)
    gn1, _ = run_core(case, normalizers=("gn",), num_groups=1)
    ln, _ = run_core(case, normalizers=("ln",))
    gn_c, _ = run_core(case, normalizers=("gn",), num_groups=6)
    inorm, _ = run_core(case, normalizers=("in",))
    np.testing.assert_allclose(gn1, ln, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gn_c, inorm, rtol=1e-5, atol=1e-5)


def test_scale_and_bias_are_optional(rng):
    case = random_case(rng, SHAPES[3], 4)
    y, _ = jit_switch_norm(case["x"], case["mean_logits"], case["var_logits"], num_groups=2)
    y_ref, _, _ = reference.switch_norm(case["x"], case["mean_logits"], case["var_logits"], num_groups=2)
    assert_matches(y, y_ref)


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize("epsilon", NON_DEFAULT_EPSILONS)
@pytest.mark.parametrize("rank", [2, 4])
def test_epsilon_is_added_to_the_mixed_variance_under_the_square_root(
    rng, rank, epsilon, use_running_average
):
    # Channels 0 and 1 have a variance of epsilon's size: an epsilon dropped, doubled
    # or moved outside the square root changes y there by far more than round-off.
    normalizers = ALL if rank > 2 else ("bn", "ln")
    case = random_case(rng, SHAPES[rank], len(normalizers))
    case["x"] = near_epsilon_input(rng, SHAPES[rank], epsilon)
    running = dict(
        running_mean=jnp.asarray(rng.normal(size=6), jnp.float32),
        running_var=jnp.asarray(epsilon * rng.uniform(0.2, 2.0, 6), jnp.float32),
    )
    kwargs = dict(normalizers=normalizers, num_groups=6 if rank > 2 else None, epsilon=epsilon)
    y, _ = run_core(case, use_running_average=use_running_average, **running, **kwargs)
    kwargs["num_groups"] = 6
    y_ref, _, _ = run_reference(case, **(running if use_running_average else {}), **kwargs)
    assert_matches(y, y_ref)


def test_dtype_sets_the_output_dtype_and_rounds_the_float32_result_once(rng):
    case = random_case(rng, SHAPES[3], 4)
    y, _ = run_core(case, num_groups=2, dtype=jnp.bfloat16)
    y_ref, _, _ = run_reference(case, num_groups=2)
    assert y.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: one rounding moves a value by at most 2^-8 of it.
    error = np.abs(np.asarray(y, np.float64) - y_ref)
    assert np.all(error <= 2.0**-8 * np.abs(y_ref) + reference.float32_tolerance(y_ref))


# --------------------------------------------------------------------------
# Running averages: inference uses them for bn only.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 4])
def test_inference_uses_running_averages_for_the_bn_term(rng, rank):
    normalizers = ALL if rank > 2 else ("bn", "ln")
    case = random_case(rng, SHAPES[rank], len(normalizers))
    running_mean = jnp.asarray(rng.normal(size=6), jnp.float32)
    running_var = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    y, batch_stats = run_core(
        case,
        normalizers=normalizers,
        num_groups=2,
        use_running_average=True,
        running_mean=running_mean,
        running_var=running_var,
    )
    y_ref, _, _ = run_reference(
        case,
        normalizers=normalizers,
        num_groups=2,
        running_mean=running_mean,
        running_var=running_var,
    )
    assert batch_stats is None
    assert_matches(y, y_ref)


def test_inference_with_bn_alone_is_the_running_average_affine_map(rng):
    case = random_case(rng, SHAPES[3], 1)
    running_mean = jnp.asarray(rng.normal(size=6), jnp.float32)
    running_var = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
    y, _ = run_core(
        case,
        normalizers=("bn",),
        use_running_average=True,
        running_mean=running_mean,
        running_var=running_var,
    )
    expected = (case["x"] - running_mean) / jnp.sqrt(running_var + 1e-5) * case["scale"] + case["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_in_ln_gn_ignore_the_mode(rng):
    case = random_case(rng, SHAPES[4], 3)
    kwargs = dict(normalizers=("in", "ln", "gn"), num_groups=2)
    train, stats = run_core(case, **kwargs)
    infer, _ = run_core(
        case,
        use_running_average=True,
        running_mean=jnp.full(6, 100.0),
        running_var=jnp.full(6, 100.0),
        **kwargs,
    )
    assert stats is None
    np.testing.assert_allclose(infer, train, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Only bn (in training mode) mixes samples.
# --------------------------------------------------------------------------


def perturb_sample(x, j):
    """Replaces sample j by a non-affine function of itself (affine maps are normalized away)."""
    return x.at[j].set(x[j] ** 2 + 5.0)


@pytest.mark.parametrize("use_running_average", [False, True])
@pytest.mark.parametrize(
    "normalizers, bn_logit",
    [(("in", "ln", "gn"), None), (ALL, -1e9)],
    ids=["without-bn", "bn-weight-zero"],
)
def test_in_ln_gn_never_depend_on_other_samples(rng, normalizers, bn_logit, use_running_average):
    case = random_case(rng, SHAPES[4], len(normalizers))
    if bn_logit is not None:
        case["mean_logits"] = case["mean_logits"].at[0].set(bn_logit)
        case["var_logits"] = case["var_logits"].at[0].set(bn_logit)
    kwargs = dict(
        normalizers=normalizers,
        num_groups=2,
        use_running_average=use_running_average,
        running_mean=jnp.zeros(6),
        running_var=jnp.ones(6),
    )
    y, _ = run_core(case, **kwargs)
    y_perturbed, _ = run_core(dict(case, x=perturb_sample(case["x"], 2)), **kwargs)
    np.testing.assert_allclose(y_perturbed[:2], y[:2], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(y_perturbed[2] - y[2])) > 1e-2  # sample 2 itself did change


def test_bn_in_training_mode_does_mix_samples(rng):
    case = random_case(rng, SHAPES[4], 4)
    y, _ = run_core(case, num_groups=2)
    y_perturbed, _ = run_core(dict(case, x=perturb_sample(case["x"], 2)), num_groups=2)
    assert np.max(np.abs(y_perturbed[0] - y[0])) > 1e-2


def test_bn_in_inference_mode_does_not_mix_samples(rng):
    case = random_case(rng, SHAPES[4], 4)
    kwargs = dict(
        num_groups=2,
        use_running_average=True,
        running_mean=jnp.full(6, 0.3),
        running_var=jnp.full(6, 2.0),
    )
    y, _ = run_core(case, **kwargs)
    y_perturbed, _ = run_core(dict(case, x=perturb_sample(case["x"], 2)), **kwargs)
    np.testing.assert_allclose(y_perturbed[:2], y[:2], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Gradients, in float64.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize(
    "shape, normalizers, order",
    [((3, 2, 2, 4), ALL, 2), ((4, 3), ("bn", "ln"), 1)],
    ids=["rank4-order2", "rank2-order1"],
)
def test_gradients_pass_check_grads(x64, shape, normalizers, order, use_running_average):
    rng = np.random.default_rng(1)
    case = random_case(rng, shape, len(normalizers), dtype=np.float64)
    running_mean = jnp.asarray(rng.normal(size=shape[-1]))
    running_var = jnp.asarray(rng.uniform(0.5, 2.0, shape[-1]))

    @jax.jit
    def f(x, mean_logits, var_logits, scale, bias):
        y, _ = switch_norm(
            x,
            mean_logits,
            var_logits,
            scale=scale,
            bias=bias,
            normalizers=normalizers,
            num_groups=2,
            use_running_average=use_running_average,
            running_mean=running_mean,
            running_var=running_var,
        )
        return y

    args = tuple(case[k] for k in ("x", "mean_logits", "var_logits", "scale", "bias"))
    assert f(*args).dtype == jnp.float64
    # Reverse mode only: the core may define a custom VJP, which has no JVP.
    check_grads(f, args, order=order, modes=["rev"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# JAX transformations.
# --------------------------------------------------------------------------


def test_jit_gives_the_eager_result(rng):
    case = random_case(rng, SHAPES[4], 4)
    kwargs = {k: case[k] for k in ("scale", "bias")}
    eager, eager_stats = switch_norm(
        case["x"], case["mean_logits"], case["var_logits"], num_groups=2, **kwargs
    )
    jitted, jitted_stats = run_core(case, num_groups=2)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted_stats.var, eager_stats.var, rtol=1e-5, atol=1e-6)


def test_vmap_over_an_ensemble_of_stacked_parameters(rng):
    members = [random_case(rng, SHAPES[4], 4) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    ensemble = jax.vmap(lambda c: run_core(c, num_groups=2)[0])(stacked)
    for i, member in enumerate(members):
        np.testing.assert_allclose(ensemble[i], run_core(member, num_groups=2)[0], rtol=1e-5, atol=1e-5)


def test_axis_name_gives_bn_statistics_over_the_named_axis(rng):
    # jax.vmap with an axis_name runs collectives in-process: two sub-batches of 3
    # samples each must be normalized with the bn statistics of all 6.
    case = random_case(rng, (6, 4, 3, 6), 4)
    y_ref, bn_mean, bn_var = run_reference(case, num_groups=2)

    def per_shard(x):
        return switch_norm(
            x,
            case["mean_logits"],
            case["var_logits"],
            scale=case["scale"],
            bias=case["bias"],
            num_groups=2,
            axis_name="batch",
        )

    y, stats = jax.jit(jax.vmap(per_shard, axis_name="batch"))(case["x"].reshape(2, 3, 4, 3, 6))
    assert_matches(y.reshape(case["x"].shape), y_ref)
    for shard in range(2):  # every shard returns the global batch statistics
        assert_matches(stats.mean[shard], bn_mean)
        assert_matches(stats.var[shard], bn_var)


def test_checkpoint_gives_the_same_gradients(rng):
    case = random_case(rng, SHAPES[3], 4)
    target = jnp.asarray(rng.normal(size=SHAPES[3]), jnp.float32)

    def loss(c):
        return jnp.sum(run_core(c, num_groups=2)[0] * target)

    plain = jax.jit(jax.grad(loss))(case)
    remat = jax.jit(jax.grad(jax.checkpoint(loss)))(case)
    for key in case:
        assert jnp.all(jnp.isfinite(plain[key]))
        np.testing.assert_allclose(remat[key], plain[key], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# The default group rule.
# --------------------------------------------------------------------------


def test_default_num_groups_always_divides_the_channel_count():
    for c in range(1, 301):
        g = switchnorm.default_num_groups(c)
        assert 1 <= g <= min(32, c) and c % g == 0, (c, g)


@pytest.mark.parametrize(
    "channels, groups", [(1, 1), (3, 1), (16, 8), (37, 1), (48, 24), (64, 32), (256, 32)]
)
def test_default_num_groups_follows_its_documented_rule(channels, groups):
    assert switchnorm.default_num_groups(channels) == groups


def test_default_normalizers_drop_in_and_gn_on_dense_features():
    assert switchnorm.default_normalizers(2) == ("bn", "ln")
    assert switchnorm.default_normalizers(4) == ALL


def _count_graph_traces(monkeypatch) -> int:
    """How often the (N, C) graph's Python code runs while tracing a gradient through two equal layers."""
    from switchnorm import _core

    calls = []
    original = _core.mixed

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_core, "mixed", counting)
    jax.clear_caches()
    x, logits = jnp.ones((4, 3, 3, 8)) + jnp.arange(8.0), jnp.zeros(4)

    def loss(x, logits):
        y, _ = switch_norm(x, logits, logits, num_groups=2, epsilon=0.37)
        z, _ = switch_norm(y * 2.0, logits, logits, num_groups=2, epsilon=0.37)
        return jnp.sum(z * jnp.arange(8.0))

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, logits)
    finally:
        jax.clear_caches()  # no later test may reuse a graph traced under the patch
    return len(calls)


def test_equal_layers_share_their_traces(monkeypatch):
    # The layer's program is jitted by its configuration: the two equal layers trace the
    # (N, C) graph once in the forward and in the backward's rematerialized forward and its
    # VJP (three traces), where each layer tracing its own would give six.
    assert _count_graph_traces(monkeypatch) == 3


def test_equal_configurations_share_one_compiled_program_and_unhashable_ones_fall_back():
    from switchnorm import _core

    def compiled(groups):
        config = _core.Config(("bn", "in"), 1, 1e-5, False, "batch", groups, "softmax", "layer")
        return _core._compiled(_core.normalize, _core._normalize_jit, config, None, True)

    first, second = compiled(((0, 1),)), compiled(((0, 1),))
    assert first.func is _core._normalize_jit and first.args == second.args
    fallback = compiled([[0, 1]])  # lists: no cache key, traced at each use
    assert fallback.func is _core.normalize and fallback.args[0].axis_index_groups == [[0, 1]]


def test_an_eager_layer_compiles_nothing_after_its_first_call():
    # The layer's program is jitted by its configuration: an un-jitted call, init or apply
    # of an equal layer on arrays of the same shapes reuses it (as Flax's BatchNorm does).
    from flax import nnx

    from switchnorm import linen as snn

    compiles = []

    def listener(name: str, seconds: float, **kwargs) -> None:
        if "backend_compile" in name:
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        x = jnp.ones((4, 6, 6, 8))
        x2 = x * 2.0  # the same type (jnp.full would give a weakly typed array)
        layer = switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0))
        module = snn.SwitchNorm()
        layer(x)
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        before = len(compiles)
        switchnorm.SwitchNorm(8, rngs=nnx.Rngs(1))(x2)
        variables = module.init(jax.random.key(1), x2, use_running_average=False)
        module.apply(variables, x2, use_running_average=False, mutable=["batch_stats"])
        assert len(compiles) == before
    finally:
        jax.monitoring.clear_event_listeners()
