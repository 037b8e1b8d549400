"""The passes over x, as the math has them (docs/design.md, sections 2, 4 and 6).

x is viewed as cells: (N, *spatial, C) -> (N, m, C). The layer reads x in

1. the *statistics pass*, per cell with K its first (masked-in) element and u a
   power of two near 1 / max(|K|, 1): ``s1 = sum (x - K) u``, ``s2 = sum ((x - K) u)^2``;
2. the *normalize pass*: ``y = ((x - K) - mix_mean) * a + bias``, with ``mix_mean``
   (relative to K) and ``a = scale / sqrt(mix_var + epsilon)`` from the (N, C) graph;

and, differentiated by the custom VJP of :mod:`switchnorm._core`, in

3. the *backward reduction pass*: ``r1 = sum dy``, ``r2 = sum dy ((x - K) - mix_mean)``,
   the cotangents of ``mix_mean`` (``-a r1``) and of ``a`` (``r2``);
4. the *dx pass*: ``dx = a dy + u g1 + 2 u^2 g2 (x - K)``, with ``g1``, ``g2`` the
   cotangents of ``s1``, ``s2`` from the graph's VJP.

Important details:

* K keeps the sums' digits when |mean| >> std; u keeps the squares finite for
  data of any magnitude whose variance float32 can hold. Both are exact
  constants for differentiation: the statistics do not depend on them.
* With a mask the sums and counts read only the masked-in elements; every
  element is normalized, so r1 and r2 still read all, and dx's terms through
  the sums are zero where the mask left x out (design.md, "Masks").
* Reductions and the normalize step run in ``compute_dtype`` (float32 for
  half-precision x, float64 for float64).
* These are the forms every platform but the CPU compiles as they stand;
  :mod:`switchnorm._xla_cpu` holds the forms XLA:CPU needs, with the same values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._stats import power_of_two_scale

Array = jax.Array


class Sums(NamedTuple):
    """The statistics pass's result: every array (N, C).

    ``raw`` is a traced bool: True where the sums were taken with K = 0 and u = 1
    (only XLA:CPU does, :func:`switchnorm._xla_cpu.statistics_pass`); the
    backward pass may then read x itself.
    """

    shift: Array
    unit: Array
    inverse_unit: Array
    s1: Array
    s2: Array
    raw: Array


def cells_of(x: Array) -> Array:
    """(N, *S, C) -> (N, m, C), m = prod(S) (1 for rank 2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_cell(v: Array) -> Array:
    """(N, C) -> (N, 1, C), to broadcast over the cells' positions."""
    return v[:, None, :]


def cell_size(x: Array) -> int:
    """m, the elements of one cell."""
    return x.size // (x.shape[0] * x.shape[-1])


def mask_cells(mask: Array | None, x: Array) -> Array | None:
    """A mask of x's rank (:func:`switchnorm._arguments.check_mask`) as (N or 1, m, C or 1) cells.

    Its length-1 batch and channel axes stay length 1: a padding mask (N, L, 1) is
    read at 1/C of x's size.
    """
    if mask is None:
        return None
    return cells_of(jnp.broadcast_to(mask, (mask.shape[0], *x.shape[1:-1], mask.shape[-1])))


def counts(keep: Array | None, x: Array, compute_dtype: Any) -> Array | int:
    """Elements per cell: the int m, or with a mask the (N, C) counts of masked-in elements."""
    if keep is None:
        return cell_size(x)
    kept = jnp.sum(keep, axis=1, dtype=jnp.int32).astype(compute_dtype)  # exact beyond 2^24 elements
    return jnp.broadcast_to(kept, (x.shape[0], x.shape[-1]))


def first_kept(cells: Array, keep: Array | None) -> Array:
    """K: each cell's first element, or with a mask its first masked-in one (0 for an empty cell)."""
    if keep is None:
        return cells[:, 0, :]
    first = jnp.broadcast_to(jnp.argmax(keep, axis=1)[:, None, :], (cells.shape[0], 1, cells.shape[2]))
    found = jnp.take_along_axis(cells, first, axis=1)[:, 0, :]
    return jnp.where(jnp.any(keep, axis=1), found, jnp.zeros((), cells.dtype))


def shift_of(x: Array, keep: Array | None, compute_dtype: Any) -> tuple[Array, Array, Array]:
    """``(K, u, 1 / u)`` of every cell: K from x in its own dtype (exact in the compute dtype)."""
    shift = lax.stop_gradient(first_kept(cells_of(x), keep).astype(compute_dtype))
    return (shift, *power_of_two_scale(shift))


def statistics_pass(x: Array, keep: Array | None, compute_dtype: Any) -> Sums:
    """The statistics pass: every cell's sums of ``(x - K) u`` and its square (masked-in elements only).

    With one element per cell (m = 1) K is x itself and both sums are exactly zero.
    """
    shift, unit, inverse_unit = shift_of(x, keep, compute_dtype)
    raw = jnp.zeros_like(shift[0, 0], dtype=bool)  # typed as shift is (varying over shard_map axes)
    if cell_size(x) == 1:
        zeros = jnp.zeros_like(shift)
        return Sums(shift, unit, inverse_unit, zeros, zeros, raw)
    d = (cells_of(x).astype(compute_dtype) - per_cell(shift)) * per_cell(unit)
    if keep is not None:
        d = jnp.where(keep, d, 0.0)
    return Sums(shift, unit, inverse_unit, jnp.sum(d, axis=1), jnp.sum(d * d, axis=1), raw)


def normalize_pass(
    x: Array, shift: Array, mix_mean: Array, a: Array, bias: Array | None, compute_dtype: Any, out_dtype: Any
) -> Array:
    """``y = ((x - K) - mix_mean) * a + bias``: the mean removed in K's frame, never folded into ``x a + b``."""
    y = (cells_of(x).astype(compute_dtype) - per_cell(shift) - per_cell(mix_mean)) * per_cell(a)
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y.reshape(x.shape).astype(out_dtype)


def backward_sums(
    dy: Array, x: Array, sums: Sums, mix_mean: Array, compute_dtype: Any
) -> tuple[Array, Array, Array]:
    """The backward reduction pass: ``(r1, r2, d bias)``, r1 and r2 per cell, d bias per channel."""
    dy = cells_of(dy).astype(compute_dtype)
    centred = cells_of(x).astype(compute_dtype) - per_cell(sums.shift) - per_cell(mix_mean)
    r1 = jnp.sum(dy, axis=1)
    return r1, jnp.sum(dy * centred, axis=1), jnp.sum(r1, axis=0)


def dx_pass(
    dy: Array, x: Array, sums: Sums, a: Array, g1: Array, g2: Array, keep: Array | None, compute_dtype: Any
) -> Array:
    """``dx = a dy + u g1 + 2 u^2 g2 (x - K)``, the last two terms only where the sums read x."""
    g1, g2 = g1 * sums.unit, 2.0 * g2 * sums.unit * sums.unit  # (g2 u) u: u^2 alone can underflow
    through_sums = per_cell(g1) + per_cell(g2) * (cells_of(x).astype(compute_dtype) - per_cell(sums.shift))
    if keep is not None:
        through_sums = jnp.where(keep, through_sums, 0.0)
    dx = per_cell(a) * cells_of(dy).astype(compute_dtype) + through_sums
    return dx.reshape(x.shape).astype(x.dtype)
