"""The two passes over x, and a custom VJP whose backward pass has the same two passes.

The layer is

1. the *statistics pass*: per (n, c) cell, with K = x[n, first position, c]
   and u a power of two near 1 / max(|K|, 1), the sums ``s1 = sum_s (x - K) u``
   and ``s2 = sum_s ((x - K) u)^2`` (K = 0 and u = 1 where raw sums suffice,
   :func:`shifted_sums`);
2. the *cell graph* (``graph`` below, :func:`switchnorm._cell_graph.cell_graph`):
   everything on (N, C)-sized arrays, from (s1, s2) to the blended mean
   ``mix_mean`` (relative to K) and the factor ``a = scale / sqrt(mix_var + eps)``;
3. the *normalize pass*: ``y = ((x - K) - mix_mean) * a + bias``.

Important details:

* K keeps the sums' digits when |mean| >> std, and u keeps the squares
  finite for data of any magnitude (docs/design.md, "One pass: shifted sums
  per cell" and "Numerics: dtypes, range, empty input"). Both are constants
  for differentiation.
* The backward pass (docs/design.md, "The backward pass"), with
  ``d = x - K`` and a cotangent ``dy``, is one reduction pass,
  ``r1 = sum_s dy`` and ``r2 = sum_s dy * (d - mix_mean)`` (the cotangents of
  ``mix_mean``, ``-a * r1``, and of ``a``, ``r2``); the VJP of the cell graph
  (plain autodiff on (N, C) arrays), which turns them into the cotangents
  ``g1``, ``g2`` of ``s1``, ``s2`` and the parameters'; and one elementwise
  pass, ``dx = a * dy + u * g1 + 2 u^2 * g2 * d``.
* Why a custom VJP: under plain autodiff XLA fuses the whole transposed cell
  graph (broadcasts from per-channel, per-sample and per-group shapes) into
  the final elementwise pass over x and recomputes it for every element; on
  CPU that one fusion cost more than the rest of the backward pass. Here the
  cell graph's cotangents are (N, C) arrays before the last pass starts.
* A call-time mask restricts the statistics pass's sums to the masked-in
  elements (K is then each cell's first masked-in element) and gives the
  cell graph each cell's count of them; the normalize pass and r1, r2 still
  cover every element, and dx's terms through s1, s2 are zero at padding
  (docs/design.md, "Masks").
* Half-precision x and dy are converted to the compute dtype by each kernel
  that reads them (:func:`converted`): a convert shared by two kernels is
  written out by XLA:CPU as a float32 copy of the whole array.
* Reverse mode of any order works (the backward pass is plain JAX); forward
  mode (``jax.jvp``, ``jax.jacfwd``) does not, as for any ``jax.custom_vjp``:
  :func:`normalize_autodiff` is the same layer under plain autodiff for that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._stats import power_of_two_scale, safe_count, unstack

Array = jax.Array

CellGraph = Callable[[Array, Array, Array, Array, Array | int, Any], tuple[Array, Array, Any]]
"""``graph(shift, inverse_unit, s1, s2, count, inputs) -> (mix_mean, a, batch_stats)``; ``count``
is the elements per cell, or under a mask each cell's (N, C) count of masked-in ones."""

MIN_COUNT_FOR_BOUNDARY = 16
"""Cells smaller than this skip :func:`_fusion_boundary`: the cell graph is then
nearly as large as x, recomputing it is cheap and the boundary is not."""


def _to_cells(x: Array) -> Array:
    """(N, *S, C) -> (N, m, C), m = prod(S) (1 for rank 2)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _per_cell(v: Array) -> Array:
    """(N, C) -> (N, 1, C), to broadcast over the cells' positions."""
    return v[:, None, :]


def _count(x: Array) -> int:
    """Elements per (n, c) cell."""
    return x.size // (x.shape[0] * x.shape[-1])


def tracing_for_cpu() -> bool:
    """Whether this trace targets XLA:CPU (``jax.default_backend()``): two workarounds below apply there only.

    :func:`_fusion_boundary` keeps XLA:CPU from recomputing the cell graph per
    element, and :func:`raw_sums_pay_off` tries raw sums first because XLA:CPU's
    reductions take no broadcast operand. On a GPU XLA fuses ``x - K`` into the
    reduction, so the shifted sums cost what raw sums do there, while a
    ``lax.cond`` costs a device-to-host copy of its predicate.
    """
    return jax.default_backend() == "cpu"


def raw_sums_pay_off() -> bool:
    """Whether the statistics pass tries raw sums before shifted ones: on the CPU only (:func:`tracing_for_cpu`).

    The H100 measured this on 2026-11-27 (docs/performance.md): with the raw-sum
    check and its ``lax.cond`` the forward took 1.45-1.52x Flax BatchNorm's on
    the large-spatial shapes at 8x the benchmark batch, against 1.06-1.09x for
    the shifted sums alone the day before.
    """
    return tracing_for_cpu()


def apart(values: Any, site: int) -> Any:
    """``values`` (an array or a tuple of them) unchanged, kept apart from every other ``site``.

    XLA:CPU's reduction fusions read an elementwise producer of x (a convert of
    half-precision x, ``x - K`` with K broadcast from (N, C)) only where no
    other kernel reads that same producer. Where two reductions (``sum x`` and
    ``sum x^2``, ``sum (x - K)`` and ``sum (x - K)^2``), or a reduction and the
    normalize pass, share one, XLA writes it out as an x-sized array for them
    all. Site k puts k optimization barriers between the values and their
    readers: XLA's CSE merges equal barriers but not nestings of different
    depth, so each kernel computes its own producer; a barrier itself
    computes nothing. Applied on the CPU only, where it was measured.
    """
    if tracing_for_cpu():
        for _ in range(site):
            values = lax.optimization_barrier(values)
    return values


def converted(v: Array, compute_dtype: Any, site: int = 0) -> Array:
    """``v.astype(compute_dtype)``, converted :func:`apart` from every other ``site``.

    With bfloat16 x and dy a convert shared by two kernels was a float32 copy of
    the whole array: temporaries of 6 times x's bytes. Only where there is a
    convert to keep apart; float32 x is read by each kernel as it is.
    """
    if v.dtype != jnp.dtype(compute_dtype):
        v = apart(v, site)
    return v.astype(compute_dtype)


# The kernels of one layer that convert half-precision x or dy, each at its own site (:func:`converted`).
X_SUM, X_SQUARES, X_NORMALIZE, X_BACKWARD_SUM, X_DX = range(5)
DY_SUM, DY_X_SUM, DY_BIAS, DY_DX = range(4)


def _widened(v: Array, compute_dtype: Any, site: int = 0) -> Array:
    """``v`` as (N, m, C) cells in ``compute_dtype``, :func:`converted` at ``site``."""
    return _to_cells(converted(v, compute_dtype, site))


def _fusion_boundary(*cells: Array, count: int) -> tuple[Array, ...]:
    """The (N, C) arrays unchanged, computed before the pass over x that reads them.

    An XLA:CPU workaround, applied only when tracing for the CPU backend
    (``jax.default_backend()``), where it was measured: XLA fuses cheap
    elementwise producers into their consumers. For the cell graph that
    means recomputing its whole (N, C)-sized tail, broadcasts from
    per-channel, per-sample and per-group shapes included, once for every
    element of x: on CPU that made the last pass over x 4x slower than
    BatchNorm's. ``lax.optimization_barrier`` is dropped before fusion on CPU;
    a cumulative sum along a new axis of length 2 (``v`` then ``v + 0``, so
    exactly ``v``) is a reduce-window, which XLA does not fuse into a loop.
    ``count`` is the number of elements per cell (see MIN_COUNT_FOR_BOUNDARY).
    The arrays (all of one shape) go through one reduce-window, stacked: each
    would be two kernels of its own, its input and its window.
    """
    if count < MIN_COUNT_FOR_BOUNDARY or not tracing_for_cpu():
        return cells
    stacked = jnp.stack(cells)
    # Stacked on leading axes, so that each array comes out contiguous for the pass over x.
    summed = lax.cumsum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)[1]
    return tuple(unstack(summed))


def _centred(
    x: Array, shift: Array, compute_dtype: Any, keep: Array | None = None, site: int = X_SUM
) -> Array:
    """x - K per cell, (N, m, C); exactly zero when every cell holds one element.

    With one element per cell K is x itself, or under a mask (``keep``) x where
    kept and 0 elsewhere (:func:`_first_kept`); XLA is told so. ``site`` as :func:`converted`.
    """
    cells = _widened(x, compute_dtype, site)
    if cells.shape[1] == 1:
        return jnp.zeros_like(cells) if keep is None else jnp.where(keep, 0.0, cells)
    return cells - _per_cell(shift)


def mask_cells(mask: Array | None, x: Array) -> Array | None:
    """A call-time mask (broadcastable to x) as cells: which elements the statistics read.

    (N, m, C) booleans, but with a length-1 batch or channel axis where the
    mask has one: a padding mask of one value per position of a sample,
    (N, L, 1), stays 1/C of x's size rather than being written out at x's
    shape (as an operand of the statistics pass's ``lax.cond`` it would be).
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)
    return _to_cells(jnp.broadcast_to(mask, (mask.shape[0], *x.shape[1:-1], mask.shape[-1])))


def _weights(keep: Array) -> Array:
    """The mask as 0/1 int8 weights, of ``keep``'s shape, for the sums to multiply by.

    XLA:CPU's reductions convert int8 inside their kernel but not booleans: a
    convert of ``keep`` was written out as an x-sized int32 or float32 array.
    The int8 copy, one byte an element, is kept from merging with the readers'
    converts by a barrier (:func:`apart`); each reader converts it at a site of
    its own (:func:`converted`).
    """
    return apart(keep.astype(jnp.int8), 1)


def _zeroed(x: Array, keep: Array) -> Array:
    """x as (N, m, C) cells, 0 where masked out: a masked-out NaN or inf (padding) reaches no sum.

    A select in x's dtype, written once: XLA:CPU's reductions do not fuse a
    select, and a select in each sum was a float32 array of x's size apiece.
    After it the sums multiply by :func:`_weights`, which they fuse.
    """
    # Behind a barrier: XLA:CPU computes a bfloat16 select in float32, and would have the sums read that.
    return apart(jnp.where(keep, _to_cells(x), jnp.zeros((), x.dtype)), 1)


MASK_COUNT = 3
"""The convert site (:func:`converted`) of the mask weights in their count."""


def cell_counts(x: Array, weights: Array | None, compute_dtype: Any) -> Array | int:
    """Elements per cell: the int m, or with a mask the (N, C) counts of masked-in elements.

    ``weights`` are the mask's :func:`_weights` (None without a mask). The float
    sum of 0/1 weights is exact up to 2^24 elements per cell in float32, beyond
    which the count itself has no exact float32 value.
    """
    if weights is None:
        return _count(x)
    counts = jnp.sum(converted(weights, compute_dtype, MASK_COUNT), axis=1)
    return jnp.broadcast_to(counts, (x.shape[0], x.shape[-1]))


def _first_kept(cells: Array, keep: Array | None) -> Array:
    """K per cell: its first element, or with a mask its first masked-in one (0 for an empty cell)."""
    if keep is None:
        return cells[:, 0, :]
    first = jnp.broadcast_to(jnp.argmax(keep, axis=1)[:, None, :], (cells.shape[0], 1, cells.shape[2]))
    return jnp.where(jnp.any(keep, axis=1), jnp.take_along_axis(cells, first, axis=1)[:, 0, :], 0.0)


RAW_SUMS_BOUND = 16.0
"""Largest mean square over variance, per cell, for which the statistics pass keeps raw sums.

``var = (s2 - s1^2 / m) / m`` from raw sums has a relative error of about
``c u s2 / M2`` (u the unit round-off, c the summation's error growth, M2 the
centred sum of squares): bounded by 16 c u, a few times float32's own
rounding of the variance, wherever every cell's |mean| is at most about 3.9
standard deviations. Beyond, the shifted sums take over (docs/design.md,
"One pass: shifted sums per cell")."""


def raw_sums_within_bound(s1: Array, s2: Array, count: Array | int) -> Array:
    """Per sum: whether its variance from raw sums is within the bound above (NaN fails)."""
    return s2 <= RAW_SUMS_BOUND * (s2 - s1 * (s1 / safe_count(count)))


def raw_sums_suffice(within_bound: Array, s2: Array) -> Array:
    """Whether every :func:`raw_sums_within_bound` holds and no sum of squares ``s2`` overflowed.

    An overflowed ``s2`` can pass the bound (inf <= 16 * inf), hence the second
    check. Both are one float reduction of one elementwise predicate: XLA:CPU
    makes each boolean ``all`` or ``any`` a few kernels of its own.
    """
    fails = jnp.logical_not(within_bound & jnp.logical_not(jnp.isinf(s2))).astype(s2.dtype)
    return jnp.sum(fails) == 0.0


class _Masked(NamedTuple):
    """A mask as the statistics pass reads it: booleans, x zeroed where masked out, 0/1 weights."""

    keep: Array
    zeroed: Array
    weights: Array


def _masked(x: Array, keep: Array | None) -> _Masked | None:
    """``keep`` with its :func:`_zeroed` x and :func:`_weights`, or None without a mask."""
    return None if keep is None else _Masked(keep, _zeroed(x, keep), _weights(keep))


def _shifted(
    x: Array, masked: _Masked | None, compute_dtype: Any
) -> tuple[Array, Array, Array, Array, Array]:
    """``(K, u, 1 / u, sum_s (x - K) u, sum_s ((x - K) u)^2)`` with K each cell's first (kept) element.

    u is the :func:`power_of_two_scale` of K, so the squares stay finite for data
    of any magnitude whose variance is representable. Powers of two scale
    exactly: the statistics are the unscaled ones, bit for bit, wherever those
    are finite (a deviation times u is at least about 2^-24 in float32 when not
    zero, so nothing underflows). Under a mask the sums read x zeroed where
    masked out, times the 0/1 weights (:class:`_Masked`).
    """
    # K from x in its own dtype: a convert of all of x here would be shared with the sums.
    keep = None if masked is None else masked.keep
    shift = lax.stop_gradient(_first_kept(_to_cells(x), keep).astype(compute_dtype))
    unit, inverse_unit = power_of_two_scale(shift)
    values = _to_cells(x) if masked is None else masked.zeroed
    weights = None if masked is None else masked.weights

    # Float32 x: XLA:CPU writes (x - K) u out once, in y's buffer, and both sums read it: faster
    # than two reductions that each broadcast K (each about twice a raw sum's time). Half-precision
    # x: that buffer would be a float32 array twice x's size, so each sum converts x and computes
    # (x - K) u itself (sites 1 and 2: at site 0 a sum would share its convert with K's slice).
    # Under a mask y's buffer holds the zeroed x, and so each sum computes its own in float32 too.
    shared = x.dtype == jnp.dtype(compute_dtype) and masked is None

    def scaled_sum(site: int, square: bool) -> Array:
        values_, shift_, unit_, weights_ = apart((values, shift, unit, weights), 0 if shared else site)
        scaled = (values_.astype(compute_dtype) - _per_cell(shift_)) * _per_cell(unit_)
        if weights_ is not None:  # 0 or 1: the square's weight is the weight
            scaled = scaled * weights_.astype(compute_dtype)
        return jnp.sum(scaled * scaled if square else scaled, axis=1)

    return shift, unit, inverse_unit, scaled_sum(1, False), scaled_sum(2, True)


def shifted_sums(
    x: Array, compute_dtype: Any, keep: Array | None = None
) -> tuple[Array, Array, Array, Array, Array, Array | None, Array | int]:
    """The statistics pass: ``(K, u, 1 / u, sum_s (x - K) u, sum_s ((x - K) u)^2, raw, count)`` per cell.

    First the raw sums (K = 0, u = 1): two reductions that read x itself,
    as BatchNorm's. ``raw`` (a traced bool) says they are kept: every cell's
    mean square is at most RAW_SUMS_BOUND times its variance, and no sum
    overflowed. Otherwise (a ``lax.cond``, so data that passes pays only the
    check on (N, C) arrays) the pass is taken again with K the cell's first
    element, a constant for differentiation, in units u of a power of two
    near 1 / max(|K|, 1) (:func:`_shifted`); on XLA:CPU ``(x - K) u`` is then
    written out for float32 x without a mask.

    Where raw sums do not pay off (:func:`raw_sums_pay_off`: off the CPU) the
    shifted sums are taken at once and ``raw`` is None: no check, no ``lax.cond``.

    ``keep`` (:func:`mask_cells`) restricts every sum to the masked-in
    elements: each sum reads x zeroed where masked out, written once, and
    the shifted ones multiply by the mask as int8 (:func:`_zeroed`,
    :func:`_weights`). ``count`` is then each cell's (N, C) count of them,
    else the int m (:func:`cell_counts`).
    """
    masked = _masked(x, keep)
    count = cell_counts(x, None if masked is None else masked.weights, compute_dtype)
    if not raw_sums_pay_off():
        return (*_shifted(x, masked, compute_dtype), None, count)
    values = x if masked is None else masked.zeroed
    cells, for_squares = _widened(values, compute_dtype, X_SUM), _widened(values, compute_dtype, X_SQUARES)
    s1, s2 = jnp.sum(cells, axis=1), jnp.sum(for_squares * for_squares, axis=1)
    raw = raw_sums_suffice(raw_sums_within_bound(s1, s2, count), s2)

    # Each branch returns its five (N, C) arrays as one stack: one kernel writes them, where the
    # raw branch otherwise spends four (K and u written out, the sums copied out of the cond).
    def as_raw(operands):
        _, _, s1, s2 = operands
        zeros, ones = jnp.zeros_like(s1), jnp.ones_like(s1)
        return jnp.stack([zeros, ones, ones, s1, s2])

    def shifted(operands):
        return jnp.stack(_shifted(operands[0], operands[1], compute_dtype))

    shift, unit, inverse_unit, s1, s2 = unstack(lax.cond(raw, as_raw, shifted, (x, masked, s1, s2)))
    return shift, unit, inverse_unit, s1, s2, raw, count


def normalize_pass(
    x: Array, shift: Array, mix_mean: Array, a: Array, bias: Array | None, compute_dtype: Any, out_dtype: Any
) -> Array:
    """The normalize pass: ``y = ((x - K) - mix_mean) * a + bias``.

    The mean is removed in K's frame, so float32 keeps its digits when
    |mean| >> std (folding it into ``x * a + b`` would lose them).
    """
    cells = _widened(x, compute_dtype, X_NORMALIZE)
    y = (cells - _per_cell(shift) - _per_cell(mix_mean)) * _per_cell(a)
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y.reshape(x.shape).astype(out_dtype)


def normalize_autodiff(
    graph: CellGraph,
    compute_dtype: Any,
    out_dtype: Any,
    x: Array,
    inputs: Any,
    bias: Array | None,
    mask: Array | None = None,
) -> tuple[Array, Any]:
    """Statistics pass, cell graph, normalize pass; differentiated by JAX."""
    m = _count(x)
    shift, _, inverse_unit, s1, s2, _, count = shifted_sums(x, compute_dtype, mask_cells(mask, x))
    s1, s2 = _fusion_boundary(s1, s2, count=m)
    mix_mean, a, batch_stats = graph(shift, inverse_unit, s1, s2, count, inputs)
    mix_mean, a = _fusion_boundary(mix_mean, a, count=m)
    return normalize_pass(x, shift, mix_mean, a, bias, compute_dtype, out_dtype), batch_stats


def _like(cotangent: Array, primal: Array) -> Array:
    """The cotangent, summed over the shard_map axes where only it varies.

    Under ``jax.shard_map`` a value can be replicated over an axis (e.g. a
    bn-only ``a``, built from ``pmean``-ed statistics) while the reduction of
    the local ``dy`` varies; autodiff transposes the implicit broadcast into a
    ``psum``, and so must this hand-written VJP.
    """
    extra = _varying_axes(cotangent) - _varying_axes(primal)
    return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying_axes(v: Array) -> frozenset:
    """The shard_map axes over which ``v`` varies (empty outside shard_map)."""
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _backward_sums(
    dy: Array,
    x: Array,
    shift: Array,
    mix_mean: Array,
    raw: Array | None,
    compute_dtype: Any,
    keep: Array | None,
) -> tuple[Array, Array]:
    """The backward reduction pass: ``r1 = sum_s dy`` and ``r2 = sum_s dy * (x - K - mix_mean)``.

    Where the forward kept raw sums (K = 0, every cell's |mean| within a few
    standard deviations), ``r2 = sum_s dy * x - mix_mean * r1``: reductions
    of dy and x themselves, which XLA:CPU's reduction fusions take without
    writing out an x-sized temporary, and no worse a cancellation than the
    forward's. Otherwise the centred form, in K's frame.

    ``dy`` and ``x`` come in their own dtypes, each converted at its own site (:func:`converted`).
    """
    r1 = jnp.sum(_widened(dy, compute_dtype, DY_SUM), axis=1)

    def raw_form(operands):
        dy, x, _, mix_mean, r1, _ = operands
        products = _widened(dy, compute_dtype, DY_X_SUM) * _widened(x, compute_dtype, X_BACKWARD_SUM)
        return jnp.sum(products, axis=1) - mix_mean * r1

    def centred_form(operands):
        dy, x, shift, mix_mean, _, keep = operands
        centred = _centred(x, shift, compute_dtype, keep, X_BACKWARD_SUM) - _per_cell(mix_mean)
        return jnp.sum(_widened(dy, compute_dtype, DY_X_SUM) * centred, axis=1)

    operands = (dy, x, shift, mix_mean, r1, keep)
    if raw is None:  # the forward took the shifted sums without a check
        return r1, centred_form(operands)
    return r1, lax.cond(raw, raw_form, centred_form, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def normalize(
    graph: CellGraph,
    compute_dtype: Any,
    out_dtype: Any,
    x: Array,
    inputs: Any,
    bias: Array | None,
    mask: Array | None = None,
) -> tuple[Array, Any]:
    """:func:`normalize_autodiff` with the two-pass backward of this module.

    Args:
      graph: the cell graph (static: it carries the layer's configuration).
      compute_dtype: dtype of the reductions and the normalize step.
      out_dtype: dtype of y.
      x: the input, (N, *spatial, C).
      inputs: pytree of the small differentiable inputs the graph reads.
      bias: (C,) offset or None.
      mask: booleans broadcastable to x: the elements the statistics read
        (every element is normalized); None reads all.

    Returns:
      ``(y, batch_stats)``.
    """
    return _forward(graph, compute_dtype, out_dtype, x, inputs, bias, mask)[0]


def _forward(graph, compute_dtype, out_dtype, x, inputs, bias, mask):
    """The primal output and the residuals: x, K, the sums, the counts and the small inputs."""
    m = _count(x)
    keep = mask_cells(mask, x)
    if m == 1:  # (N, C) input: the cells' shifted sums are exactly zero.
        shift = _first_kept(_to_cells(x).astype(compute_dtype), keep)
        s1 = s2 = jnp.zeros_like(shift)
        unit = inverse_unit = jnp.ones_like(shift)
        raw = None
        count = cell_counts(x, None if keep is None else _weights(keep), compute_dtype)
    else:
        shift, unit, inverse_unit, s1, s2, raw, count = shifted_sums(x, compute_dtype, keep)
    mix_mean, a, batch_stats = graph(shift, inverse_unit, s1, s2, count, inputs)
    mix_mean, a = _fusion_boundary(mix_mean, a, count=m)
    y = normalize_pass(x, shift, mix_mean, a, bias, compute_dtype, out_dtype)
    kept = None if isinstance(count, int) else count  # the masked-in counts; m is x's to recompute
    return (y, batch_stats), (x, shift, unit, inverse_unit, s1, s2, raw, kept, inputs, bias, mask)


def _backward(graph, compute_dtype, out_dtype, residuals, cotangents):
    """One reduction pass over (dy, x), the cell graph's VJP, one elementwise pass."""
    del out_dtype
    x, shift, unit, inverse_unit, s1, s2, raw, kept, inputs, bias, mask = residuals
    m = _count(x)
    count = m if kept is None else kept
    # The cell graph again, on (N, C) arrays: cheaper to redo than to keep, and
    # its VJP is traced here, where the cotangents' types (e.g. varying over a
    # shard_map axis) are known.
    (mix_mean, a, _), graph_vjp = jax.vjp(
        lambda s1, s2, inputs: graph(shift, inverse_unit, s1, s2, count, inputs), s1, s2, inputs
    )
    dy, batch_stats_bar = cotangents  # dy in y's dtype: :func:`converted` converts it per kernel
    keep = mask_cells(mask, x)
    centred = _centred(x, shift, compute_dtype, keep, X_DX)
    # Every element is normalized by mix_mean and a: r1, r2 sum over all of them.
    r1, r2 = _backward_sums(dy, x, shift, mix_mean, raw, compute_dtype, keep)
    g1, g2, inputs_bar = graph_vjp((_like(-a * r1, mix_mean), _like(r2, a), batch_stats_bar))
    # ds1/dx = u and ds2/dx = 2 u^2 (x - K): u folded into the (N, C) cotangents
    # ((g2 * u) * u, since u^2 alone can underflow); zero where the mask left x out of the sums.
    a, g1, g2 = _fusion_boundary(a, g1 * unit, 2.0 * g2 * unit * unit, count=m)
    through_sums = _per_cell(g1) + _per_cell(g2) * centred
    if keep is not None:
        through_sums = jnp.where(keep, through_sums, 0.0)
    dx = (_per_cell(a) * _widened(dy, compute_dtype, DY_DX) + through_sums).reshape(x.shape).astype(x.dtype)
    # From an (N, m, C) view as r1's (XLA merges sum(r1, 0) into a reduce of
    # the 4-D dy, which then needs a second float32 copy of bfloat16 dy).
    bias_bar = None
    if bias is not None:
        bias_bar = _like(jnp.sum(_widened(dy, compute_dtype, DY_BIAS), axis=(0, 1)), bias).astype(bias.dtype)
    return dx, inputs_bar, bias_bar, None


normalize.defvjp(_forward, _backward)
