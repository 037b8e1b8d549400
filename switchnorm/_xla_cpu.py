"""Every compiler workaround of the layer, in one place: the passes over x as XLA:CPU compiles them well.

The layer reads x only in the passes of :mod:`switchnorm._passes`. This module is
their one seam: each public function here is one of those passes, chosen by
the platform the computation is *lowered* for (``jax.lax.platform_dependent``):
the form below on the CPU, the plain form of :mod:`switchnorm._passes` on every
other platform. Both give the same values up to float rounding; only what
XLA:CPU compiles differs. What each workaround buys, measured, is in
docs/performance.md ("Compiler workarounds"); ``python -m benchmarks.workarounds``
measures it again by switching each off.

The workarounds (names as in :data:`WORKAROUNDS`):

* ``raw_sums``: the statistics pass first takes raw sums (K = 0, u = 1), two
  reductions that read x itself, which XLA:CPU runs about twice as fast as a
  reduction of ``x - K``; it keeps them where every cell's mean square is at
  most :data:`RAW_SUMS_BOUND` times its variance (their cancellation then
  costs at most a few units of float32 rounding), else takes the shifted sums
  (``lax.cond``). The backward then reads ``dy x`` rather than ``dy (x - K)``.
  (N, C) input does the same with each scope's sums (:func:`dense`).
* ``apart``: a half-precision x or dy, ``x - K`` and a mask's weights are
  computed by each kernel that reads them. XLA:CPU's reductions fuse such a
  producer only where no other kernel reads it, and otherwise write it out as
  an x-sized float32 array. Each reader takes its operands behind a nesting of
  optimization barriers of its own depth (:data:`SITES`): CSE merges equal
  barriers, not different nestings, and the barriers vanish before fusion.
* ``boundary``: the (N, C) arrays a pass over x reads are computed before it.
  XLA:CPU otherwise fuses the whole (N, C) graph into that pass and recomputes
  it for every element of x.

``ENABLED = False`` (tests only) or a name in ``DISABLED`` (benchmarks) traces the
plain forms instead; clear JAX's caches after changing them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm import _passes, _stats
from switchnorm._passes import Sums, cell_size, cells_of, per_cell

Array = jax.Array

WORKAROUNDS = ("raw_sums", "apart", "boundary")
ENABLED = True
"""False traces every pass in its plain form on every platform (a test switch)."""
DISABLED: frozenset[str] = frozenset()
"""Workarounds switched off one by one (what ``benchmarks.workarounds`` measures)."""


def _on(name: str) -> bool:
    return ENABLED and name not in DISABLED


def _steered(name: str, cpu: Callable, plain: Callable, *args: Any) -> Any:
    """``cpu(*args)`` where the computation is lowered for the CPU and ``name`` is on, else ``plain(*args)``."""
    assert name in WORKAROUNDS, name  # a workaround switched off must be switched off everywhere
    if not _on(name):
        return plain(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=plain)


# -- keeping producers apart ----------------------------------------------------------------------

SITES = (
    *("x_sum", "x_squares", "x_normalize", "x_backward", "x_dx"),
    *("dy_sum", "dy_x", "dy_bias", "dy_dx"),
    *(f"scope{axis}_{moment}" for axis in (0, 1, 2) for moment in ("mean", "var")),
)
"""The kernels that read x or dy, each at its own depth of barriers (its index + 1)."""


def apart(values: Any, site: str) -> Any:
    """``values`` unchanged, behind ``SITES.index(site) + 1`` optimization barriers."""
    if _on("apart"):
        for _ in range(SITES.index(site) + 1):
            values = lax.optimization_barrier(values)
    return values


def _moments_apart(terms: Callable, operands: tuple, count: Any, axis: int, collective: Any) -> tuple:
    """Each moment from a reduction of its own, its operands taken :func:`apart` (a site per axis and moment)."""
    means = []
    for moment, name in enumerate(("mean", "var")):
        term = terms(*apart(operands, f"scope{axis}_{name}"))[moment]
        means.append(_stats.stacked_means(term[None], count, axis, collective)[0])
    return tuple(means)


def scope_moments(terms: Callable, operands: tuple, count: Any, axis: int, collective: Any = None) -> tuple:
    """:func:`switchnorm._stats.merge`'s ``means`` for (N, C) input, whose cells are x itself.

    On the CPU each moment is a reduction of its own whose operands are kept :func:`apart`:
    stacked, the two moments would be an array twice x's size, and sharing ``x - r``, ``x * x``
    or a convert of half-precision x, XLA:CPU would write those out.
    """
    cpu = functools.partial(_moments_apart, terms, count=count, axis=axis, collective=collective)
    plain = functools.partial(_stats.moments, terms, count=count, axis=axis, collective=collective)
    return _steered("apart", cpu, plain, operands)


def _read(v: Array, compute_dtype: Any, site: str) -> Array:
    """``v`` as (N, m, C) cells in ``compute_dtype``; a half-precision ``v`` converted :func:`apart`."""
    if v.dtype != jnp.dtype(compute_dtype):
        v = apart(v, site)
    return cells_of(v).astype(compute_dtype)


MIN_CELL_FOR_BOUNDARY = 16
"""Below this many elements per cell the (N, C) graph is nearly as large as x: recomputing it is cheap."""


def _boundary(arrays: tuple[Array, ...], m: int) -> tuple[Array, ...]:
    """The (N, C) arrays unchanged, computed before the pass over x that reads them.

    A cumulative sum along a new axis of length 2 (``v`` then ``v + 0``, so exactly
    ``v``) is a reduce-window, which XLA:CPU does not fuse into a loop; the arrays
    go through it stacked, one kernel for all.
    """
    if m < MIN_CELL_FOR_BOUNDARY or not _on("boundary"):
        return arrays
    stacked = jnp.stack(arrays)
    return tuple(lax.cumsum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)[1])


# -- the statistics pass --------------------------------------------------------------------------

RAW_SUMS_BOUND = 16.0
"""The largest mean square over variance for which raw sums are kept.

From raw sums ``var = (s2 - s1^2 / m) / m`` has a relative error of about
``c eps s2 / M2`` (eps the unit round-off, c the summation's error growth): at most
``16 c eps`` where the bound holds, a few times float32's own rounding of the
variance, wherever |mean| is within about 3.9 standard deviations."""


def within_bound(s1: Array, s2: Array, count: Array | int) -> Array:
    """Whether every ``s2 <= 16 (s2 - s1^2 / m)`` and no ``s2`` overflowed (NaN fails): one reduction."""
    m = count if isinstance(count, int) else jnp.maximum(count, 1)
    ok = (s2 <= RAW_SUMS_BOUND * (s2 - s1 * (s1 / m))) & jnp.logical_not(jnp.isinf(s2))
    return jnp.sum(jnp.logical_not(ok).astype(s2.dtype)) == 0.0


def _cpu_statistics_pass(x: Array, keep: Array | None, compute_dtype: Any) -> Sums:
    """Raw sums where they suffice, else the shifted ones; under a mask x is zeroed once, read as int8 weights."""
    count = _passes.counts(keep, x, compute_dtype)
    values, weights = x, None
    if keep is not None:  # XLA:CPU's reductions fuse neither a select nor a convert of booleans
        values = apart(jnp.where(keep, cells_of(x), jnp.zeros((), x.dtype)), "x_sum")
        weights = apart(keep.astype(jnp.int8), "x_sum")
    s1 = jnp.sum(_read(values, compute_dtype, "x_sum"), axis=1)
    squares = _read(values, compute_dtype, "x_squares")
    s2 = jnp.sum(squares * squares, axis=1)
    raw = within_bound(s1, s2, count)
    # Float32 x without a mask: XLA:CPU writes (x - K) u once (in y's buffer) for both sums to read,
    # faster than two reductions of a broadcast. Otherwise each sum computes it, in float32, itself.
    shared = x.dtype == jnp.dtype(compute_dtype) and keep is None

    def shifted(operands: tuple) -> Array:
        values, weights = operands
        shift, unit, inverse_unit = _passes.shift_of(x if keep is None else values, keep, compute_dtype)

        def scaled_sum(site: str, square: bool) -> Array:
            values_, shift_, unit_, weights_ = (values, shift, unit, weights)
            if not shared:
                values_, shift_, unit_, weights_ = apart((values, shift, unit, weights), site)
            d = (cells_of(values_).astype(compute_dtype) - per_cell(shift_)) * per_cell(unit_)
            if weights_ is not None:
                d = d * weights_.astype(compute_dtype)
            return jnp.sum(d * d if square else d, axis=1)

        sums = (scaled_sum("x_sum", False), scaled_sum("x_squares", True))
        return jnp.stack([shift, unit, inverse_unit, *sums])

    def as_raw(operands: tuple) -> Array:  # one stack: one kernel writes the branch's five arrays
        zeros, ones = jnp.zeros_like(s1), jnp.ones_like(s1)
        return jnp.stack([zeros, ones, ones, s1, s2])

    shift, unit, inverse_unit, s1, s2 = lax.cond(raw, as_raw, shifted, (values, weights))
    return Sums(shift, unit, inverse_unit, s1, s2, raw)


def statistics_pass(x: Array, keep: Array | None, compute_dtype: Any) -> Sums:
    """:func:`switchnorm._passes.statistics_pass`; on the CPU raw sums first (``raw_sums``)."""
    if cell_size(x) == 1:  # one element per cell: the sums are zero, nothing to steer
        return _passes.statistics_pass(x, keep, compute_dtype)
    cpu = functools.partial(_cpu_statistics_pass, compute_dtype=compute_dtype)
    plain = functools.partial(_passes.statistics_pass, compute_dtype=compute_dtype)
    return _steered("raw_sums", cpu, plain, x, keep)


# -- the normalize pass ---------------------------------------------------------------------------


def _cpu_normalize_pass(x, shift, mix_mean, a, bias, compute_dtype, out_dtype):
    shift, mix_mean, a = _boundary((shift, mix_mean, a), cell_size(x))
    cells = _read(x, compute_dtype, "x_normalize")
    y = (cells - per_cell(shift) - per_cell(mix_mean)) * per_cell(a)
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y.reshape(x.shape).astype(out_dtype)


def normalize_pass(
    x: Array, shift: Array, mix_mean: Array, a: Array, bias: Array | None, compute_dtype: Any, out_dtype: Any
) -> Array:
    """:func:`switchnorm._passes.normalize_pass`; on the CPU behind the boundary, x converted apart."""
    static = {"compute_dtype": compute_dtype, "out_dtype": out_dtype}
    cpu = functools.partial(_cpu_normalize_pass, **static)
    plain = functools.partial(_passes.normalize_pass, **static)
    return _steered("boundary", cpu, plain, x, shift, mix_mean, a, bias)


# -- the backward passes --------------------------------------------------------------------------


def _cpu_backward_sums(dy, x, sums, mix_mean, compute_dtype):
    r1 = jnp.sum(_read(dy, compute_dtype, "dy_sum"), axis=1)
    # d bias from an (N, m, C) view as r1's: XLA would otherwise merge it into a reduction of the
    # 4-D dy, which needs a second float32 copy of half-precision dy.
    bias_bar = jnp.sum(_read(dy, compute_dtype, "dy_bias"), axis=(0, 1))

    def raw_form(operands):  # K = 0: reductions of dy x, which XLA:CPU reads without a temporary
        dy, x, mix_mean, r1 = operands
        products = _read(dy, compute_dtype, "dy_x") * _read(x, compute_dtype, "x_backward")
        return jnp.sum(products, axis=1) - mix_mean * r1

    def centred_form(operands):
        dy, x, mix_mean, _ = operands
        x_, shift = apart((x, sums.shift), "x_backward")
        centred = cells_of(x_).astype(compute_dtype) - per_cell(shift) - per_cell(mix_mean)
        return jnp.sum(_read(dy, compute_dtype, "dy_x") * centred, axis=1)

    return r1, lax.cond(sums.raw, raw_form, centred_form, (dy, x, mix_mean, r1)), bias_bar


def backward_sums(
    dy: Array, x: Array, sums: Sums, mix_mean: Array, compute_dtype: Any
) -> tuple[Array, Array, Array]:
    """:func:`switchnorm._passes.backward_sums`; on the CPU ``dy x`` after raw sums, every read apart."""
    cpu = functools.partial(_cpu_backward_sums, compute_dtype=compute_dtype)
    plain = functools.partial(_passes.backward_sums, compute_dtype=compute_dtype)
    return _steered("raw_sums", cpu, plain, dy, x, sums, mix_mean)


def _cpu_dx_pass(dy, x, sums, a, g1, g2, keep, compute_dtype):
    g1, g2 = g1 * sums.unit, 2.0 * g2 * sums.unit * sums.unit
    a, g1, g2 = _boundary((a, g1, g2), cell_size(x))
    centred = _read(x, compute_dtype, "x_dx") - per_cell(sums.shift)
    through_sums = per_cell(g1) + per_cell(g2) * centred
    if keep is not None:
        through_sums = jnp.where(keep, through_sums, 0.0)
    dx = per_cell(a) * _read(dy, compute_dtype, "dy_dx") + through_sums
    return dx.reshape(x.shape).astype(x.dtype)


def dx_pass(
    dy: Array, x: Array, sums: Sums, a: Array, g1: Array, g2: Array, keep: Array | None, compute_dtype: Any
) -> Array:
    """:func:`switchnorm._passes.dx_pass`; on the CPU behind the boundary, x and dy converted apart."""
    cpu = functools.partial(_cpu_dx_pass, compute_dtype=compute_dtype)
    plain = functools.partial(_passes.dx_pass, compute_dtype=compute_dtype)
    return _steered("boundary", cpu, plain, dy, x, sums, a, g1, g2, keep)


# -- (N, C) input ---------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _taken(direct: Callable, fallback: Callable, choice: Array, operands: Any) -> Any:
    """``lax.cond(choice, direct, fallback, operands)``, differentiated through the branch taken only.

    Autodiff of a ``lax.cond`` keeps the residuals of both branches, zeros for the one not
    taken: arrays of x's size written on every step. This saves the operands alone and, in the
    backward pass, differentiates the branch taken (recomputing its forward).
    """
    return lax.cond(choice, direct, fallback, operands)


def _taken_forward(direct, fallback, choice, operands):
    return lax.cond(choice, direct, fallback, operands), (choice, operands)


def _taken_backward(direct, fallback, residuals, cotangent):
    choice, operands = residuals

    def vjp_of(branch: Callable) -> Callable:
        return lambda operands: jax.vjp(branch, operands)[1](cotangent)[0]

    return None, lax.cond(choice, vjp_of(direct), vjp_of(fallback), operands)


_taken.defvjp(_taken_forward, _taken_backward)


def dense(
    absolute: Callable[[], list], normalized: Callable, relative: Callable, operands: Any, of_x: list[bool]
) -> Any:
    """(N, C) input's ``(y, batch_stats)``: ``normalized(absolute(), operands)`` (every scope in absolute
    terms, from reductions of x itself) where each scope is within the bound, else
    ``relative(operands)``; off the CPU ``relative(operands)`` at once.

    ``absolute()`` gives each normalizer's :class:`switchnorm._stats.Stats`, small next to x, before
    the choice; ``of_x`` says which of them come from x (bn's running averages do not). The branch
    taken alone is differentiated (:func:`_taken`).
    """

    def cpu(operands: Any) -> Any:
        stats = absolute()
        checked = [s for s, x_ in zip(stats, of_x, strict=True) if x_]
        mean = jnp.concatenate([jnp.ravel(s.mean) for s in checked])  # one check of every scope
        var = jnp.concatenate([jnp.ravel(s.var) for s in checked])
        bound = RAW_SUMS_BOUND - 1.0  # mean^2 <= 15 var: s2 <= 16 (s2 - s1^2 / m), as for cells
        fails = (mean * mean > bound * var) | jnp.logical_not(jnp.isfinite(var))
        kept = jnp.sum(fails.astype(var.dtype)) == 0.0
        return _taken(lambda ops: normalized(*ops), lambda ops: relative(ops[1]), kept, (stats, operands))

    if not any(of_x):  # nothing taken from x (bn alone, in inference): nothing to choose
        return relative(operands)
    return _steered("raw_sums", cpu, relative, operands)
