"""Merging cells into a scope (moments about the first cell's mean, docs/design.md section 3) and
the softmax of a few logits with no reduction: both against float64 and jax.nn.softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads

from switchnorm._mixing import SMALL_SOFTMAX_MAX_K, mixing_weights_from_logits
from switchnorm._stats import cell_stats, scope_stats

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


# --------------------------------------------------------------------------
# The softmax of a few logits: jax.nn.softmax's values and derivatives, no reduction.
# --------------------------------------------------------------------------


def some_logits(rng, shape, dtype):
    """Random logits with a gap of 1e3 and a -inf in the first row: exact zeros and ones."""
    logits = rng.normal(size=shape) * 3.0
    if shape[-1] > 1:
        logits.reshape(-1, shape[-1])[0, :2] = (1e3, -np.inf)
    return jnp.asarray(logits, dtype)


@pytest.mark.parametrize("shape", [(4,), (2, 4), (2, 4, 7), (2, 9, 3), (1,), (2, SMALL_SOFTMAX_MAX_K)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_the_small_softmax_equals_jax_softmax_exact_zeros_included(rng, x64, shape, dtype):
    logits = some_logits(rng, shape, dtype)
    got, want = mixing_weights_from_logits(logits), jax.nn.softmax(logits)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=0)
    assert np.all((np.asarray(got) == 0) == (np.asarray(want) == 0))


def test_the_small_softmax_has_the_derivatives_of_jax_softmax(rng, x64):
    logits = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float64)
    check_grads(mixing_weights_from_logits, (logits,), order=2, modes=("fwd", "rev"))
    cotangent = jnp.asarray(rng.normal(size=logits.shape))
    got = jax.vjp(mixing_weights_from_logits, logits)[1](cotangent)[0]
    want = jax.vjp(jax.nn.softmax, logits)[1](cotangent)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [2, 4, SMALL_SOFTMAX_MAX_K])
def test_the_small_softmax_compiles_to_no_reduction_forward_or_backward(k):
    # Each reduction is a kernel of its own on XLA:CPU; the weights are in every layer's graph.
    logits = jnp.zeros((2, k))
    loss = lambda lg: jnp.vdot(mixing_weights_from_logits(lg), jnp.arange(2.0 * k).reshape(2, k))  # noqa: E731
    for fn in (mixing_weights_from_logits, jax.grad(loss)):
        text = jax.jit(fn).lower(logits).compile().as_text()
        assert " reduce(" not in text and "reduce-window(" not in text, text


@pytest.mark.parametrize("name", ["bn", "ln", "gn"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_each_scope_is_merged_in_one_reduction(rng, name, masked):
    # Both moments (with a mask, the count too) come from one reduction: each is a kernel on a CPU.
    x64 = rng.normal(size=(8, 4, 6))
    cells = exact_cells(x64, rng.uniform(size=x64.shape) < 0.7 if masked else None)
    merge = jax.jit(lambda cells: scope_stats(cells, name, num_groups=3))
    text = merge.lower(cells).compile().as_text()
    reductions = text.count(" reduce(") + text.count(" reduce-window(")
    assert reductions == 1 + masked, text  # a mask adds the argmax that finds the first kept cell


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_reverse_mode_of_the_merges_and_the_weights_has_no_pad(rng, masked):
    # Indexing a stacked result transposes into a pad per slice, each a kernel on a CPU.
    x64 = rng.normal(size=(8, 4, 6))
    cells = exact_cells(x64, rng.uniform(size=x64.shape) < 0.7 if masked else None)

    def loss(mean, logits):
        moved = cells._replace(mean=mean)
        stats = [scope_stats(moved, name, num_groups=3) for name in ("bn", "ln", "gn")]
        return jnp.sum(mixing_weights_from_logits(logits) ** 2) * sum(jnp.sum(s.mean + s.var) for s in stats)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(cells.mean, jnp.zeros((2, 3))).compile().as_text()
    assert " pad(" not in text, text
