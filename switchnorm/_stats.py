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
* Cells are merged with the parallel-variance rule (Chan et al.), never with
  ``E[x^2] - E[x]^2``: the cells' means are moved to a common frame, the
  scope's first cell's shift, and the squared deviations are scaled by that
  shift's power of two ("Merging cells: the parallel-variance rule").
* Only bn crosses samples, so only bn takes ``axis_name``: one ``pmean`` of
  the common frame, one of the scope mean and one of the variance
  ("Across devices").
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._arguments import NORMALIZERS

Array = jax.Array


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


def _combine(cells: CellStats, axis: int, axis_name: Any = None, axis_index_groups: Any = None) -> ScopeStats:
    """Merges the cells along ``axis`` with the parallel-variance rule (Chan et al.).

    Cell means are first moved to a common frame, the shift ``ref`` of the
    scope's first cell (agreed across devices with a ``pmean`` when
    ``axis_name`` is given), so that, for cells of equal size,

        scope mean = mean of the cell means
        scope var  = mean(cell var + (cell mean - scope mean)^2)

    stays accurate however large the data's mean is; the second line is taken
    in units of ``ref``'s power of two, so its squares do not overflow. Cells
    with masked counts are merged by :func:`_combine_counted` instead.
    Returns the scope mean relative to each cell's own shift and the scope
    variance, both broadcast back to the cells' shape.
    """
    if cells.kept is not None:
        return _combine_counted(cells, axis, axis_name, axis_index_groups)
    shift, mean, var, _ = cells
    pmean = functools.partial(lax.pmean, axis_name=axis_name, axis_index_groups=axis_index_groups)
    ref = lax.slice_in_dim(shift, 0, 1, axis=axis)
    if axis_name is not None:
        ref = pmean(ref)
    in_frame = mean + (shift - ref)  # cell means in the scope's common frame
    scope_mean = jnp.mean(in_frame, axis=axis, keepdims=True)
    if axis_name is not None:
        scope_mean = pmean(scope_mean)
    unit, inverse_unit = power_of_two_scale(ref)
    deviation = (in_frame - scope_mean) * unit
    # One reduction for both terms: each is a separate small kernel otherwise.
    scaled = jnp.sum(var * unit * unit + deviation * deviation, axis=axis, keepdims=True)
    scope_var = _unscale_square(scaled / mean.shape[axis], inverse_unit)
    if axis_name is not None:  # equal local batches, as flax.linen.BatchNorm assumes
        scope_var = pmean(scope_var)
    return ScopeStats(mean=scope_mean + (ref - shift), var=jnp.broadcast_to(scope_var, mean.shape))


def _combine_counted(
    cells: CellStats, axis: int, axis_name: Any = None, axis_index_groups: Any = None
) -> ScopeStats:
    """:func:`_combine` for cells of unequal sizes ``cells.kept`` (a call-time mask).

    Each cell weighs as many as its masked-in elements::

        scope mean = sum(n_i mean_i) / sum(n_i)
        scope var  = sum(n_i (var_i + (mean_i - scope mean)^2)) / sum(n_i)

    so the scope's statistics are those of its masked-in elements alone. The
    common frame is the shift of the scope's first non-empty cell, and with
    ``axis_name`` every sum is a ``psum``: the statistics of the masked-in
    elements of the whole batch, however they fall on the devices. A scope
    with no masked-in element gets mean 0 (relative to the frame) and variance 0.
    """
    shift, mean, var, count = cells
    assert count is not None  # the masked-in elements per cell
    psum = functools.partial(lax.psum, axis_name=axis_name, axis_index_groups=axis_index_groups)
    reduce = (
        (lambda v: psum(jnp.sum(v, axis=axis, keepdims=True)))
        if axis_name is not None
        else (lambda v: jnp.sum(v, axis=axis, keepdims=True))
    )
    filled = (count > 0).astype(shift.dtype)
    first = jnp.argmax(filled, axis=axis, keepdims=True)  # 0 where every cell is empty
    ref = jnp.take_along_axis(shift, first, axis=axis)
    if axis_name is not None:  # the frame of the devices that hold a masked-in element
        holds = jnp.max(filled, axis=axis, keepdims=True)
        ref = psum(ref * holds) / jnp.maximum(psum(holds), 1.0)
    in_frame = mean + (shift - ref)
    total = jnp.maximum(reduce(count), 1.0)
    scope_mean = reduce(count * in_frame) / total
    unit, inverse_unit = power_of_two_scale(ref)
    deviation = (in_frame - scope_mean) * unit
    scaled = reduce(count * (var * unit * unit + deviation * deviation))
    scope_var = _unscale_square(scaled / total, inverse_unit)
    return ScopeStats(mean=scope_mean + (ref - shift), var=jnp.broadcast_to(scope_var, mean.shape))


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
