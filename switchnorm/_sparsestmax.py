"""SparsestMax: the projection of Sparse Switchable Normalization, exact, compiled and branch-free.

Sparse Switchable Normalization replaces the softmax over normalizer logits by SparsestMax, the
Euclidean projection onto the probability simplex with a ball around its centre cut out:

    sparsestmax(z, r) = argmin_p ||p - z||^2  subject to  p >= 0,  sum(p) = 1,  ||p - u|| >= r,

with u = (1/K, ..., 1/K). Radius 0 is sparsemax; at r >= sqrt(1 - 1/K) only the vertices remain,
so the output is one-hot. Annealing r from 0 up to that value during training makes every layer
settle on exactly one normalizer.

Important details this module takes care of:

* The exact minimiser of this non-convex problem, in closed form. Write p(beta) = sparsemax(beta z).
  If ||p(1) - u|| >= r, p(1) is the answer. Otherwise the answer is p(beta*) with beta* > 1 the
  scale at which ||p(beta*) - u|| = r. Proof: with eta = 1 - 1/beta*, in [0, 1), the Lagrangian
  ||p - z||^2 - eta (||p - u||^2 - r^2) is a convex quadratic whose minimiser over the simplex is
  p(beta*); it equals the objective there (the constraint binds), and at every feasible p the
  objective is at least the Lagrangian, so no feasible p does better (strict convexity: unique).
  SSN's four-stage algorithm (sparsemax, push out from the centre, restrict to the support, push
  out within the face) walks this path a piece at a time; the closed form lands on its point
  directly, however many times the support shrinks on the way.
* Finding beta* without iterating. On the path the support is the top-j entries of z for beta in
  a known interval, and there ||p(beta) - u||^2 = beta^2 v_j + 1/j - 1/K, with v_j the sum of squared
  deviations of the top j entries from their mean. Entry j leaves the support at
  beta_j = 1 / (j (mean_j - z_(j))); the distance is increasing in beta, so the support size at the
  answer is 1 + #{j >= 2 : ||p(beta_j) - u||^2 > r^2}, and beta* = sqrt((r^2 - 1/k + 1/K) / v_k).
  Every support size is evaluated at once (a K x K table) and the entries are ordered by K x K
  comparisons and a permutation mask, not a sort: fixed work, no data-dependent control flow, so
  it traces once under jit, vmap, scan and shard_map.
* Ties. When the m >= 2 largest logits tie and r^2 > 1/m - 1/K the path ends (at the tied face's
  centre) inside the ball, and every point of that face at distance r from u is a minimiser. The
  output is then the limit of sparsestmax(z - eps * (0, 1, ..., K-1)) as eps -> 0+: the lowest
  index wins. On the tied face that limit is the same projection applied to the scores -index,
  solved by the same closed form. z exactly constant is the case m = K.
* Choosing from a tie. There the answer jumps with the direction z leaves the tie in, so it has
  no derivative; the tied entries get sparsemax's derivative at the tied face's centre instead,
  (I - 11^T / m) dz on them, as they do below that radius. Logits that start tied (a layer's
  zeros) therefore move the way the loss prefers at any radius, and the layer chooses: without
  it, a radius set above 0 before training, or a first step with no gradient (a network whose
  head starts at zero), would leave every layer on the tie rule's pick for good. Tied logits
  stay tied only where the loss's gradient is equal on every tied entry.
* Infinite logits. +inf entries are the limit of ever larger ones: the answer is the one above
  with those entries tied and every other entry 0 (one-hot on a single +inf). A -inf entry gets
  weight 0 and the rest are projected on the face without it, whose centre lies
  sqrt(1/n - 1/K) from u (n entries left): the limit of ever smaller ones.
* Extreme magnitudes. The logits are shifted so the largest is 0 and divided by their range
  before any sum or square, so logits near 1e30 or 1e-30 neither overflow nor lose their order.
* Gradients. Plain autodiff through the closed form, which is the projection's derivative wherever
  the support and the active constraint are locally constant; every division and square root is
  guarded (double `where`), and the division by the logits' range has a derivative that never
  squares it (`_ratio`), so gradients are finite everywhere: kinks, one-hot outputs, logits near
  1e-30.
* Precision. float32 and narrower inputs are computed in float32 and returned in their dtype;
  float64 stays float64.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _checked_radius(radius) -> None:
    """Rejects a negative or NaN radius when its value is known at trace time."""
    try:
        values = np.asarray(radius, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: clipped at 0 below, NaN propagates to the output
    if np.isnan(values).any():
        raise ValueError(f"sparsestmax radius must not be NaN, got {radius!r}; pass a number >= 0.")
    if (values < 0).any():
        raise ValueError(
            f"sparsestmax radius must be >= 0, got {radius!r}; 0 gives sparsemax and "
            "sqrt(1 - 1/K) gives one-hot outputs."
        )


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _checked_logits(z) -> jax.Array:
    """z as an array with a floating dtype and at least one entry on the last axis."""
    z = jnp.asarray(z)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(
            f"sparsestmax needs floating logits, got dtype {z.dtype}; cast them first, "
            "e.g. z.astype(jnp.float32)."
        )
    if z.ndim == 0 or z.shape[-1] < 1:
        raise ValueError(
            f"sparsestmax projects the last axis and needs K >= 1 entries there, got shape {z.shape}."
        )
    return z


@jax.custom_jvp
def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, whose derivative never forms denominator**2.

    Autodiff of a division squares the denominator, which underflows for logits spread over
    1e-30 and turns a finite derivative (of order 1 / denominator) into inf * 0 = NaN.
    """
    return numerator / denominator


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
    numerator, denominator = primals
    d_numerator, d_denominator = tangents
    quotient = numerator / denominator
    return quotient, (d_numerator - quotient * d_denominator) / denominator


def _sparsemax_sorted(scores: jax.Array, active: jax.Array) -> jax.Array:
    """Sparsemax (Martins and Astudillo, 2016) of scores sorted descending, over the active prefix.

    The top score must be 0 (it always enters the support); inactive entries come out 0.
    """
    size = jnp.arange(1, scores.shape[-1] + 1)
    cumulative = jnp.cumsum(jnp.where(active, scores, 0), axis=-1)
    in_support = active & (1 + size * scores > cumulative)
    support = jnp.max(jnp.where(in_support, size, 1), axis=-1, keepdims=True)
    threshold = (jnp.take_along_axis(cumulative, support - 1, axis=-1) - 1) / support
    return jnp.where(active, jnp.maximum(scores - threshold, 0), 0)


def _path_scale(e: jax.Array, active: jax.Array, n: jax.Array, r2: jax.Array):
    """Scale gamma with ||sparsemax(gamma e) - c||^2 = r2 on the active face (centre c, n entries).

    e is sorted descending with e[0] = 0. Returns gamma (0 where r2 is reached at gamma = 0) and
    whether the path reaches r2 at all: it does not where the top-k entries at the answer all tie,
    the path then ending at their uniform point.
    """
    length = e.shape[-1]
    j = jnp.arange(1, length + 1, dtype=e.dtype)  # support size
    inverse_n = 1 / n[..., None].astype(e.dtype)
    mean = jnp.cumsum(jnp.where(active, e, 0), axis=-1) / j
    in_top = jnp.arange(length)[None, :] < jnp.arange(1, length + 1)[:, None]  # [j - 1, i]: i < j
    deviation = jnp.where(in_top, e[..., None, :] - mean[..., :, None], 0)
    squares = jnp.sum(deviation**2, axis=-1)  # v_j, in units of e
    exit_gap = j * (mean - e)  # entry j leaves the support at gamma = 1 / exit_gap
    leaves = exit_gap > 0
    exit_r2 = jnp.where(leaves, squares / jnp.where(leaves, exit_gap, 1) ** 2 + 1 / j - inverse_n, jnp.inf)
    stays = active & (j >= 2) & (exit_r2 > r2[..., None])
    k = 1 + jnp.sum(stays, axis=-1, keepdims=True)
    squares_k = jnp.take_along_axis(squares, k - 1, axis=-1)[..., 0]
    excess = r2 - (1 / k[..., 0].astype(e.dtype) - inverse_n[..., 0])
    solvable = (squares_k > 0) & (excess > 0)
    ratio = jnp.where(solvable, excess / jnp.where(solvable, squares_k, 1), 1)
    return jnp.where(solvable, jnp.sqrt(ratio), 0), squares_k > 0


def _tied_face_tangent(s: jax.Array, tied: jax.Array) -> jax.Array:
    """Exactly zero, with sparsemax's derivative on the tied entries: (I - 11^T / m) ds there.

    Where the answer is the uniform point of m tied top entries it is sparsemax(s) itself, so
    its derivative is sparsemax's on that support (the ball's constraint does not bind). The
    uniform point alone is built from comparisons and would have none: logits that start tied
    (all zeros) would then never move.
    """
    moved = jnp.where(tied, s - jax.lax.stop_gradient(s), 0)  # 0 in value, ds in derivative
    count = jnp.sum(tied, axis=-1, keepdims=True)
    return jnp.where(tied, moved - jnp.sum(moved, axis=-1, keepdims=True) / count, 0)


def _project_sorted(s: jax.Array, n: jax.Array, r2: jax.Array, beta_min: float) -> jax.Array:
    """The projection on the face of the first n entries of s (sorted descending), r2 from its centre.

    r2 must lie in [0, 1 - 1/n]; beta_min is the least scale of s allowed on the path (1 for the
    logits themselves, 0 for the tie-break scores). Returns weights in s's order.
    """
    active = jnp.arange(s.shape[-1]) < n[..., None]
    top = s[..., :1]
    spread = top - jnp.take_along_axis(s, n[..., None] - 1, axis=-1)
    has_spread = spread > 0
    e = jnp.where(active & has_spread, _ratio(s - top, jnp.where(has_spread, spread, 1)), 0)
    gamma, on_path = _path_scale(e, active, n, r2)
    gamma = jnp.maximum(gamma, beta_min * spread[..., 0])
    tied = active & (s == top)
    tied_uniform = tied / jnp.sum(tied, axis=-1, keepdims=True) + _tied_face_tangent(s, tied)
    at_vertex = r2 >= 1 - 1 / n.astype(s.dtype)
    use_path = on_path & ~at_vertex
    return jnp.where(use_path[..., None], _sparsemax_sorted(gamma[..., None] * e, active), tied_uniform)


def _descending_order(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sorted position of each entry (descending, ties to the lower index first) and its permutation
    matrix; K x K comparisons beat a sort for the handful of entries a normalizer mix has."""
    i = jnp.arange(x.shape[-1])
    before = (x[..., None, :] > x[..., :, None]) | (
        (x[..., None, :] == x[..., :, None]) & (i[None, :] < i[:, None])
    )
    rank = jnp.sum(before, axis=-1)  # [..., i]: how many entries sort ahead of entry i
    to_sorted = (rank[..., :, None] == i).astype(x.dtype)  # [..., i, position]
    order = _to_sorted_order(jnp.broadcast_to(i.astype(x.dtype), x.shape), to_sorted)
    return order, to_sorted


def _to_sorted_order(values: jax.Array, to_sorted: jax.Array) -> jax.Array:
    """values permuted into sorted positions: a masked sum, not a matmul, so that no backend's
    reduced-precision matmul (TF32 on GPUs, bfloat16 passes on TPUs) can round the logits."""
    return jnp.sum(values[..., :, None] * to_sorted, axis=-2)


def _finite_logits(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x with its infinities as their limits, the count n of entries that are not -inf).

    A row holding +inf becomes 1 on its +inf entries and 0 elsewhere (its answer as the +inf
    grow); -inf entries stay out of the projection. A row of -inf alone reads as constant.
    """
    positive = jnp.isposinf(x)
    x = jnp.where(jnp.any(positive, axis=-1, keepdims=True), positive.astype(x.dtype), x)
    negative = jnp.isneginf(x)
    negative &= ~jnp.all(negative, axis=-1, keepdims=True)
    lowest = jnp.min(jnp.where(negative | jnp.isnan(x), jnp.inf, x), axis=-1, keepdims=True)
    x = jnp.where(negative, jax.lax.stop_gradient(lowest), jnp.where(jnp.isneginf(x), 0, x))
    return x, jnp.sum(~negative, axis=-1)


@jax.jit
def _sparsestmax(z: jax.Array, radius) -> jax.Array:
    """The projection, compiled once per shape and dtype (eager calls included)."""
    size = z.shape[-1]
    dtype = jnp.promote_types(z.dtype, jnp.float32)
    x = z.astype(dtype)
    r = jnp.broadcast_to(jnp.asarray(radius, dtype), x.shape[:-1])
    order, to_sorted = _descending_order(
        jnp.where(jnp.isposinf(x).any(-1, keepdims=True), jnp.isposinf(x), x)
    )
    x, n = _finite_logits(x)
    s = _to_sorted_order(x, to_sorted)
    active = jnp.arange(size) < n[..., None]  # -inf entries sort last: the face of the first n
    top_r2 = 1 - 1 / size
    r2 = jnp.minimum(jnp.maximum(r, 0) ** 2, top_r2)
    face_r2 = 1 / n.astype(dtype) - 1 / size  # the kept face's centre from u
    kept_r2 = jnp.where(r2 >= top_r2, 1 - 1 / n.astype(dtype), jnp.maximum(r2 - face_r2, 0))
    weights = _project_sorted(s, n, kept_r2, 1.0)
    # Tied maxima with the ball reaching past their face's centre: break the tie by index.
    top_tied = active & (s == s[..., :1])
    m = jnp.sum(top_tied, axis=-1)
    tie_face_r2 = 1 / m.astype(dtype) - 1 / size
    tied = (m >= 2) & (r2 > tie_face_r2)
    tie_r2 = jnp.where(r2 >= top_r2, 1 - 1 / m.astype(dtype), r2 - tie_face_r2)
    tie_weights = _project_sorted(-order, m, jnp.where(tied, tie_r2, 0), 0.0)
    tie_weights += _tied_face_tangent(s, top_tied)  # the tie gets a derivative: see "Choosing"
    weights = jnp.where(tied[..., None], tie_weights, weights)
    weights = jnp.sum(to_sorted * weights[..., None, :], axis=-1)  # back to the logits' order
    undefined = jnp.isnan(r) | jnp.any(jnp.isnan(z.astype(dtype)), axis=-1)  # say so, not guess
    weights = jnp.where(undefined[..., None], jnp.nan, weights)
    return weights.astype(z.dtype)


def sparsestmax(z: jax.Array, radius) -> jax.Array:
    r"""SparsestMax: projection onto the probability simplex outside a ball around its centre.

    .. math::

        \mathrm{sparsestmax}(z, r) = \arg\min_{p \in \Delta^{K-1},\ \|p - u\| \ge r} \|p - z\|^2,
        \qquad u = (1/K, \dots, 1/K).

    The answer is ``sparsemax(beta * z)`` with the least ``beta >= 1`` that puts it at distance at
    least ``r`` from ``u`` (see the module docstring for the proof and the closed form). ``r = 0``
    is sparsemax; ``r >= sqrt(1 - 1/K)`` gives one-hot outputs. When several points are optimal
    (tied largest logits with ``r^2 > 1/m - 1/K``, e.g. constant ``z``), the lowest index wins: the
    output is the limit of ``sparsestmax(z - eps * arange(K), r)`` as ``eps -> 0+``; it has no
    derivative there, and the tied logits get sparsemax's at the tied face's centre, so that
    logits which start tied (a layer's zeros) move the way the loss prefers at any radius.

    Args:
      z: logits, floating, projected along the last axis; leading axes are batch axes. Finite
        ones with a range below the dtype's largest value; +inf entries share the weight as if
        tied far above the rest (one-hot on a single one), -inf entries get weight 0; a row
        holding NaN comes out NaN.
      radius: r >= 0, a scalar or an array broadcastable to ``z.shape[:-1]``; values above
        ``sqrt(1 - 1/K)`` act as ``sqrt(1 - 1/K)``. A traced negative radius acts as 0, a traced NaN
        radius gives NaN outputs (concrete ones raise).

    Returns:
      Weights of z's shape and dtype (computed in float32, or float64 for float64 input): on the
      simplex, at distance >= radius from its centre. K = 1 returns ones.

    Cost: O(K^2) per row (entries ordered by pairwise comparison, every support size solved at
    once), meant for the handful of normalizers a layer mixes.

    Example:

      >>> import jax.numpy as jnp
      >>> from switchnorm import sparsestmax
      >>> z = jnp.array([1.0, 0.8, 0.1])
      >>> [round(float(w), 3) for w in sparsestmax(z, 0.0)]  # sparsemax
      [0.6, 0.4, 0.0]
      >>> [round(float(w), 3) for w in sparsestmax(z, 0.6)]  # pushed away from (1/3, 1/3, 1/3)
      [0.811, 0.189, 0.0]
      >>> [round(float(w), 3) for w in sparsestmax(z, 0.9)]  # beyond sqrt(2/3): one-hot
      [1.0, 0.0, 0.0]

    References:
      Shao, Meng, Li, Zhang, Li, Wang and Luo, "SSN: Learning Sparse Switchable Normalization
      via SparsestMax", CVPR 2019 (https://arxiv.org/abs/1903.03793); extended in IJCV 2020
      (https://doi.org/10.1007/s11263-019-01269-y).
      Martins and Astudillo, "From Softmax to Sparsemax", ICML 2016 (https://arxiv.org/abs/1602.02068).
    """
    z = _checked_logits(z)
    _checked_radius(radius)
    if not _broadcasts(jnp.shape(radius), z.shape[:-1]):
        raise ValueError(
            f"sparsestmax radius of shape {jnp.shape(radius)} does not broadcast to the batch shape "
            f"{z.shape[:-1]} of logits {z.shape}; pass a scalar or one radius per row."
        )
    return _sparsestmax(z, radius)


def radius_schedule(step: Any, total_steps: int, final: float = 1.0) -> jax.Array:
    """Sparsestmax's radius at ``step``: rising linearly from 0 to ``final`` over ``total_steps``.

    ``final * clip(step / total_steps, 0, 1)``, as Sparse Switchable Normalization anneals it. At
    a radius of at least ``sqrt(1 - 1/K)`` every output of sparsestmax is one-hot (K normalizers),
    and that is below 1 for every K, so the default ``final=1.0`` leaves every layer on exactly one
    normalizer by the end. ``step`` may be traced (inside a jitted train step); ``final`` is a
    number >= 0 (a negative or non-finite one raises ValueError).

    Example::

      >>> import switchnorm
      >>> [float(switchnorm.radius_schedule(s, 4)) for s in (0, 2, 4, 9)]
      [0.0, 0.5, 1.0, 1.0]
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"radius_schedule needs total_steps as a positive int, got {total_steps!r}.")
    if isinstance(final, bool) or not isinstance(final, numbers.Real) or not 0 <= final < math.inf:
        raise ValueError(
            f"radius_schedule needs final as a finite number >= 0, got {final!r}; 1.0 (the default) "
            "ends every layer one-hot, 0 keeps sparsemax throughout."
        )
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
    return final * fraction
