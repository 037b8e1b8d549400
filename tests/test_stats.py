"""The statistics of ``switchnorm._stats``: cells merged into each normalizer's scope (moments about
the first cell's mean, docs/design.md section 3), against float64 NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference

from switchnorm import _stats
from switchnorm._stats import cell_stats


def scope_stats(cells, name, num_groups=1):
    """One normalizer's mean (relative to each cell's shift) and variance, broadcast to the cells."""
    stats = _stats.normalizer_stats(name, cells, num_groups)
    shape = _stats.shape_of(cells)
    return _stats.Stats(
        None, jnp.broadcast_to(_stats.relative(stats, cells.shift), shape), jnp.broadcast_to(stats.var, shape)
    )


UNIT_ROUNDOFF = 2.0**-24
"""float32's unit round-off."""


def exact_cells(x64: np.ndarray, keep: np.ndarray | None = None):
    """float32 cell statistics of (N, m, C) data, each within one rounding of float64's.

    K is each cell's first (kept) element, as in the statistics pass; the sums
    are taken in float64 so that only the merge's own error is left to measure.
    """
    counted = keep is not None
    keep = np.ones(x64.shape, bool) if keep is None else keep
    first = np.argmax(keep, axis=1)[:, None, :]
    shift = np.where(keep.any(axis=1), np.take_along_axis(x64, first, axis=1)[:, 0, :], 0.0)
    d = np.where(keep, x64 - shift[:, None, :], 0.0)
    count = keep.sum(axis=1).astype(np.float64)
    s1, s2 = d.sum(axis=1), (d * d).sum(axis=1)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return cell_stats(f32(shift), f32(1.0), f32(s1), f32(s2), f32(count) if counted else x64.shape[1])


def float64_scope(x64: np.ndarray, name: str, keep: np.ndarray | None = None, groups: int = 1):
    """(mean, var) of the scope of every (n, c) cell, (N, C)-shaped: the float64 reference's."""
    mean, var = reference.scope_stats(x64, name, groups, keep)
    return tuple(np.broadcast_to(a, x64.shape)[:, 0, :] for a in (mean, var))


def first_cell_mean(x64: np.ndarray, name: str, keep: np.ndarray) -> np.ndarray:
    """r: the mean of the scope's first non-empty cell, as the merge takes its frame, (N, C)-shaped."""
    n, _, c = x64.shape
    cell_mean = np.where(keep, x64, 0.0).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
    filled = keep.any(axis=1)
    if name == "bn":
        return np.broadcast_to(cell_mean[np.argmax(filled, axis=0), np.arange(c)], (n, c))
    return np.broadcast_to(cell_mean[np.arange(n), np.argmax(filled, axis=1)][:, None], (n, c))


def lone_cell(rng, shape, name, offset, where):
    """Unit normal (N, m, C) data with one whole cell of the scope moved by ``offset``: the first or the last."""
    x = rng.normal(size=shape)
    index = {"first": 0, "last": -1}[where]
    if name == "bn":
        x[index, :, 0] += offset
    else:
        x[0, :, index] += offset
    return x


CASES = [
    ("bn", "mean-1e4", lambda rng, shape: 1e4 + rng.normal(size=shape)),
    ("ln", "mean-1e4", lambda rng, shape: 1e4 + rng.normal(size=shape)),
    ("bn", "lone-first", lambda rng, shape: lone_cell(rng, shape, "bn", 1e4, "first")),
    ("bn", "lone-last", lambda rng, shape: lone_cell(rng, shape, "bn", 1e4, "last")),
    ("ln", "lone-first", lambda rng, shape: lone_cell(rng, shape, "ln", 1e4, "first")),
    ("bn", "raw-range", lambda rng, shape: 2.5 + rng.normal(size=shape)),
]


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("name, case, make", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_scope_variance_is_within_the_bound_of_moments_about_the_first_cells_mean(
    rng, name, case, make, masked
):
    # Relative error of the merged variance <= a few u * (1 + (mean - r)^2 / var), r the first cell's mean:
    # a few u where r is near the mean, u times the cells merged at worst (a lone cell far from the rest).
    shape = (256, 4, 64)
    x64 = np.float32(make(rng, shape)).astype(np.float64)  # float32 data: its shifts are exact
    keep = rng.uniform(size=shape) < 0.7 if masked else np.ones(shape, bool)
    if masked:  # the first cell of every scope is empty: the frame is the next one's
        keep[(0, slice(None), slice(None)) if name == "bn" else (slice(None), slice(None), 0)] = False
    cells = exact_cells(x64, keep if masked else None)
    got = scope_stats(cells, name)
    mean, var = float64_scope(x64, name, keep)
    r = first_cell_mean(x64, name, keep)
    bound = 8 * UNIT_ROUNDOFF * (1.0 + (mean - r) ** 2 / var)
    relative = np.abs(np.asarray(got.var, np.float64) - var) / var
    assert np.all(relative <= bound), float(np.max(relative / bound))
    assert np.max(relative) < 1e-4
    absolute_mean = np.asarray(cells.shift, np.float64) + np.asarray(got.mean, np.float64)
    assert np.max(np.abs(absolute_mean - mean) / np.sqrt(var)) < 1e-3


def test_group_scopes_keep_their_digits_with_a_lone_channel_first(rng):
    shape = (4, 16, 32)
    x64 = np.float32(lone_cell(rng, shape, "gn", 1e4, "first")).astype(np.float64)
    got = scope_stats(exact_cells(x64), "gn", num_groups=4)
    mean, var = float64_scope(x64, "gn", groups=4)
    np.testing.assert_allclose(np.asarray(got.var, np.float64), var, rtol=1e-5)


@pytest.mark.parametrize("name", ["bn", "in", "ln", "gn"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_every_normalizer_is_its_scopes_mean_and_variance(rng, name, masked):
    shape = (6, 5, 8)
    x64 = np.float32(rng.normal(size=shape) * 2 + 3).astype(np.float64)
    keep = rng.uniform(size=shape) < 0.7 if masked else None
    got = scope_stats(exact_cells(x64, keep), name, num_groups=4)
    mean, var = float64_scope(x64, name, keep, groups=4)
    shift = np.asarray(exact_cells(x64, keep).shift, np.float64)
    np.testing.assert_allclose(shift + np.asarray(got.mean, np.float64), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.var, np.float64), var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis, name", [(0, "bn"), (1, "ln")])
def test_cells_in_absolute_terms_merge_about_zero(rng, axis, name):
    # (N, C) input's raw form: each element a cell, its mean the element, no shift.
    x64 = np.float32(rng.normal(size=(16, 6)) + 1.5).astype(np.float64)
    cells = _stats.Cells(None, jnp.asarray(x64, jnp.float32), jnp.zeros((), jnp.float32), 1)
    got = _stats.merge(cells, axis)
    assert np.all(np.asarray(got.frame) == 0)
    np.testing.assert_allclose(got.mean, x64.mean(axis, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(got.var, x64.var(axis, keepdims=True), rtol=1e-5)


def test_the_frame_is_the_first_non_empty_cells_mean_and_the_mean_is_relative_to_it(rng):
    x64 = np.float32(rng.normal(size=(5, 4, 3)) + 1e3).astype(np.float64)
    keep = np.ones(x64.shape, bool)
    keep[0] = False  # sample 0 holds nothing: bn's frame is sample 1's mean
    stats = _stats.merge(exact_cells(x64, keep), 0)
    np.testing.assert_allclose(stats.frame[0], x64[1].mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(
        np.asarray(stats.frame, np.float64)[0] + np.asarray(stats.mean, np.float64)[0],
        x64[1:].mean(axis=(0, 1)),
        rtol=1e-7,
    )


def test_blend_sums_the_weighted_statistics_in_each_cells_frame():
    shift = jnp.asarray([[10.0, 20.0]])
    a = _stats.Stats(jnp.asarray([[11.0, 21.0]]), jnp.asarray([[1.0, 2.0]]), jnp.asarray([[4.0, 9.0]]))
    b = _stats.Stats(jnp.zeros((1, 2)), jnp.asarray([[30.0, 40.0]]), jnp.asarray([[1.0, 1.0]]))
    mean, var = _stats.blend([a, b], shift, [0.25, 0.75], [0.5, 0.5])
    np.testing.assert_allclose(mean, [[0.25 * 2 + 0.75 * 20, 0.25 * 3 + 0.75 * 20]])
    np.testing.assert_allclose(var, [[2.5, 5.0]])


def test_power_of_two_scale_is_exact_and_keeps_squares_finite():
    v = jnp.asarray([0.0, 0.3, 1.0, 3.0, -1e4, 1e30, 3e38], jnp.float32)
    unit, inverse = _stats.power_of_two_scale(v)
    assert np.all(np.asarray(unit * inverse) == 1.0)  # exact powers of two
    assert np.all(np.log2(np.asarray(unit, np.float64)) == np.round(np.log2(np.asarray(unit, np.float64))))
    assert np.all(np.asarray(unit)[:3] == 1.0)  # |v| <= 1: no scaling
    assert np.all(np.isfinite(np.asarray(unit * unit)) & (np.asarray(unit * unit) > 0))
    scaled = np.abs(np.asarray(v * unit, np.float64))
    assert np.all(scaled[3:5] < 2.0) and np.all(scaled[3:5] >= 1.0)  # |v| u in [1, 2)
    assert np.all(np.asarray(unit)[5:] == 2.0**-63)  # capped, so that u^2 is a normal float32
