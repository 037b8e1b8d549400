"""The custom VJP of the core (``switchnorm._vjp``) equals JAX autodiff of the same layer.

``switch_norm`` differentiates through a hand-written two-pass backward;
``switch_norm_autodiff`` is the same forward computation differentiated by
JAX. In float64 their gradients must agree to round-off for every subset of
normalizers, in training and inference mode, with respect to x, both
logits, scale, bias and the running averages, including the cotangent of the
returned batch statistics; and so must their second derivatives.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from reference import ALL, NON_DEFAULT_EPSILONS, channel_input, near_epsilon_input

from switchnorm._core import switch_norm, switch_norm_autodiff

SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(ALL, r)]
# (2, 4, 4, 6): 16 elements per (n, c) cell, enough to take the fusion-boundary path;
# (3, 2, 6): 2 per cell, the path without it; (5, 6): one per cell (dense features).
SHAPE = (2, 4, 4, 6)


def make_args(shape, normalizers, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = channel_input(rng, shape)
    k = len(normalizers)
    return dict(
        x=jnp.asarray(x),
        mean_logits=jnp.asarray(rng.normal(size=k)),
        var_logits=jnp.asarray(rng.normal(size=k)),
        scale=jnp.asarray(rng.uniform(0.5, 1.5, c)),
        bias=jnp.asarray(rng.normal(size=c)),
        running_mean=jnp.asarray(rng.normal(size=c)),
        running_var=jnp.asarray(rng.uniform(0.5, 2.0, c)),
    ), jnp.asarray(rng.normal(size=shape))


def make_loss(layer, normalizers, use_running_average, dy):
    """A scalar touching every output element and both batch statistics."""

    def loss(args):
        y, batch_stats = reference.call(
            layer, args, normalizers=normalizers, num_groups=2, use_running_average=use_running_average
        )
        value = jnp.sum(y * dy)
        if batch_stats is not None:
            value += jnp.sum(jnp.sin(batch_stats.mean)) + jnp.sum(batch_stats.var**2)
        return value

    return loss


def assert_trees_close(got, want, tol=1e-10):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize("normalizers", SUBSETS, ids="-".join)
def test_gradients_equal_autodiff_for_every_subset(x64, normalizers, use_running_average):
    args, dy = make_args(SHAPE, normalizers)
    custom = jax.jit(jax.grad(make_loss(switch_norm, normalizers, use_running_average, dy)))
    plain = jax.jit(jax.grad(make_loss(switch_norm_autodiff, normalizers, use_running_average, dy)))
    assert_trees_close(custom(args), plain(args))


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize(
    "shape, normalizers", [((3, 2, 6), ALL), ((5, 6), ("bn", "ln"))], ids=["two-per-cell", "dense"]
)
def test_gradients_equal_autodiff_for_small_cells(x64, shape, normalizers, use_running_average):
    args, dy = make_args(shape, normalizers, seed=1)
    custom = jax.grad(make_loss(switch_norm, normalizers, use_running_average, dy))
    plain = jax.grad(make_loss(switch_norm_autodiff, normalizers, use_running_average, dy))
    assert_trees_close(jax.jit(custom)(args), jax.jit(plain)(args))


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize("shape", [SHAPE, (5, 6)], ids=["rank4", "dense"])
def test_second_derivatives_equal_autodiff(x64, shape, use_running_average):
    normalizers = ALL if len(shape) > 2 else ("bn", "ln")
    args, dy = make_args(shape, normalizers, seed=2)

    def grad_norm(layer):
        grad = jax.grad(make_loss(layer, normalizers, use_running_average, dy))
        return jax.jit(jax.grad(lambda a: sum(jnp.sum(g**2) for g in jax.tree.leaves(grad(a)))))

    assert_trees_close(grad_norm(switch_norm)(args), grad_norm(switch_norm_autodiff)(args), tol=1e-8)


def test_outputs_equal_autodiff_path(x64):
    args, _ = make_args(SHAPE, ALL)
    args = {k: v for k, v in args.items() if not k.startswith("running")}
    # jitted: eagerly, each of the layer's many small float64 ops is compiled and dispatched alone
    y, stats = jax.jit(lambda a: reference.call(switch_norm, a, num_groups=2))(args)
    y0, stats0 = jax.jit(lambda a: reference.call(switch_norm_autodiff, a, num_groups=2))(args)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var, stats0.var, rtol=1e-12, atol=1e-12)


def test_bfloat16_gradients_are_bfloat16_and_match_float32():
    args, dy = make_args(SHAPE, ALL, seed=3)
    args = jax.tree.map(lambda a: a.astype(jnp.float32), args)
    loss = make_loss(switch_norm, ALL, False, dy.astype(jnp.float32))
    g32 = jax.jit(jax.grad(loss))(args)
    g16 = jax.jit(jax.grad(loss))({**args, "x": args["x"].astype(jnp.bfloat16)})
    assert g16["x"].dtype == jnp.bfloat16
    np.testing.assert_allclose(g16["x"].astype(jnp.float32), g32["x"], rtol=5e-2, atol=5e-2)


def test_forward_mode_is_available_through_the_autodiff_path(x64):
    args, _ = make_args(SHAPE, ALL)
    f = lambda x: switch_norm_autodiff(x, args["mean_logits"], args["var_logits"], num_groups=2)[0]  # noqa: E731
    _, tangent = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(args["x"], jnp.ones_like(args["x"]))
    assert np.all(np.isfinite(tangent))


# --------------------------------------------------------------------------
# Against the definition: finite differences of the float64 reference, and
# forward mode against reverse mode.
# --------------------------------------------------------------------------

DIFFERENTIABLE = ("x", "mean_logits", "var_logits", "scale", "bias", "running_mean", "running_var")


def reference_loss(args, normalizers, use_running_average, epsilon, dy):
    # The reference reads given running averages as inference mode.
    if not use_running_average:
        args = {k: v for k, v in args.items() if not k.startswith("running")}
    y, _, _ = reference.call(
        reference.switch_norm, args, normalizers=normalizers, num_groups=6, epsilon=epsilon
    )
    return float(np.sum(y * dy))


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
@pytest.mark.parametrize("epsilon", NON_DEFAULT_EPSILONS)
@pytest.mark.parametrize("shape, normalizers", [(SHAPE, ALL), ((5, 6), ("bn", "ln"))], ids=["rank4", "dense"])
def test_gradients_equal_central_differences_of_the_float64_reference(
    x64, shape, normalizers, epsilon, use_running_average
):
    # The custom VJP and autodiff share the forward graph, so comparing them cannot see
    # a wrong formula; the reference is written independently from the definition.
    rng = np.random.default_rng(4)
    args, dy = make_args(shape, normalizers, seed=4)
    args["x"] = near_epsilon_input(rng, shape, epsilon, dtype=np.float64)
    args["running_var"] = args["running_var"] * epsilon  # a running variance of epsilon's size

    def loss(a):
        y, _ = reference.call(
            switch_norm,
            a,
            normalizers=normalizers,
            num_groups=6 if len(shape) > 2 else None,
            epsilon=epsilon,
            use_running_average=use_running_average,
        )
        return jnp.sum(y * dy)

    grads = jax.jit(jax.grad(loss))(args)
    h = 1e-6
    for name in DIFFERENTIABLE:
        if name.startswith("running") and not use_running_average:
            continue
        v = rng.normal(size=args[name].shape)
        plus = {**args, name: args[name] + h * v}
        minus = {**args, name: args[name] - h * v}
        numeric = (
            reference_loss(plus, normalizers, use_running_average, epsilon, np.asarray(dy))
            - reference_loss(minus, normalizers, use_running_average, epsilon, np.asarray(dy))
        ) / (2 * h)
        analytic = float(jnp.sum(grads[name] * v))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    "shape, normalizers", [(SHAPE, ALL), ((16, 6), ("bn", "ln"))], ids=["spatial", "dense"]
)
@pytest.mark.parametrize("epsilon", [1e-5, 0.5])
@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "infer"])
def test_forward_mode_tangents_agree_with_reverse_mode_products(
    x64, use_running_average, epsilon, shape, normalizers
):
    # <J v, u> from jax.jvp of the autodiff path equals <v, J^T u> from the custom VJP.
    args, u = make_args(shape, normalizers, seed=5)
    rng = np.random.default_rng(7)
    tangents = {k: jnp.asarray(rng.normal(size=a.shape)) for k, a in args.items()}

    def layer(fn):
        def f(a):
            groups = {"num_groups": 2} if "gn" in normalizers else {}
            return reference.call(
                fn,
                a,
                normalizers=normalizers,
                epsilon=epsilon,
                use_running_average=use_running_average,
                **groups,
            )[0]

        return f

    _, jv = jax.jit(lambda a, t: jax.jvp(layer(switch_norm_autodiff), (a,), (t,)))(args, tangents)
    (jtu,) = jax.jit(lambda a, u: jax.vjp(layer(switch_norm), a)[1](u))(args, u)
    forward = float(jnp.sum(jv * u))
    reverse = sum(float(jnp.sum(jtu[k] * tangents[k])) for k in args)
    np.testing.assert_allclose(forward, reverse, rtol=1e-10)


@pytest.mark.parametrize("normalizers", [("bn",), ALL], ids=["bn", "all"])
def test_gradients_without_scale_and_bias_equal_autodiff(x64, normalizers):
    args, dy = make_args(SHAPE, normalizers, seed=8)

    def loss(layer):
        def f(x, mean_logits, var_logits):
            y, _ = layer(x, mean_logits, var_logits, normalizers=normalizers, num_groups=2)
            return jnp.sum(y * dy)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(args["x"], args["mean_logits"], args["var_logits"])

    for got, want in zip(loss(switch_norm), loss(switch_norm_autodiff), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalizers", [("bn",), ALL], ids=["bn", "all"])
def test_gradients_under_shard_map_with_axis_name_equal_autodiff(x64, normalizers):
    # A one-device mesh runs in-process: the shard_map typing is the same as on many
    # devices (dy varies over "data", the pmean-ed bn statistics do not), so the
    # custom VJP must sum the cotangents of replicated values as autodiff does.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    args, dy = make_args(SHAPE, normalizers, seed=9)
    mesh = jax.make_mesh((1,), ("data",))

    def grads(layer):
        def loss(x, scale, bias):
            y, stats = layer(
                x,
                args["mean_logits"],
                args["var_logits"],
                scale=scale,
                bias=bias,
                normalizers=normalizers,
                num_groups=2,
                axis_name="data",
            )
            return jax.lax.psum(jnp.sum(y * dy), "data") + jnp.sum(stats.var**2)

        specs = (P("data"), P(), P())
        f = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh, in_specs=specs, out_specs=specs)
        put = [
            jax.device_put(args[k], NamedSharding(mesh, s))
            for k, s in zip(("x", "scale", "bias"), specs, strict=True)
        ]
        return jax.jit(f)(*put)

    for got, want in zip(grads(switch_norm), grads(switch_norm_autodiff), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
