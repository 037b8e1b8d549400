"""Each normalizer's mean and variance, and their blend: docs/design.md, sections 1 to 5.

x, of shape (N, *spatial, C), is a grid of *cells*: cell (n, c) holds the m =
prod(spatial) values x[n, :, c]. One pass over x sums every cell
(:mod:`switchnorm._passes`); every normalizer's statistics are then merges of
whole cells, computed here on (N, C) arrays:

| normalizer | cells merged                    | one mean and variance per |
|------------|---------------------------------|---------------------------|
| bn         | every sample of a channel       | channel                   |
| in         | the cell alone                  | sample and channel        |
| ln         | every channel of a sample       | sample                    |
| gn         | the channels of a group         | sample and group          |

Important details:

* Every mean is kept relative to its cell's own shift K (the cell's first
  element, from the pass over x), never as an absolute number, until the
  normalize pass subtracts it from ``x - K``: float32 keeps its digits when
  |mean| >> std ("One pass: shifted sums per cell").
* Cells are merged through the scope's first two moments about a common
  frame, the mean of the scope's first cell, never about 0 (that is
  ``E[x^2] - E[x]^2``, which loses every digit when |mean| >> std), the
  squares in units of a power of two near the frame, so that none overflows
  ("Merging cells: moments about the first cell's mean").
* With a call-time mask each cell counts its masked-in elements, and merges
  weigh cells by those counts ("Masks").
* Only bn crosses samples, so only bn takes ``axis_name``: one collective for
  the frame (two under a mask, which averages the frames of the devices holding
  masked-in elements) and one for both moments, stacked ("Across devices").
* Variances are biased (population) variances, as in Flax's own layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def power_of_two_scale(v: Array) -> tuple[Array, Array]:
    """``(u, 1 / u)``: u = 2^-e with 2^e <= max(|v|, 1) < 2^(e + 1), elementwise.

    ``(x - v) * u`` is then at most about |x - v| / |v| for |v| >= 1 and
    unchanged for smaller ``v``. Both factors are exact powers of two, built
    from |v|'s exponent bits (capped at 2^(maxexp / 2 - 1), 2^63 in float32,
    so that u^2 stays a normal number): scaling by them changes no digit.
    No gradient flows through them.
    """
    info = jnp.finfo(v.dtype)
    bits = jnp.dtype(f"uint{info.bits}")
    magnitude = jnp.clip(jnp.abs(lax.stop_gradient(v)), 1.0, 2.0 ** (info.maxexp // 2 - 1))
    exponent_bits = lax.bitcast_convert_type(magnitude, bits) & (((1 << info.nexp) - 1) << info.nmant)
    one_bits = (info.maxexp - 1) << info.nmant  # the bits of 1.0; 2^-e has exponent 2 * bias - (e + bias)
    unit_bits = jnp.asarray(2 * one_bits, bits) - exponent_bits
    return lax.bitcast_convert_type(unit_bits, v.dtype), lax.bitcast_convert_type(exponent_bits, v.dtype)


class Cells(NamedTuple):
    """The mean and variance of every (sample n, channel c) cell of x.

    Attributes:
      shift: (N, C) each cell's shift K, taken from x itself; every mean is relative to it.
        None for cells in absolute terms (their means are then the means themselves).
      mean: (N, C) the cell's mean minus K.
      var: the cell's biased variance, broadcastable to (N, C), in the dtype the statistics
        are computed in (float32 or wider).
      size: the elements of each cell: the int m, or with a mask the (N, C) counts of
        masked-in elements (a cell with none has mean 0 and variance 0, and no weight).
    """

    shift: Array | None
    mean: Array
    var: Array
    size: Array | int


def shape_of(cells: Cells) -> tuple[int, ...]:
    """The cells' (N, C): the shape their shift and mean broadcast to."""
    return jnp.broadcast_shapes(jnp.shape(cells.mean), () if cells.shift is None else jnp.shape(cells.shift))


def _at_least_one(count: Array | int) -> Array | int:
    return count if isinstance(count, int) else jnp.maximum(count, 1)


def cell_stats(shift: Array, inverse_unit: Array, s1: Array, s2: Array, count: Array | int) -> Cells:
    """Cells from the pass's sums ``s1 = sum (x - K) u`` and ``s2 = sum ((x - K) u)^2``.

    ``mean = s1 / m``, ``var = max(s2 - s1 * mean, 0) / m``, both in units of
    ``u`` (1 on the raw path), then unscaled by ``1 / u`` and ``1 / u^2``.
    """
    m = _at_least_one(count)
    mean = s1 / m
    var = jnp.maximum(s2 - s1 * mean, 0.0) / m
    return Cells(shift, mean * inverse_unit, var * inverse_unit * inverse_unit, count)


class Stats(NamedTuple):
    """One normalizer's statistics, each of its scopes' shape (broadcastable to the cells' (N, C)).

    Attributes:
      frame: the point the mean is taken about: the scope's first cell's mean, a cell's
        shift for in, 0 for statistics in absolute terms.
      mean: the scope's mean minus ``frame``.
      var: the scope's biased variance.
    """

    frame: Array
    mean: Array
    var: Array


def relative(stats: Stats, shift: Array | None) -> Array:
    """The mean relative to each cell's shift, ``(frame - K) + mean``: no large number cancels."""
    return stats.frame + stats.mean if shift is None else (stats.frame - shift) + stats.mean


def _first_cell_mean(cells: Cells, axis: int) -> Array:
    """The frame of a merge: the mean of the scope's first cell (with counts, its first non-empty one)."""
    assert cells.shift is not None  # absolute cells are merged about 0
    means = cells.shift + cells.mean
    if isinstance(cells.size, int):
        return lax.slice_in_dim(means, 0, 1, axis=axis)
    first = jnp.argmax(cells.size > 0, axis=axis, keepdims=True)  # 0 where every cell is empty
    return jnp.take_along_axis(means, first, axis=axis)


def stacked_means(values: Array, count: Array | int, axis: int, collective: Any = None) -> Array:
    """The means along cell ``axis`` of arrays stacked on ``values``' leading axis, cells weighed by ``count``.

    One reduction for all of them (with counts, of the counts too), one collective across
    devices; the result keeps ``axis`` with length 1.
    """
    if isinstance(count, int):  # cells of equal size
        means = jnp.mean(values, axis + 1, keepdims=True)
        return means if collective is None else collective(means)
    weight = jnp.broadcast_to(count, values.shape[1:]).astype(values.dtype)
    sums = jnp.sum(jnp.concatenate([weight[None], weight * values]), axis + 1, keepdims=True)
    total, weighted = jnp.split(sums if collective is None else collective(sums), [1])
    return weighted / jnp.maximum(total, 1.0)


def moments(
    terms: Callable[..., tuple[Array, Array]],
    operands: tuple,
    count: Array | int,
    axis: int,
    collective: Any = None,
) -> tuple[Array, Array]:
    """The means along ``axis`` of both ``terms(*operands)``, from one reduction (:func:`stacked_means`).

    The default ``means`` of :func:`merge`.
    """
    means = stacked_means(jnp.stack(jnp.broadcast_arrays(*terms(*operands))), count, axis, collective)
    return means[0], means[1]


def _moment_terms(shift: Any, mean: Array, var: Array, ref: Any, unit: Any) -> tuple[Array, Array]:
    """``(e, var u^2 + e^2)`` of every cell, ``e = (K - r + mean) u`` its mean about r in units 1 / u."""
    if shift is None:  # absolute cells, merged about 0
        wide = mean.astype(var.dtype)
        return wide, var + wide * wide
    e = ((shift - ref) + mean) * unit
    return e, var * unit * unit + e * e


def merge(
    cells: Cells, axis: int, axis_name: Any = None, axis_index_groups: Any = None, means: Callable = moments
) -> Stats:
    """The statistics of the scopes that merge ``cells`` along ``axis`` (and ``axis_name``).

    With r the frame, the mean of the scope's first cell (agreed across devices), u a
    power of two near 1 / |r|, ``e_j = (mean_j - r) u`` each cell's mean about r and cells
    weighed by their counts n_j, the scope's first two moments about r::

        mean = sum_j n_j e_j / sum_j n_j / u                                   (about r)
        var  = (sum_j n_j (var_j u^2 + e_j^2) / sum_j n_j - (mean u)^2) / u^2

    the sum-of-squares identity, both moments from one reduction. Its rounding error,
    relative to the variance, is about ``eps (1 + (mean - r)^2 / var)``: a few units of
    rounding where r lies within a few standard deviations of the scope's mean, at worst
    ``eps`` times the number of cells (no cell's mean lies further from the scope's than
    that allows). Every ``e_j`` is formed from nearby numbers, ``(K_j - r) + mean_j``, and
    scaled by u, so that no square overflows. Cells in absolute terms (``shift`` None, every
    scope's mean within a few standard deviations of 0) are merged about 0. Across devices
    the moments are averaged (``pmean``: equal local batches, as Flax assumes), or with
    counts summed. ``means`` takes the two moments' means (:func:`moments`; a compiler's
    seam may take them otherwise, :func:`switchnorm._xla_cpu.scope_moments`).
    """
    collective = None
    if axis_name is not None:
        reduce = lax.pmean if isinstance(cells.size, int) else lax.psum
        collective = functools.partial(reduce, axis_name=axis_name, axis_index_groups=axis_index_groups)
    if cells.shift is None:
        mean, square = means(
            _moment_terms, (None, cells.mean, cells.var, None, None), cells.size, axis, collective
        )
        return Stats(jnp.zeros_like(mean), mean, jnp.maximum(square - mean * mean, 0.0))
    ref = lax.stop_gradient(_first_cell_mean(cells, axis))  # any frame gives the same statistics
    if collective is not None and isinstance(cells.size, int):
        ref = collective(ref)
    elif collective is not None:  # the average frame of the devices that hold a masked-in element
        holds = jnp.max(jnp.asarray(cells.size > 0).astype(ref.dtype), axis=axis, keepdims=True)
        ref = collective(ref * holds) / jnp.maximum(collective(holds), 1.0)
    unit, inverse_unit = power_of_two_scale(ref)
    operands = (cells.shift, cells.mean, cells.var, ref, unit)
    mean, square = means(_moment_terms, operands, cells.size, axis, collective)
    var = jnp.maximum(square - mean * mean, 0.0) * inverse_unit * inverse_unit
    return Stats(ref, mean * inverse_unit, var)


def _grouped(cells: Cells, groups: int) -> Cells:
    """The cells with the channel axis split into (groups, channels per group)."""
    n, c = shape_of(cells)

    def split(a: Any) -> Any:
        if a is None or isinstance(a, int):
            return a
        return jnp.broadcast_to(a, (n, c)).reshape(n, groups, c // groups)

    return Cells(*(split(a) for a in cells))


def normalizer_stats(
    name: str,
    cells: Cells,
    num_groups: int = 1,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    means: Callable = moments,
) -> Stats:
    """The statistics of normalizer ``name`` ("bn", "in", "ln" or "gn") on the cells.

    bn merges every sample of a channel (and, with ``axis_name``, every
    device's); in is each cell alone; ln merges every channel of a sample; gn
    merges the channels of each of ``num_groups`` groups of consecutive channels.
    """
    if name == "bn":
        return merge(cells, 0, axis_name, axis_index_groups, means)
    if name == "in":
        shape = shape_of(cells)
        frame = (
            jnp.zeros(shape, cells.mean.dtype)
            if cells.shift is None
            else jnp.broadcast_to(cells.shift, shape)
        )
        return Stats(frame, jnp.broadcast_to(cells.mean, shape), jnp.broadcast_to(cells.var, shape))
    if name == "ln":
        return merge(cells, 1, means=means)
    if name == "gn":
        grouped = merge(_grouped(cells, num_groups), 2, means=means)
        n, c = shape_of(cells)
        return Stats(*(jnp.broadcast_to(a, (n, num_groups, c // num_groups)).reshape(n, c) for a in grouped))
    raise ValueError(f"unknown normalizer {name!r}; choose from ('bn', 'in', 'ln', 'gn').")


def running_stats(running_mean: Array, running_var: Array, dtype: Any) -> Stats:
    """bn's statistics in inference: the running averages, (1, C), in absolute terms."""
    mean = running_mean.astype(dtype)[None, :]
    return Stats(jnp.zeros_like(mean), mean, running_var.astype(dtype)[None, :])


def blend(
    stats: Sequence[Stats], shift: Array | None, mean_weights: Sequence[Array], var_weights: Sequence[Array]
) -> tuple[Array, Array]:
    """``mix_mean = sum_k w_k mean_k`` (relative to each cell's shift) and ``mix_var = sum_k v_k var_k``."""
    terms = zip(mean_weights, var_weights, stats, strict=True)
    means, variances = zip(*[(w * relative(s, shift), v * s.var) for w, v, s in terms], strict=True)
    return functools.reduce(jnp.add, means), functools.reduce(jnp.add, variances)


class BatchStats(NamedTuple):
    """The bn scope's batch mean and variance per channel (absolute values), for the running averages.

    What :func:`switchnorm.switch_norm` returns beside its output in training mode.

    Example::

      >>> import jax.numpy as jnp
      >>> import switchnorm
      >>> x = jnp.arange(12.0).reshape(3, 4)  # (N, C): the bn scope is each channel over the batch
      >>> _, stats = switchnorm.switch_norm(x, jnp.zeros(2), jnp.zeros(2), normalizers=("bn", "ln"))
      >>> stats.mean.tolist(), stats.var.tolist()
      ([4.0, 5.0, 6.0, 7.0], [10.666..., 10.666..., 10.666..., 10.666...])
    """

    mean: Array
    var: Array


def batch_stats(bn: Stats) -> BatchStats:
    """bn's absolute batch mean and variance per channel, from its (1, C) statistics.

    Across devices the frame and the mean are agreed already, so every device computes the
    same bits, typed as replicated.
    """
    return BatchStats((bn.frame + bn.mean)[0], bn.var[0])


def update_running_average(running: Array, batch: Array, momentum: float) -> Array:
    """Flax's rule, ``momentum * running + (1 - momentum) * batch``; a NaN batch makes it NaN, as in Flax."""
    return momentum * running + (1.0 - momentum) * batch.astype(running.dtype)
