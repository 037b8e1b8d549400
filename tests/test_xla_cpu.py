"""The compiler seam (``switchnorm._xla_cpu``): what each of its CPU forms is for, and that every form
gives the plain form's values.

Raw sums first: when they are kept, and that both sides of the bound match the float64 reference,
with gradients equal to plain autodiff's; the temporaries the CPU forms keep away; and that a
computation lowered for another platform holds none of it."""

import collections
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads

from switchnorm import _xla_cpu, default_normalizers, switch_norm
from switchnorm._core import switch_norm_autodiff

ALL = reference.ALL


def raw_taken(x) -> bool:
    """Whether the statistics pass keeps the raw sums of x."""
    return bool(jax.jit(lambda x: _xla_cpu._cpu_statistics_pass(x, None, jnp.float32).raw)(x))


def offset_sample(rng, shape, offset):
    """Unit normal data with sample 1 moved by ``offset``."""
    x = rng.normal(size=shape)
    x[1] += offset
    return x


def dense_input(rng, shape):
    """(N, C) data whose bn, ln and gn scopes all have |mean| within a few standard deviations."""
    z = rng.normal(size=shape) * rng.uniform(0.5, 2.0, shape[1])
    return z - z.mean(axis=1, keepdims=True) + 0.3


def dense_within_bound(x) -> bool:
    """Whether the (N, C) direct path keeps raw sums for bn (axis 0) and ln (axis 1)."""
    x = np.asarray(x, np.float64)
    return all(
        np.all(np.mean(x * x, axis) <= _xla_cpu.RAW_SUMS_BOUND * np.var(x, axis) * 0.9) for axis in (0, 1)
    )


@contextlib.contextmanager
def plain_forms():
    """Every pass in its plain form (the seam switched off), JAX's caches cleared on both sides."""
    _xla_cpu.ENABLED = False
    jax.clear_caches()
    try:
        yield
    finally:
        _xla_cpu.ENABLED = True
        jax.clear_caches()


# --------------------------------------------------------------------------
# Which sums the statistics pass keeps.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, raw",
    [("unit-normal", True), ("mean-3-std", True), ("mean-1e4", False), ("one-sample-at-1e4", False)],
)
def test_raw_sums_are_kept_only_where_every_cell_mean_is_within_a_few_standard_deviations(rng, case, raw):
    shape = (4, 8, 8, 6)
    data = {
        "unit-normal": rng.normal(size=shape),
        "mean-3-std": 3.0 + rng.normal(size=shape),
        "mean-1e4": 1e4 + rng.normal(size=shape),
        "one-sample-at-1e4": offset_sample(rng, shape, 1e4),
    }[case]
    assert raw_taken(jnp.asarray(data, jnp.float32)) is raw


def test_a_nan_takes_the_shifted_sums_and_stays_nan(rng):
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32).at[0, 1, 1, 2].set(jnp.nan)
    assert not raw_taken(x)


# --------------------------------------------------------------------------
# Values against float64, on both sides of the bound and on both paths.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("normalizers",))
def forward(x, mean_logits, var_logits, *, normalizers):
    return switch_norm(x, mean_logits, var_logits, normalizers=normalizers, num_groups=2)[0]


def max_error(x, normalizers, rng):
    k = len(normalizers)
    logits = rng.normal(size=k), rng.normal(size=k)
    y = forward(x, *(jnp.asarray(lg, jnp.float32) for lg in logits), normalizers=normalizers)
    y_ref, _, _ = reference.switch_norm(
        np.asarray(x, np.float64), *logits, normalizers=normalizers, num_groups=2
    )
    return float(np.max(np.abs(np.asarray(y, np.float64) - y_ref)))


@pytest.mark.parametrize("shape", [(4, 6, 6, 8), (64, 8)], ids=["spatial", "dense"])
def test_float32_with_one_sample_offset_by_1e4_matches_float64(rng, shape):
    # Sample 1's in, ln and gn scopes sit at 1e4 with std 1: raw sums would lose every digit of
    # their variance; the check sends the whole batch to the shifted path. (No bn: its variance,
    # 2.5e7 here, would make every normalized value small enough to hide any error.)
    normalizers = ("in", "ln", "gn") if len(shape) > 2 else ("ln",)
    x = jnp.asarray(offset_sample(rng, shape, 1e4), jnp.float32)
    assert max_error(x, normalizers, rng) < 1e-3


@pytest.mark.parametrize("shape", [(4, 6, 6, 8), (64, 8)], ids=["spatial", "dense"])
def test_float32_at_mean_2_5_std_on_the_raw_path_matches_float64(rng, shape):
    normalizers = ALL if len(shape) > 2 else ("bn", "ln")
    x = jnp.asarray(2.5 + rng.normal(size=shape), jnp.float32)
    if len(shape) > 2:
        assert raw_taken(x)
    assert max_error(x, normalizers, rng) < 2e-5


@pytest.mark.parametrize("normalizers", [("bn",), ("ln",), ("bn", "ln")], ids=lambda n: "+".join(n))
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["direct", "shifted"])
def test_dense_input_matches_float64_for_every_normalizer(rng, normalizers, offset):
    x = jnp.asarray(dense_input(rng, (32, 8)) + offset, jnp.float32)
    assert dense_within_bound(x) is (offset == 0.0)
    params = {k: v for k, v in reference.random_case(rng, (32, 8), len(normalizers)).items() if k != "x"}
    y, stats = jax.jit(
        lambda x: switch_norm(x, normalizers=normalizers, num_groups=2, epsilon=1e-5, **params)
    )(x)
    y_ref, bn_mean, bn_var = reference.switch_norm(
        np.asarray(x, np.float64),
        normalizers=normalizers,
        num_groups=2,
        **{k: np.asarray(v, np.float64) for k, v in params.items()},
    )
    np.testing.assert_allclose(y, y_ref, atol=1e-3 if offset else 1e-5)
    if "bn" in normalizers:
        np.testing.assert_allclose(stats.var, bn_var, rtol=1e-4)
        np.testing.assert_allclose(stats.mean, bn_mean, rtol=1e-6, atol=1e-5)


def f32_copies_of_x(fn, *args, shape) -> list[str]:
    """The float32 fusions of x's size (any layout of its elements) in ``fn``'s compiled ENTRY computation."""
    text = jax.jit(fn).lower(*args).compile(compiler_options={"xla_cpu_use_fusion_emitters": True}).as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    size = int(np.prod(shape))
    found = re.findall(r"= f32\[([\d,]+)\]\S* fusion\(", entry)
    return [dims for dims in found if int(np.prod([int(d) for d in dims.split(",")])) == size]


def test_dense_raw_sums_write_no_x_sized_temporary(rng):
    # bn's and ln's sums of squares read x itself: one shared x * x would be written out
    # for XLA:CPU's two reductions (compiled as a user's program is, fusion emitters on).
    x = jnp.asarray(dense_input(rng, (256, 128)), jnp.float32)  # large enough for YNNPACK reductions
    logits = jnp.zeros(2)
    layer = jax.jit(lambda x: switch_norm(x, logits, logits, normalizers=("bn", "ln"))[0])
    assert f32_copies_of_x(layer, x, shape=x.shape) == []  # the sums and the check; the branches normalize
    # The backward's dx reads x itself: under autodiff it read ln's |x| (from |x| * |x|),
    # which XLA then wrote out for the forward's reduction and the backward to share.
    grad = jax.grad(lambda x, dy: jnp.sum(layer(x) * dy))
    assert f32_copies_of_x(grad, x, x, shape=x.shape) == ["256,128"]  # dx itself, nothing more


@pytest.mark.parametrize("shape", [(16, 16, 16, 64), (256, 128)])
def test_bfloat16_input_is_never_copied_to_float32(rng, shape):
    # Every reduction and the normalize pass convert bfloat16 x (and dy) themselves: a convert
    # shared by two kernels is written out by XLA:CPU as a float32 copy of the whole array.
    x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    k = 4 if len(shape) > 2 else 2
    logits, scale = jnp.arange(k) * 0.1, jnp.ones(shape[-1])
    arrays = {"scale": scale, "bias": scale, "running_mean": scale, "running_var": scale}

    def layer(x, logits, use_running_average=False):
        normalizers = default_normalizers(x.ndim)
        return switch_norm(
            x, logits, -logits, **arrays, normalizers=normalizers, use_running_average=use_running_average
        )[0]

    assert f32_copies_of_x(layer, x, logits, shape=shape) == []
    assert f32_copies_of_x(functools.partial(layer, use_running_average=True), x, logits, shape=shape) == []

    def loss(x, logits, dy):
        return jnp.sum(layer(x, logits) * dy)

    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    copies = f32_copies_of_x(jax.grad(loss, argnums=(0, 1)), x, logits, dy, shape=shape)
    # (N, C): the fallback branch's autodiff writes one (docs/performance.md, "Memory").
    assert copies == ([] if len(shape) > 2 else ["256,128"])


def temporaries_over_x(fn, x, *args) -> float:
    """The compiled temporary memory of ``fn(x, *args)`` over x's bytes: every ``lax.cond`` branch included."""
    compiled = jax.jit(fn).lower(x, *args).compile(compiler_options={"xla_cpu_use_fusion_emitters": True})
    return compiled.memory_analysis().temp_size_in_bytes / x.nbytes


@pytest.mark.parametrize(
    "shape, dtype",
    [((16, 16, 16, 64), jnp.bfloat16), ((256, 128), jnp.float32), ((256, 128), jnp.bfloat16)],
    ids=["spatial-bfloat16", "dense-float32", "dense-bfloat16"],
)
def test_the_fallback_passes_hold_no_x_sized_temporary(rng, shape, dtype):
    # The rarely taken branches (shifted sums; the (N, C) path's fallback) are allocated on every
    # call. Each of their reductions computes x - K itself: shared, XLA:CPU wrote it out, a float32
    # array twice bfloat16 x's bytes (and per scope on (N, C)). Float32 spatial x shares y's buffer.
    x = jnp.asarray(rng.normal(size=shape), dtype)
    normalizers = default_normalizers(len(shape))
    logits = jnp.zeros(len(normalizers))

    def layer(x, logits):
        return switch_norm(x, logits, logits, normalizers=normalizers)[0]

    assert temporaries_over_x(layer, x, logits) < 0.25
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    grad = jax.grad(lambda x, logits, dy: jnp.sum(layer(x, logits).astype(jnp.float32) * dy), (0, 1))
    if len(shape) > 2:
        assert temporaries_over_x(grad, x, logits, dy) < 0.25
    else:  # (N, C): autodiff of both branches, each recomputed in the backward (XLA:CPU allocates
        # every branch of a conditional): the raw branch about 1x (float32) and 4x (bfloat16) x's
        # bytes, the fallback 5x and 10x. Recorded in docs/performance.md ("Memory").
        assert temporaries_over_x(grad, x, logits, dy) < (6.5 if dtype == jnp.float32 else 14.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "mask_shape, bound",
    [((8, 256, 1), (0.25, 0.25)), ((8, 256, 32), (1.35, 2.65))],
    ids=["padding-mask", "element-mask"],
)
def test_masks_hold_no_x_sized_temporary(rng, dtype, mask_shape, bound):
    # The sums read x zeroed where masked out, written once in x's dtype (in y's buffer for the
    # forward), and multiply by the mask as int8: a select inside each sum, which XLA:CPU's
    # reductions do not fuse, was a float32 array of x's size apiece (4x bfloat16 x's bytes with a
    # padding mask), and so was the mask's convert for the counts. A padding mask keeps its
    # length-1 channel axis throughout; an element mask costs its int8 copy (1/4 of float32 x)
    # and its zeroed x in float32 (a float32 x's bytes; bfloat16's twice).
    shape = (8, 256, 32)
    bound = bound[dtype == jnp.bfloat16]
    x = jnp.asarray(rng.normal(size=shape), dtype)
    mask = jnp.asarray(np.broadcast_to(rng.random(mask_shape) < 0.7, mask_shape))
    normalizers = default_normalizers(len(shape))
    logits = jnp.zeros(len(normalizers))

    def layer(x, logits, mask):
        return switch_norm(x, logits, logits, normalizers=normalizers, num_groups=4, mask=mask)[0]

    assert temporaries_over_x(layer, x, logits, mask) < bound
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    grad = jax.grad(
        lambda x, logits, mask, dy: jnp.sum(layer(x, logits, mask).astype(jnp.float32) * dy), (0, 1)
    )
    assert temporaries_over_x(grad, x, logits, mask, dy) < bound


def lowered_text(fn, *args, platform: str) -> str:
    """The StableHLO of ``fn`` lowered for ``platform`` (no such device needed)."""
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def operations(text: str) -> collections.Counter:
    """The StableHLO operations of ``text`` by kind, less the scaffolding of ``lax.platform_dependent``."""
    counts = collections.Counter(re.findall(r"(?:stablehlo|chlo)\.\w+", text))
    for scaffolding in ("stablehlo.case", "stablehlo.return", "stablehlo.constant"):
        counts.pop(scaffolding, None)
    return counts


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(16, 8, 8, 8), (64, 32)], ids=["spatial", "dense"])
def test_the_cpu_forms_are_chosen_for_the_platform_lowered_for_and_no_other(
    rng, monkeypatch, platform, dtype, shape
):
    # A process whose default device is the CPU but which lowers for a GPU or a TPU gets the
    # plain forms: the same operations as with the seam switched off, no barrier, no boundary.
    x = jnp.asarray(rng.normal(size=shape), dtype)
    normalizers = default_normalizers(x.ndim)
    logits = jnp.zeros(len(normalizers))

    def loss(x, logits):
        return jnp.sum(switch_norm(x, logits, logits, normalizers=normalizers)[0].astype(jnp.float32))

    def lowered(fn, enabled: bool) -> str:
        monkeypatch.setattr(_xla_cpu, "ENABLED", enabled)
        jax.clear_caches()
        try:
            return lowered_text(fn, x, logits, platform=platform)
        finally:
            jax.clear_caches()

    steered, plain = lowered(loss, True), lowered(loss, False)
    on_cpu = platform == "cpu"
    assert (operations(steered) == operations(plain)) != on_cpu
    grad = jax.grad(loss, argnums=(0, 1))  # its zeros for the CPU branch's residuals differ; XLA drops them
    text = lowered(grad, True)
    assert ("optimization_barrier" in text) == on_cpu
    assert ("reduce_window" in text) == (on_cpu and len(shape) > 2)  # the fusion boundary


@pytest.mark.parametrize("weights", ["layer", "sample"])
def test_dense_fallback_blends_relative_to_each_element(rng, weights):
    # One sample at 1e4 sends the batch to the fallback (each element its own frame). With ln's weights near 1, that
    # sample's y = (x - mix) a is O(1) from two numbers near 1e4: subtracting an absolute mix in
    # float32 would leave an error of about half an ulp of 1e4 (5e-4); the branch takes the blend
    # relative to each element instead. Per-sample weights read the same frame.
    x = jnp.asarray(offset_sample(rng, (32, 8), 1e4), jnp.float32)
    assert not dense_within_bound(x)
    logits = np.array([-6.0, 6.0]), np.array([-6.0, 6.0])
    sample_map = 0.1 * rng.normal(size=(2, 4, 2)) if weights == "sample" else None
    y, _ = jax.jit(
        lambda x: switch_norm(x, *logits, normalizers=("bn", "ln"), weights=weights, sample_map=sample_map)
    )(x)
    y_ref, _, _ = reference.switch_norm(
        np.asarray(x, np.float64), *logits, normalizers=("bn", "ln"), weights=weights, sample_map=sample_map
    )
    assert np.max(np.abs(y_ref[1])) < 5.0  # the offset sample is normalized to O(1) values
    np.testing.assert_allclose(y, y_ref, atol=2e-5)


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["direct", "fallback"])
def test_dense_gradients_pass_check_grads_in_float64(x64, rng, offset):
    x = jnp.asarray(dense_input(rng, (12, 6)) + offset)
    assert dense_within_bound(x) is (offset == 0.0)
    logits = jnp.asarray(rng.normal(size=(2, 2)))
    f = lambda x, lg: switch_norm(x, lg[0], lg[1], normalizers=("bn", "ln"))[0]  # noqa: E731
    check_grads(jax.jit(f), (x, logits), order=2, modes=["rev"])


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "inference"])
@pytest.mark.parametrize("mixing", ["softmax", "sparsestmax"])
@pytest.mark.parametrize("weights", ["layer", "channel"])
@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["raw", "fallback"])
def test_dense_cpu_form_gradients_equal_the_plain_forms_in_float64(
    x64, rng, weights, mixing, use_running_average, offset
):
    # On the CPU (N, C) input takes its raw form or, through a choice differentiated on the branch
    # taken only (_xla_cpu._taken), the plain one: every cotangent (x, both logits, scale, bias, the
    # running averages, and through the batch statistics) against the plain form alone, for each
    # weight shape, mixing, order and subset of the normalizers, with and without scale and bias.
    x = jnp.asarray(dense_input(rng, (12, 6)) + offset)
    assert dense_within_bound(x) is (offset == 0.0)
    dy = jnp.asarray(rng.normal(size=x.shape))
    for normalizers, affine in [
        (("bn", "ln"), True),
        (("ln", "bn"), False),
        (("ln",), True),
        (("bn",), False),
    ]:
        k = len(normalizers)
        shape = (k, 6) if weights == "channel" else (k,)
        args = {
            "mean_logits": jnp.asarray(rng.normal(size=shape)),
            "var_logits": jnp.asarray(rng.normal(size=shape)),
            "scale": jnp.asarray(rng.uniform(0.5, 1.5, 6)) if affine else None,
            "bias": jnp.asarray(rng.normal(size=6)) if affine else None,
            "running_mean": jnp.asarray(rng.normal(size=6) + 1e3),
            "running_var": jnp.asarray(rng.uniform(0.5, 2.0, 6)),
        }
        args = {name: value for name, value in args.items() if value is not None}
        options = dict(
            normalizers=normalizers, use_running_average=use_running_average, mixing=mixing, weights=weights
        )

        def loss(x, args, options=options):
            y, stats = switch_norm(x, **args, radius=0.3, **options)
            out = jnp.sum(y * dy)
            if stats is not None:
                out = out + jnp.sum(stats.mean * jnp.arange(6.0)) / 7 + jnp.sum(stats.var) / 5
            return out

        got = jax.jit(jax.grad(loss, (0, 1)))(x, args)
        with plain_forms():
            want = jax.jit(jax.grad(loss, (0, 1)))(x, args)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(
                g, w, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(w))), err_msg=str(normalizers)
            )


def test_dense_inference_uses_the_running_averages(rng):
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    logits = rng.normal(size=2), rng.normal(size=2)
    running_mean, running_var = rng.normal(size=8), rng.uniform(0.5, 2.0, 8)
    y, stats = switch_norm(
        x,
        *logits,
        normalizers=("bn", "ln"),
        use_running_average=True,
        running_mean=running_mean,
        running_var=running_var,
    )
    y_ref, _, _ = reference.switch_norm(
        np.asarray(x, np.float64),
        *logits,
        normalizers=("bn", "ln"),
        running_mean=running_mean,
        running_var=running_var,
    )
    assert stats is None
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


# --------------------------------------------------------------------------
# Gradients: the custom VJP equals plain autodiff on every path.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, offset",
    [((3, 4, 4, 6), 0.0), ((3, 4, 4, 6), 1e3), ((16, 6), 0.0), ((16, 6), 1e3)],
    ids=["spatial-raw", "spatial-shifted", "dense-direct", "dense-shifted"],
)
def test_custom_vjp_equals_autodiff_on_every_path_in_float64(x64, rng, shape, offset):
    normalizers = ALL if len(shape) > 2 else ("bn", "ln")
    x = jnp.asarray((dense_input(rng, shape) if len(shape) == 2 else rng.normal(size=shape)) + offset)
    if len(shape) == 2:
        assert dense_within_bound(x) is (offset == 0.0)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float64)
    logits = jnp.asarray(rng.normal(size=(2, len(normalizers))), jnp.float64)
    scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1])), jnp.asarray(rng.normal(size=shape[-1]))

    def grads(f):
        def loss(x, logits, scale, bias):
            y, stats = f(
                x, logits[0], logits[1], scale=scale, bias=bias, normalizers=normalizers, num_groups=2
            )
            return jnp.sum(y * dy) + jnp.sum(jnp.sin(stats.mean)) + jnp.sum(stats.var**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, logits, scale, bias)

    for custom, plain in zip(grads(switch_norm), grads(switch_norm_autodiff), strict=True):
        np.testing.assert_allclose(custom, plain, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------
# Off the CPU: the plain forms, shifted sums at once, no lax.cond.
# --------------------------------------------------------------------------


@pytest.fixture
def off_the_cpu():
    """The forms lowered for every platform but the CPU: the tests run on the CPU, so they are forced."""
    with plain_forms():
        yield


ROUTES = [((3, 4, 4, 6), 0.0), ((3, 4, 4, 6), 1e4), ((16, 6), 0.0), ((16, 6), 1e4)]
ROUTE_IDS = ["spatial", "spatial-at-1e4", "dense", "dense-at-1e4"]


def route_input(rng, shape, offset):
    """Unit-scale data, with sample 1 moved by ``offset``."""
    x = dense_input(rng, shape) if len(shape) == 2 else rng.normal(size=shape)
    x[1] += offset
    return x


@pytest.mark.parametrize("shape, offset", ROUTES, ids=ROUTE_IDS)
def test_off_the_cpu_the_layer_has_no_conditional_and_matches_float64(off_the_cpu, rng, shape, offset):
    normalizers = ALL if len(shape) > 2 else ("bn", "ln")
    x = jnp.asarray(route_input(rng, shape, offset), jnp.float32)
    logits = [jnp.asarray(rng.normal(size=len(normalizers)), jnp.float32) for _ in range(2)]

    def loss(x, logits):
        y, stats = switch_norm(x, *logits, normalizers=normalizers, num_groups=2)
        return jnp.sum(y * y) + jnp.sum(stats.var)

    assert "cond" not in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, logits))
    y = jax.jit(lambda x: switch_norm(x, *logits, normalizers=normalizers, num_groups=2)[0])(x)
    y_ref, _, _ = reference.switch_norm(
        np.asarray(x, np.float64), *(np.asarray(lg) for lg in logits), normalizers=normalizers, num_groups=2
    )
    np.testing.assert_allclose(y, y_ref, atol=2e-5 if offset == 0 else 1e-3)


@pytest.mark.parametrize("shape, offset", ROUTES, ids=ROUTE_IDS)
def test_off_the_cpu_gradients_pass_check_grads_in_float64(off_the_cpu, x64, rng, shape, offset):
    normalizers = ALL if len(shape) > 2 else ("bn", "ln")
    x = jnp.asarray(route_input(rng, shape, offset / 10))
    logits = jnp.asarray(rng.normal(size=(2, len(normalizers))))

    def f(x, lg):
        y, stats = switch_norm(x, lg[0], lg[1], normalizers=normalizers, num_groups=2)
        return y, stats.mean, stats.var

    check_grads(jax.jit(f), (x, logits), order=1, modes=["rev"])
