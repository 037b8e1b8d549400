"""sparsestmax: the exact SSN projection, against the float64 enumeration in sparse_reference."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sparse_reference as ref
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import switchnorm
from switchnorm._sparsestmax import sparsestmax

RADIUS_FRACTIONS = (0.0, 0.05, 0.3, 0.6, 0.9, 1.0, 1.3)  # of the top radius sqrt(1 - 1/K)
ROWS = {2: 40, 3: 40, 4: 40, 8: 12}  # one shape per K, so tests share compiled programs


def random_logits(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """Logits at several scales, so sparsemax alone lands both inside and outside the ball."""
    return rng.normal(size=(rows, size)) * rng.choice([0.05, 0.3, 1.0, 3.0], size=(rows, 1))


def distance_to_centre(p) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.linalg.norm(p - 1 / p.shape[-1], axis=-1)


@pytest.mark.parametrize("size", [3, 4])
def test_reference_is_the_minimum_over_dense_feasible_samples(size, rng):
    grid, sphere_points = (120, 4000) if size == 3 else (24, 1500)
    for z in random_logits(rng, 4, size):
        for fraction in (0.0, 0.3, 0.6, 0.9, 1.0):
            radius = fraction * ref.top_radius(size)
            best = ref.objective(ref.sparsestmax(z, radius), z)
            sampled = ref.dense_minimum(z, radius, rng, grid, sphere_points)
            assert sampled >= best - 1e-9  # no feasible sample beats the enumeration
            assert sampled <= best + 2e-3 * max(best, 1)  # and the samples come close to it


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_matches_reference_at_every_radius(size, rng):
    z = random_logits(rng, ROWS[size], size).astype(np.float32)
    for fraction in RADIUS_FRACTIONS:
        radius = fraction * ref.top_radius(size)
        np.testing.assert_allclose(sparsestmax(z, radius), ref.sparsestmax_rows(z, radius), atol=1e-6)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_matches_reference_in_float64(size, rng, x64):
    z = random_logits(rng, ROWS[size], size)
    for fraction in RADIUS_FRACTIONS:
        radius = fraction * ref.top_radius(size)
        np.testing.assert_allclose(sparsestmax(z, radius), ref.sparsestmax_rows(z, radius), atol=1e-11)


def test_radius_zero_is_sparsemax(rng):
    for size, rows in ROWS.items():
        z = random_logits(rng, rows, size).astype(np.float32)
        expected = np.stack([ref.sparsemax(row) for row in z])
        np.testing.assert_allclose(sparsestmax(z, 0.0), expected, atol=1e-6)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_top_radius_and_beyond_give_one_hot_at_the_largest_logit(size, rng):
    z = random_logits(rng, 30, size).astype(np.float32)
    one_hot = np.eye(size)[np.argmax(z, axis=-1)]
    for radius in (ref.top_radius(size), 1.0, 10.0):
        np.testing.assert_allclose(sparsestmax(z, radius), one_hot, atol=1e-6)


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_output_is_on_the_simplex_and_outside_the_ball(size, rng):
    z = random_logits(rng, 200, size).astype(np.float32)
    radius = rng.uniform(0, 1.1 * ref.top_radius(size), size=200).astype(np.float32)
    p = np.asarray(sparsestmax(z, radius), np.float64)
    assert p.min() >= 0
    np.testing.assert_allclose(p.sum(axis=-1), 1, atol=1e-6)
    assert np.all(distance_to_centre(p) >= np.minimum(radius, ref.top_radius(size)) - 1e-6)


TIES = [
    ([0.0, 0.0, 0.0], 0.0),  # sparsemax: the centre, unique
    ([0.0, 0.0, 0.0], 0.2),
    ([0.0, 0.0, 0.0, 0.0], 0.3),
    ([0.0, 0.0, 0.0, 0.0], 0.7),
    ([5.0, 5.0, 5.0, 5.0], 0.7),  # constant but not zero
    ([1.0, 1.0, 0.0, -1.0], 0.5),  # tied pair, ball reaching only their edge's centre: unique
    ([1.0, 1.0, 0.0, -1.0], 0.6),
    ([1.0, 1.0, 1.0, 0.0], 0.6),
    ([2.0, 0.5, 2.0, 2.0], 0.45),  # tied entries not adjacent
    ([1.0, 1.0, 0.0], float(np.sqrt(2 / 3))),  # top radius: the lowest tied index
    ([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 0.7),
    ([0.3, 0.3, 0.1, 0.3], 0.2),  # ties below the ball: sparsemax(beta z) stays unique
]


@pytest.mark.parametrize("z, radius", TIES)
def test_ties_go_to_the_lowest_index(z, radius):
    p = sparsestmax(jnp.asarray(z, jnp.float32), radius)
    np.testing.assert_allclose(p, ref.lowest_index_tiebreak(z, radius, eps=1e-9), atol=1e-6)
    assert distance_to_centre(p) >= min(radius, ref.top_radius(len(z))) - 1e-6


def test_huge_logits_match_the_reference(rng):
    z = rng.normal(size=(20, 4)) * 1e30
    z[0] = [1e30, 1e30, -1e30, 0.0]  # a tie at 1e30
    z[1] = [1e30, 1e-30, -1e30, 0.0]  # mixed scales
    z = z.astype(np.float32)
    for radius in (0.0, 0.4, 0.8):
        np.testing.assert_allclose(sparsestmax(z, radius), ref.sparsestmax_rows(z, radius), atol=1e-6)


def test_tiny_logits_keep_their_order(rng):
    """Once sparsemax(z) lies inside the ball the answer depends only on z's direction, so logits
    near 1e-30 (which float64 rounds away next to 1/K) must agree with the same logits scaled up."""
    direction = rng.normal(size=(20, 4))
    radius = 0.5
    scaled = 0.01 * direction  # sparsemax lands within 0.1 of the centre: inside the ball
    assert np.all(distance_to_centre(np.stack([ref.sparsemax(row) for row in scaled])) < radius)
    tiny = (1e-30 * direction).astype(np.float32)
    np.testing.assert_allclose(sparsestmax(tiny, radius), ref.sparsestmax_rows(scaled, radius), atol=1e-5)


def test_extreme_logits_give_finite_values_and_gradients():
    z = jnp.array([[1e30, -1e30, 1e-30, 0.0], [1e-30, -1e-30, 0.0, 2e-30], [3e37, -3e37, 0.0, 1.0]])
    p = sparsestmax(z, 0.5)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(sparsestmax(z, 0.5) * jnp.arange(4.0))))(z)
    assert np.isfinite(p).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_floats_are_computed_in_float32_and_returned_in_their_dtype(dtype, rng):
    z = jnp.asarray(random_logits(rng, 30, 4), dtype)
    p = sparsestmax(z, 0.5)
    assert p.dtype == dtype
    np.testing.assert_array_equal(p, sparsestmax(z.astype(jnp.float32), 0.5).astype(dtype))


def test_float64_is_computed_and_returned_in_float64(x64):
    z = jnp.array([1.0, 1.0 + 1e-12, 0.0])  # float32 would round the two largest into a tie
    p = sparsestmax(z, 0.0)
    assert p.dtype == jnp.float64
    np.testing.assert_allclose(p[1] - p[0], 1e-12, rtol=1e-3)
    assert sparsestmax(z.astype(jnp.float32), 0.0).dtype == jnp.float32


@pytest.mark.parametrize(
    "z, radius, error, message",
    [
        (np.zeros(3, np.float32), -0.1, ValueError, "radius must be >= 0, got -0.1"),
        (np.zeros(3, np.float32), float("nan"), ValueError, "must not be NaN"),
        (np.zeros(3, np.float32), np.array([0.1, -1.0]), ValueError, "radius must be >= 0"),
        (np.zeros(3, np.int32), 0.1, TypeError, "needs floating logits, got dtype int32"),
        (np.zeros((2, 0), np.float32), 0.1, ValueError, r"K >= 1 entries there, got shape \(2, 0\)"),
        (np.float32(1.0), 0.1, ValueError, r"got shape \(\)"),
        (np.zeros((2, 3), np.float32), np.zeros(3), ValueError, r"shape \(3,\) does not broadcast"),
    ],
)
def test_rejects_bad_inputs_with_the_value_and_the_fix(z, radius, error, message):
    with pytest.raises(error, match=message):
        sparsestmax(z, radius)


def test_one_entry_returns_one():
    np.testing.assert_array_equal(sparsestmax(jnp.array([[3.0], [-2.0]]), 0.7), [[1.0], [1.0]])
    np.testing.assert_array_equal(jax.jit(sparsestmax)(jnp.array([-1e30]), 0.0), [1.0])


def test_traced_radius_negative_acts_as_zero_and_nan_propagates(rng):
    z = random_logits(rng, 5, 4).astype(np.float32)
    project = jax.jit(sparsestmax)
    np.testing.assert_allclose(project(z, -0.3), ref.sparsestmax_rows(z, 0.0), atol=1e-6)
    assert np.isnan(project(z, jnp.nan)).all()


def test_a_row_with_nan_logits_comes_out_nan():
    p = sparsestmax(jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 0.0]]), 0.3)
    assert np.isnan(p[0]).all() and np.isfinite(p[1]).all()


def test_batched_over_leading_axes_with_a_radius_per_row(rng):
    z = random_logits(rng, 24, 4).astype(np.float32)
    radius = rng.uniform(0, 0.9, size=24).astype(np.float32)
    p = sparsestmax(z.reshape(2, 3, 4, 4), radius.reshape(2, 3, 4))
    np.testing.assert_allclose(p.reshape(24, 4), ref.sparsestmax_rows(z, radius), atol=1e-6)


def test_jit_vmap_scan_and_shard_map_agree_with_the_reference(rng):
    z = random_logits(rng, 16, 4).astype(np.float32)
    radius = rng.uniform(0, 0.9, size=16).astype(np.float32)
    expected = ref.sparsestmax_rows(z, radius)
    by_row = jax.jit(jax.vmap(sparsestmax))(z, radius)

    def step(carry, row):
        return carry, sparsestmax(*row)

    _, scanned = jax.lax.scan(step, 0, (z, radius))
    mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
    sharded = jax.jit(
        jax.shard_map(sparsestmax, mesh=mesh, in_specs=(P("rows"), P("rows")), out_specs=P("rows"))
    )(z, radius)
    for name, got in (("jit(vmap)", by_row), ("scan", scanned), ("shard_map", sharded)):
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)


def test_compiles_to_straight_line_code():
    """No data-dependent control flow: the traced program has no cond, while or scan."""
    jaxpr = str(jax.make_jaxpr(sparsestmax)(jnp.zeros((5, 4)), jnp.float32(0.3)))
    for primitive in ("cond[", "while[", "scan["):
        assert primitive not in jaxpr


@pytest.mark.slow
def test_shard_map_over_four_cpu_devices():
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from switchnorm._sparsestmax import sparsestmax
        assert jax.device_count() == 4
        z = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        r = np.linspace(0, 0.9, 8, dtype=np.float32)
        mesh = Mesh(np.array(jax.devices()), ("rows",))
        f = jax.jit(jax.shard_map(sparsestmax, mesh=mesh, in_specs=(P("rows"), P("rows")), out_specs=P("rows")))
        np.testing.assert_allclose(f(z, r), sparsestmax(z, r), atol=1e-7)
        print("ok")
        """
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# Points well inside one regime, away from support changes and the beta = 1 boundary.
SMOOTH_POINTS = [
    ([1.0, 0.8, 0.1], 0.3),  # sparsemax already outside the ball: the answer is sparsemax(z)
    ([1.0, 0.8, 0.1], 0.6),  # pushed out along the edge {0, 1}
    ([0.30, 0.20, 0.05, 0.10], 0.2),  # pushed out with full support
    ([0.9, 0.1, 0.5, 0.45], 0.5),  # pushed out on a face of three
]


@jax.jit
def weighted_weights(z, radius):
    """A scalar of every output weight, for gradient checks (module level: compiled once per K)."""
    return jnp.sum(sparsestmax(z, radius) * jnp.linspace(-1.0, 2.0, z.shape[-1]))


@pytest.mark.parametrize("z, radius", SMOOTH_POINTS)
def test_gradients_match_finite_differences(z, radius, x64):
    check_grads(
        weighted_weights, (jnp.asarray(z), jnp.float64(radius)), order=1, modes=("fwd", "rev"), eps=1e-6
    )


# Tied maxima where the answer is sparsemax(z) itself (radius at most the tied face's distance
# from the centre): sparsemax is linear near these points, so its central differences are exact.
TIED_SPARSEMAX_POINTS = [
    ([0.0, 0.0, 0.0, 0.0], 0.0),  # the layer's initial logits
    ([0.0, 0.0, 0.0], 0.0),
    ([0.0, 0.0, -5.0, -5.0], 0.0),
    ([0.0, 0.0, -5.0, -5.0], 0.3),  # the face of two is sqrt(1/4) from the centre
    ([2.0, 2.0, 2.0, -3.0], 0.1),
]


@pytest.mark.parametrize("z, radius", TIED_SPARSEMAX_POINTS)
def test_tied_logits_get_sparsemax_derivative_against_the_reference(z, radius, x64):
    # The uniform point of a tied face used to come from comparisons alone, with derivative 0:
    # logits that start tied at zero then never moved and every layer kept the tie rule's pick.
    z = np.asarray(z)
    jacobian = np.asarray(jax.jacrev(sparsestmax)(jnp.asarray(z), jnp.float64(radius)))
    h = 1e-4
    numeric = np.stack(
        [
            (ref.sparsestmax(z + h * e, radius) - ref.sparsestmax(z - h * e, radius)) / (2 * h)
            for e in np.eye(z.size)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(jacobian, numeric, atol=1e-8)
    assert np.abs(jacobian).max() > 0.1


KINKS = [
    ([0.0, 0.0, 0.0, 0.0], 0.5),  # constant logits: the tie rule
    ([0.0, 0.0, 0.0, 0.0], 0.0),
    ([1.0, 1.0, 0.0, -1.0], 0.6),  # tied maxima
    ([1.0, 0.8, 0.1], float(np.sqrt(2 / 3))),  # one-hot at the top radius
    ([1.0, 0.8, 0.1], 5.0),  # beyond it
    ([1.0, 0.8, 0.1], 0.43204938),  # sparsemax exactly on the sphere: beta = 1
    ([1.0, 0.8, 0.1], 0.0),
    ([3.0, 0.0, 0.0], 0.2),  # sparsemax already one-hot
]


# Module level and jitted: one compile per mode and number of logits, shared by every kink
# (run eagerly, each kink dispatched the derivative's many small ops one by one).
JACOBIANS = {mode.__name__: jax.jit(mode(sparsestmax, argnums=(0, 1))) for mode in (jax.jacrev, jax.jacfwd)}


@pytest.mark.parametrize("z, radius", KINKS)
def test_gradients_are_finite_at_kinks_and_one_hot_outputs(z, radius):
    z, radius = jnp.asarray(z), jnp.float32(radius)
    for name, jacobian in JACOBIANS.items():
        dz, dr = jacobian(z, radius)
        assert np.isfinite(dz).all() and np.isfinite(dr).all(), name


def test_docstring_example_runs():
    assert switchnorm.sparsestmax is sparsestmax  # the example imports it from the package root
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(sparsestmax, "sparsestmax", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 5


# -- infinite logits: the limit of ever larger (or smaller) finite ones ----------------------------

BIG = 1e6  # far beyond any gap among the finite logits below, so the reference sees the limit

INFINITE = [
    [np.inf, 1.0, 0.0],  # one +inf: one-hot on it
    [np.inf, np.inf, 0.0, -1.0],  # several: tied among themselves
    [0.5, np.inf, -np.inf, np.inf],  # with a -inf among the rest
    [1.0, -np.inf, 0.0],  # -inf: weight 0, the rest projected without it
    [0.3, 0.1, -np.inf, 0.2, -np.inf],
    [-np.inf, -np.inf, -np.inf],  # nothing but -inf: as constant logits
    [2.0, 2.0, -np.inf, 0.0],  # a tie beside a -inf
]


def _finite_limit(z) -> np.ndarray:
    """z with +inf as BIG (and the rest 0 where there is one) and -inf as -BIG."""
    z = np.asarray(z, np.float64)
    if np.isposinf(z).any():
        return np.where(np.isposinf(z), BIG, 0.0)
    if np.isneginf(z).all():
        return np.zeros_like(z)
    return np.where(np.isneginf(z), -BIG, z)


@pytest.mark.parametrize("z", INFINITE, ids=str)
def test_infinite_logits_give_the_limit_of_huge_finite_ones(z):
    for fraction in RADIUS_FRACTIONS:
        radius = fraction * ref.top_radius(len(z))
        got = np.asarray(sparsestmax(jnp.asarray(z, jnp.float32), radius))
        limit = _finite_limit(z)
        expected = ref.lowest_index_tiebreak(limit, radius, eps=1e-9)
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"radius {radius}")


def test_a_single_plus_inf_is_one_hot_and_minus_inf_gets_nothing_with_finite_gradients():
    z = jnp.array([[0.0, jnp.inf, 3.0], [1.0, -jnp.inf, 0.2]])
    p = sparsestmax(z, 0.3)
    np.testing.assert_array_equal(p[0], [0.0, 1.0, 0.0])
    assert p[1, 1] == 0 and np.isfinite(p).all()
    grad = jax.grad(lambda z: jnp.sum(sparsestmax(z, 0.3) * jnp.arange(3.0)))(z)
    assert np.isfinite(grad).all() and grad[1, 1] == 0


# -- choosing from tied logits at any radius -----------------------------------------------------


def _tied_face_jacobian(z: np.ndarray) -> np.ndarray:
    """The reference derivative at tied maxima: sparsemax's, by central differences in float64,
    of the tied entries alone (the rest out of the problem), zero elsewhere."""
    tied = np.flatnonzero(z == z.max())
    jacobian = np.zeros((z.size, z.size))
    h = 1e-4
    for j in tied:
        step = np.zeros(tied.size)
        step[list(tied).index(j)] = h
        column = (ref.sparsemax(z[tied] + step) - ref.sparsemax(z[tied] - step)) / (2 * h)
        jacobian[tied, j] = column
    return jacobian


TIED_ABOVE_THE_FACE = [  # tied maxima with the ball past their face's centre: the tie rule decides
    ([0.0, 0.0, 0.0, 0.0], 0.5),
    ([0.0, 0.0, 0.0, 0.0], 1.0),  # one-hot
    ([0.0, 0.0, 0.0], 0.3),
    ([1.0, 1.0, 0.0, -1.0], 0.6),
    ([2.0, 0.5, 2.0, 2.0], 0.45),
]


@pytest.mark.parametrize("z, radius", TIED_ABOVE_THE_FACE)
def test_tied_logits_above_their_face_get_the_tied_faces_sparsemax_derivative(z, radius, x64):
    # The tie rule's answer jumps with the direction z leaves the tie in: no derivative exists.
    # Before, the code gave none (exactly 0): logits that start tied at zero never moved once the
    # radius was above 0, and every layer stayed on bn.
    z = np.asarray(z)
    jacobian = np.asarray(jax.jacrev(sparsestmax)(jnp.asarray(z), jnp.float64(radius)))
    np.testing.assert_allclose(jacobian, _tied_face_jacobian(z), atol=1e-8)
    assert np.abs(jacobian).max() > 0.1
    np.testing.assert_allclose(  # the value is still the tie rule's
        sparsestmax(jnp.asarray(z), radius), ref.lowest_index_tiebreak(z, radius, eps=1e-9), atol=1e-9
    )


@pytest.mark.parametrize("radius", [0.3, 0.6, 1.0])
def test_tied_logits_at_a_radius_above_zero_move_and_the_layer_chooses(radius):
    """What ``set_radius(model, r)`` before training does to a layer's zero logits: one gradient
    step from the tie, and the projection picks the normalizer the loss prefers (not the tie
    rule's index 0)."""
    preference = jnp.array([0.0, 0.2, 1.0, 0.1])  # the loss wants weight on entry 2

    def loss(z):
        return -jnp.sum(sparsestmax(z, radius) * preference)

    z = jnp.zeros(4)
    grad = jax.grad(loss)(z)
    assert int(np.argmin(grad)) == 2 and np.ptp(grad) > 0
    moved = z - 0.1 * grad
    assert int(np.argmax(sparsestmax(moved, radius))) == 2
    if radius >= ref.top_radius(4):
        np.testing.assert_array_equal(sparsestmax(moved, radius), [0.0, 0.0, 1.0, 0.0])


def test_tied_logits_stay_tied_only_where_the_loss_does_not_tell_them_apart():
    grad = jax.grad(lambda z: jnp.sum(sparsestmax(z, 0.7) * jnp.array([1.0, 1.0, 1.0, 5.0])))(
        jnp.array([0.0, 0.0, 0.0, -1.0])
    )
    np.testing.assert_array_equal(grad, np.zeros(4))


# -- radius_schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("final", [-1.0, -1e-9, float("nan"), float("inf"), True, "1"])
def test_radius_schedule_refuses_a_negative_or_non_finite_final_radius(final):
    with pytest.raises(ValueError, match="final as a finite number >= 0"):
        switchnorm.radius_schedule(3, 10, final=final)


def test_radius_schedule_takes_any_finite_final_radius():
    assert float(switchnorm.radius_schedule(5, 10, final=0.0)) == 0.0
    assert float(switchnorm.radius_schedule(5, 10, final=np.float32(2.0))) == 1.0
