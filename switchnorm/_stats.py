"""The statistics of every normalizer, from per-cell shifted sums, on (N, C) arrays.

A *cell* is one (sample n, channel c) pair: its m = prod(spatial) elements.
bn, in, ln and gn each merge cells (docs/design.md, "The four normalizers'
statistics"), so one pass over x that sums every cell (:mod:`switchnorm._passes`)
gives all four.

Important details:

* Cell sums are of ``(x - K) * u``: K is the cell's first element, so the sums
  keep their digits when |mean| >> std ("One pass: shifted sums per cell"),
  and ``u`` is a power of two near 1 / max(|K|, 1) (1 on the raw-sum path,
  where K = 0), so that the squares stay finite for data of any
  magnitude the variance can be stored in ("Numerics: dtypes, range, empty
  input"). Powers of two scale exactly: the statistics are the unscaled
  ones, bit for bit, wherever those are finite.
* Cells are merged through the scope's first two moments about a common
  frame, the mean of the scope's first cell, never about 0 (that is
  ``E[x^2] - E[x]^2``, which loses every digit when |mean| >> std): one
  reduction per scope, the squares in units of the frame's power of two
  ("Merging cells: moments about the first cell's mean").
* Only bn crosses samples, so only bn takes ``axis_name``: one ``pmean`` of
  the common frame and one of the two moments ("Across devices").
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._arguments import NORMALIZERS

Array = jax.Array


def unstack(v: Array, axis: int = 0) -> list[Array]:
    """The slices of ``v`` along ``axis``, taken by one ``split``.

    Reverse mode transposes a split into one concatenate; indexing (``v[0]``,
    or unpacking an array) transposes into a pad per slice, each a kernel of
    its own on XLA:CPU.
    """
    return [jnp.squeeze(part, axis) for part in jnp.split(v, v.shape[axis], axis)]


def power_of_two_scale(v: Array) -> tuple[Array, Array]:
    """``(u, 1 / u)``: u = 2^-e with 2^e <= max(|v|, 1) < 2^(e + 1), elementwise.

    ``(x - v) * u`` is then at most about |x - v| / |v| for |v| >= 1 and
    unchanged for smaller ``v``; both factors are exact powers of two. 2^e is
    |v|'s exponent bits alone (integer operations only, so XLA fuses them
    anywhere for free), capped at 2^(maxexp / 2 - 1) (2^63 in
    float32) so that u^2 stays a normal number. No gradient flows through them.
    """
    info = jnp.finfo(v.dtype)
    bits = jnp.dtype(f"uint{info.bits}")
    magnitude = jnp.clip(jnp.abs(lax.stop_gradient(v)), 1.0, 2.0 ** (info.maxexp // 2 - 1))
    exponent_bits = lax.bitcast_convert_type(magnitude, bits) & (((1 << info.nexp) - 1) << info.nmant)
    # 2^-e has the biased exponent 2 * bias - (e + bias): an integer subtraction,
    # which XLA copies into every consumer, where a division is a kernel of its own.
    one_bits = (info.maxexp - 1) << info.nmant  # the bits of 1.0
    unit_bits = jnp.asarray(2 * one_bits, bits) - exponent_bits
    return lax.bitcast_convert_type(unit_bits, v.dtype), lax.bitcast_convert_type(exponent_bits, v.dtype)


def _unscale_square(v: Array, inverse_unit: Array) -> Array:
    """``v / u^2`` as two exact multiplications (``1 / u^2`` alone can overflow)."""
    return v * inverse_unit * inverse_unit


class CellStats(NamedTuple):
    """Mean and variance of every (sample n, channel c) cell of x.

    Attributes:
      shift: (N, C) reference value K_nc taken from x itself (its first
        spatial position); every mean below is relative to it.
      mean: (N, C) cell mean minus ``shift``.
      var: (N, C) biased cell variance.
      kept: (N, C) number of masked-in elements of each cell, with a call-time
        ``mask``; ``None`` when every cell holds all its elements (the merges
        then weigh cells equally).
    """

    shift: Array
    mean: Array
    var: Array
    kept: Array | None = None


def safe_count(count: Array | int) -> Array | int:
    """``count``, with 1 where it is 0: an empty cell's sums are 0, so its mean and variance are 0."""
    return count if isinstance(count, int) else jnp.maximum(count, 1)


def cell_stats(shift: Array, inverse_unit: Array, s1: Array, s2: Array, count: Array | int) -> CellStats:
    """Cell mean and variance from ``s1 = sum_s (x - K) u`` and ``s2 = sum_s ((x - K) u)^2``.

    ``u`` is 1 or the :func:`power_of_two_scale` of K; the variance is
    ``max(s2 - s1^2 / m, 0) / m`` in those units, then ``/ u^2``. ``count`` is
    m, the elements per cell, or, with a mask, the (N, C) array of each cell's
    masked-in elements; a cell with none gets mean 0 (its shift) and variance 0,
    and weight 0 in every merge.
    """
    m = safe_count(count)
    mean = s1 / m
    m2 = jnp.maximum(s2 - s1 * mean, 0.0)
    cell_count = None if isinstance(count, int) else count
    return CellStats(shift, mean * inverse_unit, _unscale_square(m2 / m, inverse_unit), cell_count)


class ScopeStats(NamedTuple):
    """One normalizer's statistics, broadcast to the (N, C) cells.

    ``mean`` is relative to each cell's own shift, so ``CellStats.shift + mean``
    is the normalizer's mean for that cell; ``var`` is the biased variance.
    """

    mean: Array
    var: Array


def _moment_terms(shift: Array, mean: Array, var: Array, ref: Array) -> tuple[Array, Array]:
    """``(1 / u, terms)``: each cell's mean ``e`` and mean square ``var + e^2`` about ``ref``, stacked.

    Both in units u of ``ref``'s power of two (squares in u^2), so that they do
    not overflow; a scope's moments are their (weighted) means over its cells.
    """
    unit, inverse_unit = power_of_two_scale(ref)
    in_frame = (mean + (shift - ref)) * unit  # the cell means about ref
    return inverse_unit, jnp.stack([in_frame, var * unit * unit + in_frame * in_frame])


def _from_moments(
    ref: Array, shift: Array, moments: Array, inverse_unit: Array, shape: tuple[int, ...]
) -> ScopeStats:
    """A scope's statistics from its first two moments about ``ref`` in units u (``moments[0]``, ``[1]``).

    ``var = E[d^2] - E[d]^2`` (clamped at 0 against rounding), unscaled by
    ``1 / u^2``; the mean is handed back relative to each cell's own shift.
    """
    scaled_mean, scaled_square = unstack(moments)
    scope_var = _unscale_square(jnp.maximum(scaled_square - scaled_mean * scaled_mean, 0.0), inverse_unit)
    scope_mean = scaled_mean * inverse_unit + (ref - shift)
    return ScopeStats(mean=scope_mean, var=jnp.broadcast_to(scope_var, shape))


def _combine(cells: CellStats, axis: int, axis_name: Any = None, axis_index_groups: Any = None) -> ScopeStats:
    """Merges the cells along ``axis``: the scope's moments about its first cell's mean, in one reduction.

    The cells' means are moved to a common frame r, the mean of the scope's
    first cell (agreed across devices with a ``pmean`` when ``axis_name`` is
    given), and, with ``e`` a cell's mean in that frame and ``var`` its
    variance, for cells of equal size

        scope mean = mean(e)              (relative to r)
        scope var  = mean(var + e^2) - mean(e)^2

    both means from one reduction of the stacked ``(e, var + e^2)``: the
    sum-of-squares identity about r (docs/design.md, "Merging cells: moments
    about the first cell's mean"). Its rounding error, relative to the scope
    variance, is about ``u (1 + (mean - r)^2 / var)``: a few units of rounding
    where r is within a few standard deviations of the scope mean, and at
    worst ``u`` times the number of cells merged, since no cell's mean lies
    further from the scope mean than that allows. The squares are taken in
    units of r's power of two, so they do not overflow. Cells with masked
    counts are merged by :func:`_combine_counted` instead. Returns the scope
    mean relative to each cell's own shift and the scope variance, both
    broadcast back to the cells' shape.
    """
    if cells.kept is not None:
        return _combine_counted(cells, axis, axis_name, axis_index_groups)
    shift, mean, var, _ = cells
    first = functools.partial(lax.slice_in_dim, start_index=0, limit_index=1, axis=axis)
    ref = lax.stop_gradient(first(shift) + first(mean))  # any frame gives the same statistics
    if axis_name is not None:
        ref = lax.pmean(ref, axis_name, axis_index_groups=axis_index_groups)
    inverse_unit, terms = _moment_terms(shift, mean, var, ref)
    # One reduction for both moments: each reduction is a kernel of its own on a CPU.
    moments = jnp.mean(terms, axis + 1, keepdims=True)
    if axis_name is not None:  # equal local batches, as flax.linen.BatchNorm assumes
        moments = lax.pmean(moments, axis_name, axis_index_groups=axis_index_groups)
    return _from_moments(ref, shift, moments, inverse_unit, mean.shape)


def _combine_counted(
    cells: CellStats, axis: int, axis_name: Any = None, axis_index_groups: Any = None
) -> ScopeStats:
    """:func:`_combine` for cells of unequal sizes ``cells.kept`` (a call-time mask).

    Each cell weighs as many as its masked-in elements n_i::

        scope mean = sum(n_i e_i) / sum(n_i)
        scope var  = sum(n_i (var_i + e_i^2)) / sum(n_i) - scope mean^2

    so the scope's statistics are those of its masked-in elements alone. The
    frame r is the mean of the scope's first non-empty cell, and with
    ``axis_name`` every sum is a ``psum`` (r the mean of the devices' frames
    where they hold a masked-in element): the statistics of the masked-in
    elements of the whole batch, however they fall on the devices. A scope
    with no masked-in element gets mean 0 (relative to the frame) and variance 0.
    """
    shift, mean, var, count = cells
    assert count is not None  # the masked-in elements per cell
    psum = functools.partial(lax.psum, axis_name=axis_name, axis_index_groups=axis_index_groups)
    filled = (count > 0).astype(shift.dtype)
    first = jnp.argmax(filled, axis=axis, keepdims=True)  # 0 where every cell is empty
    ref = lax.stop_gradient(jnp.take_along_axis(shift + mean, first, axis=axis))
    if axis_name is not None:  # the frame of the devices that hold a masked-in element
        holds = jnp.max(filled, axis=axis, keepdims=True)
        ref = psum(ref * holds) / jnp.maximum(psum(holds), 1.0)
    inverse_unit, terms = _moment_terms(shift, mean, var, ref)
    # The count and both weighted moments in one reduction (one psum across devices).
    sums = jnp.sum(jnp.concatenate([count[None], count * terms]), axis + 1, keepdims=True)
    if axis_name is not None:
        sums = psum(sums)
    total, weighted = jnp.split(sums, [1])
    return _from_moments(ref, shift, weighted / jnp.maximum(total, 1.0), inverse_unit, mean.shape)


def scope_stats(
    cells: CellStats,
    name: str,
    *,
    num_groups: int = 1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> ScopeStats:
    """The statistics of one normalizer, from the cell statistics.

    | name | taken over                    | one value per       |
    |------|-------------------------------|---------------------|
    | bn   | batch and space               | channel             |
    | in   | space                         | sample, channel     |
    | ln   | space and channels            | sample              |
    | gn   | space and a group of channels | sample, group       |

    Only bn crosses samples, so only bn uses ``axis_name``.
    """
    if name == "in":
        return ScopeStats(mean=cells.mean, var=cells.var)
    if name == "bn":
        return _combine(cells, 0, axis_name, axis_index_groups)
    if name not in ("ln", "gn"):
        raise ValueError(f"unknown normalizer {name!r}; choose from {NORMALIZERS}.")
    groups = 1 if name == "ln" else num_groups
    n, c = cells.mean.shape

    def grouped_channels(a: Array) -> Array:
        return a.reshape(n, groups, c // groups)

    kept = None if cells.kept is None else grouped_channels(cells.kept)
    shift, mean, var = (grouped_channels(a) for a in cells[:3])
    grouped = CellStats(shift, mean, var, kept)
    stats = _combine(grouped, axis=2)
    return ScopeStats(mean=stats.mean.reshape(n, c), var=stats.var.reshape(n, c))


class BatchStats(NamedTuple):
    """The bn scope's batch mean and variance, per channel (absolute values).

    What :func:`switchnorm.switch_norm` returns for the running averages.
    """

    mean: Array
    var: Array


def update_running_average(running: Array, batch: Array, momentum: float) -> Array:
    """Flax's EMA rule: ``momentum * running + (1 - momentum) * batch``.

    A NaN in the batch makes the running average NaN for good, as in Flax
    (docs/design.md, "Running averages and inference").
    """
    return momentum * running + (1.0 - momentum) * batch.astype(running.dtype)
