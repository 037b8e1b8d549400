"""The functional core of Switchable Normalization: arrays in, arrays out, no Flax.

Data flows one way::

    x --shifted_sums--> per-(n, c) sums of x - K and (x - K)^2      (_vjp.py, one pass)
      --cell_graph----> per-cell mean and centred sum of squares,   (this file, (N, C)
                        bn/in/ln/gn statistics (scope_stats),        arrays only)
                        blend, a = scale / sqrt(mixed var + eps)
      --normalize_pass> y = ((x - K) - mixed mean) * a + bias        (_vjp.py, one pass)

:mod:`switchnorm._vjp` holds the two passes over x and the custom VJP whose
backward pass has the same shape (DESIGN.md section 2).

Both Flax front ends (:mod:`switchnorm.nnx` and :mod:`switchnorm.linen`) only
hold parameters and state and call :func:`switch_norm`; all the math is here.
See ``DESIGN.md`` for the derivations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm import _vjp

Array = jax.Array

NORMALIZERS: tuple[str, ...] = ("bn", "in", "ln", "gn")
"""Every normalizer name, in the default order of the logits."""

SPATIAL_NORMALIZERS: tuple[str, ...] = ("in", "gn")
"""Normalizers that need a spatial extent, hence an input of rank >= 3."""

MAX_DEFAULT_GROUPS = 32


# --------------------------------------------------------------------------
# Argument handling: every check raises at trace time and names the culprit.
# --------------------------------------------------------------------------


def default_normalizers(rank: int) -> tuple[str, ...]:
    """The normalizers that apply to a channels-last input of this rank.

    (N, C) features have no spatial extent, so "in" and "gn" are meaningless
    there and the default is ("bn", "ln"); any higher rank gets all four.
    """
    return NORMALIZERS if rank > 2 else ("bn", "ln")


def validate_normalizers(normalizers: Sequence[str]) -> tuple[str, ...]:
    """Returns ``normalizers`` as a tuple, or raises if a name is bad."""
    if isinstance(normalizers, str):
        raise TypeError(
            f"normalizers must be a sequence of names such as ('bn', 'ln'), got the "
            f"string {normalizers!r}; write ({normalizers!r},) for a single normalizer."
        )
    normalizers = tuple(normalizers)
    if not normalizers:
        raise ValueError(f"normalizers must name at least one of {NORMALIZERS}, got an empty sequence.")
    for name in normalizers:
        if name not in NORMALIZERS:
            raise ValueError(
                f"normalizers: unknown normalizer {name!r} in {normalizers}; choose from {NORMALIZERS}."
            )
    repeated = sorted({n for n in normalizers if normalizers.count(n) > 1})
    if repeated:
        raise ValueError(
            f"normalizers: {repeated} appear more than once in {normalizers}; "
            "each normalizer may be named once."
        )
    return normalizers


def default_num_groups(num_channels: int) -> int:
    """Default group count for the gn term: always a valid grouping.

    The largest divisor of ``num_channels`` that is at most
    ``min(32, num_channels // 2)``: Flax GroupNorm's 32 groups where the channel
    count allows it (64 -> 32, 256 -> 32), otherwise as many groups as keep at
    least two channels per group, so gn stays distinct from in (16 -> 8,
    48 -> 24, 3 -> 1). A prime channel count gets one group (gn equals ln).
    """
    limit = max(1, min(MAX_DEFAULT_GROUPS, num_channels // 2))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def resolve_num_groups(num_channels: int, num_groups: int | None, group_size: int | None) -> int:
    """The gn group count from GroupNorm-style ``num_groups`` / ``group_size``."""
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"give num_groups or group_size, not both (got num_groups={num_groups}, group_size={group_size})."
        )
    if group_size is not None:
        if group_size < 1 or num_channels % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {num_channels} channels; "
                "use a positive divisor of the channel count."
            )
        return num_channels // group_size
    if num_groups is None:
        return default_num_groups(num_channels)
    if num_groups < 1 or num_channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide the {num_channels} channels; "
            "use a positive divisor of the channel count."
        )
    return num_groups


def check_input(x: Any, normalizers: tuple[str, ...], num_features: int | None = None) -> None:
    """Raises ``TypeError``/``ValueError`` if ``x`` cannot go through the layer."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"SwitchNorm expects an array, got {type(x).__name__}.")
    if len(shape) < 2:
        raise ValueError(
            f"SwitchNorm expects a channels-last input of rank >= 2 such as (N, C) or "
            f"(N, H, W, C), got shape {tuple(shape)} (rank {len(shape)})."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"SwitchNorm expects a floating-point input, got dtype {dtype}; "
            "cast it with x.astype(jnp.float32) first."
        )
    if num_features is not None and shape[-1] != num_features:
        raise ValueError(
            f"the input has {shape[-1]} channels (last axis of shape {tuple(shape)}) "
            f"but the layer was built for num_features={num_features}."
        )
    if len(shape) == 2:
        spatial = [n for n in normalizers if n in SPATIAL_NORMALIZERS]
        if spatial:
            raise ValueError(
                f"normalizers {spatial} need a spatial extent, but the input has shape "
                f"{tuple(shape)} (N, C); use ('bn', 'ln') for dense features."
            )


# --------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------


class CellStats(NamedTuple):
    """Sufficient statistics of every (sample n, channel c) cell of x.

    Attributes:
      shift: (N, C) reference value K_nc taken from x itself (its first
        spatial position); every mean below is relative to it.
      mean: (N, C) cell mean minus ``shift``.
      m2: (N, C) centred sum of squares, sum_s (x_nsc - mu_nc)^2.
      count: number of elements per cell, the spatial size m.
    """

    shift: Array
    mean: Array
    m2: Array
    count: int


class ScopeStats(NamedTuple):
    """One normalizer's statistics, broadcast to the (N, C) cells.

    ``mean`` is relative to each cell's own shift, so ``CellStats.shift + mean``
    is the normalizer's mean for that cell; ``var`` is the biased variance.
    """

    mean: Array
    var: Array


def _combine(
    shift: Array,
    mean: Array,
    m2: Array,
    count: int,
    axis: int,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> ScopeStats:
    """Merges cells along ``axis`` with the parallel-variance rule (Chan et al.).

    All cells of a scope have the same ``count``. Cell means are first moved to
    a common frame, the shift of the scope's first cell (agreed across devices
    with a ``pmean`` when ``axis_name`` is given), so that

        scope mean = mean of the cell means
        scope m2   = sum(m2) + count * sum((cell mean - scope mean)^2)

    stays accurate however large the data's mean is. Returns the scope mean
    relative to each cell's own shift (broadcast back to the cells' shape) and
    the scope variance m2 / (count * number of cells).
    """
    pmean = functools.partial(lax.pmean, axis_name=axis_name, axis_index_groups=axis_index_groups)
    ref = lax.slice_in_dim(shift, 0, 1, axis=axis)
    if axis_name is not None:
        ref = pmean(ref)
    in_frame = mean + (shift - ref)  # cell means in the scope's common frame
    scope_mean = jnp.mean(in_frame, axis=axis, keepdims=True)
    if axis_name is not None:
        scope_mean = pmean(scope_mean)
    deviation = in_frame - scope_mean
    # One reduction for both terms: each is a separate small kernel otherwise.
    scope_m2 = jnp.sum(m2 + count * (deviation * deviation), axis=axis, keepdims=True)
    var = scope_m2 / (count * mean.shape[axis])
    if axis_name is not None:  # equal local batches, as flax.linen.BatchNorm assumes
        var = pmean(var)
    return ScopeStats(mean=scope_mean + (ref - shift), var=jnp.broadcast_to(var, mean.shape))


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
    shift, mean, m2, count = cells
    if name == "in":
        return ScopeStats(mean=mean, var=m2 / count)
    if name == "bn":
        return _combine(shift, mean, m2, count, 0, axis_name, axis_index_groups)
    if name not in ("ln", "gn"):
        raise ValueError(f"unknown normalizer {name!r}; choose from {NORMALIZERS}.")
    groups = 1 if name == "ln" else num_groups
    n, c = mean.shape
    g_shift, g_mean, g_m2 = (a.reshape(n, groups, c // groups) for a in (shift, mean, m2))
    stats = _combine(g_shift, g_mean, g_m2, count, axis=2)
    return ScopeStats(mean=stats.mean.reshape(n, c), var=stats.var.reshape(n, c))


class BatchStats(NamedTuple):
    """The bn scope's batch mean and variance, per channel (absolute values)."""

    mean: Array
    var: Array


def update_running_average(running: Array, batch: Array, momentum: float) -> Array:
    """Flax's EMA rule: ``momentum * running + (1 - momentum) * batch``."""
    return momentum * running + (1.0 - momentum) * batch.astype(running.dtype)


# --------------------------------------------------------------------------
# Blend and normalize.
# --------------------------------------------------------------------------


def mixing_weights_from_logits(logits: Array) -> Array:
    """softmax over a layer's logits: the weight of each normalizer."""
    return jax.nn.softmax(jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32)))


def blend(stats: Sequence[ScopeStats], mean_weights: Array, var_weights: Array) -> ScopeStats:
    """mix_mean = sum_k w_mean_k * mean_k,  mix_var = sum_k w_var_k * var_k."""
    mix_mean = sum(w * s.mean for w, s in zip(mean_weights, stats, strict=True))
    mix_var = sum(w * s.var for w, s in zip(var_weights, stats, strict=True))
    return ScopeStats(mean=mix_mean, var=mix_var)


def switch_norm(
    x: Array,
    mean_logits: Array,
    var_logits: Array,
    *,
    scale: Array | None = None,
    bias: Array | None = None,
    normalizers: Sequence[str] = NORMALIZERS,
    num_groups: int | None = None,
    group_size: int | None = None,
    epsilon: float = 1e-5,
    use_running_average: bool = False,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> tuple[Array, BatchStats | None]:
    """Switchable Normalization of a channels-last array (Luo et al., ICLR 2019).

    ::

        y = scale * (x - mu) / sqrt(var + epsilon) + bias
        mu  = sum_k softmax(mean_logits)_k * mu_k
        var = sum_k softmax(var_logits)_k  * var_k      k in normalizers

    Important details:

    * One pass over x gives per-(n, c) shifted sums
      (:func:`switchnorm._vjp.shifted_sums`);
      bn, in, ln and gn statistics are merged from those (N, C)-sized arrays
      with the parallel-variance rule (:func:`_combine`), never with
      ``E[x^2] - E[x]^2`` on raw data.
    * Reductions and the normalize step run in float32 for half-precision
      input (float64 stays float64); the output has ``dtype``, by default
      the input's dtype.
    * With ``use_running_average`` only the bn term changes: it uses
      ``running_mean`` / ``running_var``; in, ln and gn are always per sample.
    * With ``axis_name`` the bn statistics span that named axis (``shard_map``,
      ``pmap``), as in ``flax.linen.BatchNorm``; in, ln and gn stay local.
    * The gradient is a ``jax.custom_vjp`` (:mod:`switchnorm._vjp`) whose
      backward pass reads x and dy in one reduction pass and one elementwise
      pass, like the forward. Reverse mode of any order works; forward mode
      (``jax.jvp``, ``jax.jacfwd``) needs :func:`switch_norm_autodiff`.

    Args:
      x: input of shape (N, *spatial, C), rank >= 2, floating point.
      mean_logits: (len(normalizers),) logits of the mean weights.
      var_logits: (len(normalizers),) logits of the variance weights.
      scale: optional (C,) multiplier (gamma).
      bias: optional (C,) offset (beta).
      normalizers: names from ("bn", "in", "ln", "gn"); their order is the
        order of the logits.
      num_groups: gn group count; ``None`` chooses :func:`default_num_groups`.
      group_size: gn channels per group; give this or ``num_groups``.
      epsilon: added to the mixed variance.
      use_running_average: use the running averages for the bn term.
      running_mean: (C,) running mean, needed for inference with "bn".
      running_var: (C,) running variance, needed for inference with "bn".
      axis_name: named axis over which bn statistics are combined.
      axis_index_groups: subsets of devices along ``axis_name`` to combine.
      dtype: dtype of the output; ``None`` keeps the input's dtype.

    Returns:
      ``(y, batch_stats)``: the normalized array and the bn scope's batch mean
      and variance per channel, for the running averages (``None`` when "bn"
      is not used or ``use_running_average`` is true).
    """
    return _switch_norm(
        x,
        mean_logits,
        var_logits,
        scale=scale,
        bias=bias,
        normalizers=normalizers,
        num_groups=num_groups,
        group_size=group_size,
        epsilon=epsilon,
        use_running_average=use_running_average,
        running_mean=running_mean,
        running_var=running_var,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        custom_gradient=True,
    )


def switch_norm_autodiff(*args: Any, **kwargs: Any) -> tuple[Array, BatchStats | None]:
    """:func:`switch_norm` with JAX autodiff in place of its custom VJP.

    The same forward computation, differentiated by JAX (forward mode
    included). Tests use it as the reference the custom VJP must reproduce.
    """
    return _switch_norm(*args, custom_gradient=False, **kwargs)


def _switch_norm(
    x: Array,
    mean_logits: Array,
    var_logits: Array,
    *,
    scale: Array | None = None,
    bias: Array | None = None,
    normalizers: Sequence[str] = NORMALIZERS,
    num_groups: int | None = None,
    group_size: int | None = None,
    epsilon: float = 1e-5,
    use_running_average: bool = False,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    custom_gradient: bool = True,
) -> tuple[Array, BatchStats | None]:
    normalizers = validate_normalizers(normalizers)
    check_input(x, normalizers)
    num_channels = x.shape[-1]
    groups = resolve_num_groups(num_channels, num_groups, group_size) if "gn" in normalizers else 1
    for name, logits in (("mean_logits", mean_logits), ("var_logits", var_logits)):
        if jnp.shape(logits) != (len(normalizers),):
            raise ValueError(
                f"{name} has shape {jnp.shape(logits)}, expected ({len(normalizers)},) "
                f"for normalizers {normalizers}."
            )
    if use_running_average and "bn" in normalizers and (running_mean is None or running_var is None):
        raise ValueError("use_running_average=True with 'bn' needs running_mean and running_var.")
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out_dtype = x.dtype if dtype is None else dtype
    graph = functools.partial(
        cell_graph,
        normalizers=normalizers,
        num_groups=groups,
        epsilon=epsilon,
        use_running_average=use_running_average,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        compute_dtype=compute_dtype,
    )
    inputs = GraphInputs(
        mean_logits=jnp.asarray(mean_logits),
        var_logits=jnp.asarray(var_logits),
        scale=scale,
        running_mean=running_mean if use_running_average and "bn" in normalizers else None,
        running_var=running_var if use_running_average and "bn" in normalizers else None,
    )
    normalize_fn = _vjp.switch_norm_vjp if custom_gradient else _vjp.switch_norm_autodiff
    return normalize_fn(graph, compute_dtype, out_dtype, x, inputs, bias)


class GraphInputs(NamedTuple):
    """The small parameters of the layer: everything but x and bias."""

    mean_logits: Array
    var_logits: Array
    scale: Array | None
    running_mean: Array | None
    running_var: Array | None


def cell_graph(
    shift: Array,
    s1: Array,
    s2: Array,
    count: int,
    inputs: GraphInputs,
    *,
    normalizers: tuple[str, ...],
    num_groups: int,
    epsilon: float,
    use_running_average: bool,
    axis_name: Any,
    axis_index_groups: Any,
    compute_dtype: Any,
) -> tuple[Array, Array, BatchStats | None]:
    """Everything between the two passes over x, on (N, C)-sized arrays only.

    From the shifted sums ``s1 = sum_s (x - K)``, ``s2 = sum_s (x - K)^2`` of
    every (n, c) cell (K = ``shift``, a constant) to the two per-cell numbers
    the normalize pass needs, ``y = ((x - K) - mix_mean) * a + bias``:

    * ``mix_mean``: the blended mean, relative to K;
    * ``a = scale / sqrt(mix_var + epsilon)``;

    and the bn scope's batch mean and variance for the running averages
    (``None`` without "bn" or with ``use_running_average``). The backward
    pass differentiates this function alone (see :mod:`switchnorm._vjp`).
    """
    mean = s1 / count
    m2 = jnp.maximum(s2 - s1 * mean, 0.0)
    cells = CellStats(shift=shift, mean=mean, m2=m2, count=count)
    stats, batch_stats = [], None
    for name in normalizers:
        if name == "bn" and use_running_average:
            stats.append(
                ScopeStats(
                    mean=inputs.running_mean.astype(compute_dtype)[None, :] - shift,
                    var=jnp.broadcast_to(inputs.running_var.astype(compute_dtype), mean.shape),
                )
            )
            continue
        scope = scope_stats(
            cells,
            name,
            num_groups=num_groups,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        if name == "bn":
            batch_mean = (shift + scope.mean)[0]
            if axis_name is not None:
                # shift is per device, so this sum can differ in the last bit
                # between devices and is not typed as replicated; one pmean
                # of C values makes the running mean identical everywhere
                # (shard_map out_specs=P() accepts it, as with nn.BatchNorm).
                batch_mean = lax.pmean(batch_mean, axis_name, axis_index_groups=axis_index_groups)
            batch_stats = BatchStats(mean=batch_mean, var=scope.var[0])
        stats.append(scope)

    # Both softmaxes as the rows of one (2, K) array: one set of small kernels.
    mean_weights, var_weights = mixing_weights_from_logits(
        jnp.stack([inputs.mean_logits, inputs.var_logits])
    ).astype(compute_dtype)
    mixed = blend(stats, mean_weights, var_weights)
    a = lax.rsqrt(mixed.var + epsilon)
    if inputs.scale is not None:
        a = a * inputs.scale.astype(compute_dtype)
    return mixed.mean, a, batch_stats
