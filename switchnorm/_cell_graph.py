"""Everything between the two passes over x: from cell sums to the blend, on (N, C) arrays.

Important details:

* The graph sees only (N, C)-sized arrays: the statistics pass's sums in,
  the blended mean and the factor ``a = scale / sqrt(mix_var + epsilon)`` of
  every cell out (docs/design.md, "The blend and the normalization"). The
  custom backward pass differentiates this function alone with plain JAX
  autodiff ("The backward pass").
* Both softmaxes are the rows of one (2, K) array: one set of small kernels.
  With ``mixing="sparsestmax"`` the rows go through sparsestmax at the
  layer's radius instead (docs/design.md, "Sparse selection"); plain
  autodiff differentiates it like the rest of the graph. With
  ``weights="channel"`` or ``"sample"`` the rows are (K, C) or per sample
  (:mod:`switchnorm._mixing`, docs/design.md, "Finer weights: per channel
  and per sample").
* With ``use_running_average`` only the bn term changes, to the running
  averages; in, ln and gn always use each sample's own statistics ("Running
  averages and inference").
* Reductions run in ``compute_dtype``: float32 for half-precision input,
  float64 for float64 ("Numerics: dtypes, range, empty input").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._mixing import blend_weights, sample_descriptors
from switchnorm._stats import BatchStats, CellStats, ScopeStats, cell_stats, scope_stats, unstack

Array = jax.Array


def blend(stats: Sequence[ScopeStats], mean_weights: Array, var_weights: Array) -> ScopeStats:
    """mix_mean = sum_k w_mean_k * mean_k,  mix_var = sum_k w_var_k * var_k."""
    mix_mean = functools.reduce(
        jnp.add, [w * s.mean for w, s in zip(unstack(mean_weights), stats, strict=True)]
    )
    mix_var = functools.reduce(jnp.add, [w * s.var for w, s in zip(unstack(var_weights), stats, strict=True)])
    return ScopeStats(mean=mix_mean, var=mix_var)


class GraphInputs(NamedTuple):
    """The small differentiable inputs of the layer: everything but x and bias."""

    mean_logits: Array
    var_logits: Array
    scale: Array | None
    running_mean: Array | None
    running_var: Array | None
    radius: Array | None = None  # sparsestmax's radius (a scalar); None with softmax
    sample_map: Array | None = None  # (2, 2K, K) with weights="sample"; None otherwise


class GraphConfig(NamedTuple):
    """The layer's static configuration (already checked), as the cell graph needs it."""

    normalizers: tuple[str, ...]
    num_groups: int
    epsilon: float
    use_running_average: bool
    axis_name: Any
    axis_index_groups: Any
    mixing: str = "softmax"
    weights: str = "layer"


def batch_stats_of(scope: ScopeStats, shift: Array, config: GraphConfig) -> BatchStats:
    """The bn scope's absolute batch mean and variance per channel, for the running averages."""
    batch_mean = (shift + scope.mean)[0]
    if config.axis_name is not None:
        # shift is per device, so this sum can differ in the last bit between
        # devices and is not typed as replicated; one pmean of C values makes
        # the running mean identical everywhere (shard_map out_specs=P()
        # accepts it, as with nn.BatchNorm).
        batch_mean = lax.pmean(batch_mean, config.axis_name, axis_index_groups=config.axis_index_groups)
    return BatchStats(mean=batch_mean, var=scope.var[0])


def running_scope(inputs: GraphInputs, shift: Array, compute_dtype: Any) -> ScopeStats:
    """The bn term in inference: the running averages, the mean relative to ``shift``, (1, C)-shaped."""
    # switch_norm raises without both running averages; the NNX and Linen layers always hold them with bn.
    assert inputs.running_mean is not None and inputs.running_var is not None
    return ScopeStats(
        mean=inputs.running_mean.astype(compute_dtype)[None, :] - shift,
        var=inputs.running_var.astype(compute_dtype)[None, :],
    )


def normalizer_stats(
    config: GraphConfig, compute_dtype: Any, cells: CellStats, inputs: GraphInputs
) -> list[ScopeStats]:
    """Every normalizer's statistics on the cells; bn's are the running averages in inference."""
    return [
        running_scope(inputs, cells.shift, compute_dtype)
        if name == "bn" and config.use_running_average
        else scope_stats(
            cells,
            name,
            num_groups=config.num_groups,
            axis_name=config.axis_name,
            axis_index_groups=config.axis_index_groups,
        )
        for name in config.normalizers
    ]


def blend_weights_of(
    config: GraphConfig,
    compute_dtype: Any,
    stats: Sequence[ScopeStats],
    inputs: GraphInputs,
    cells: CellStats | None = None,
    cell_size: Array | int = 1,
) -> Array:
    """(2, K, ...): the mean and variance weights, per layer, channel or sample (:mod:`switchnorm._mixing`).

    ``cells``, the samples' own statistics, and ``cell_size``, the elements per
    cell (an (N, C) array of counts under a mask), are needed with ``weights="sample"`` only.
    """
    descriptors = None
    if config.weights == "sample":
        assert cells is not None
        descriptors = sample_descriptors(cells, stats, config.epsilon, cell_size)
    return blend_weights(
        config.weights,
        config.mixing,
        jnp.stack([inputs.mean_logits, inputs.var_logits]),
        inputs.radius,
        inputs.sample_map,
        descriptors,
    ).astype(compute_dtype)


def mixed_mean_and_factor(
    config: GraphConfig,
    compute_dtype: Any,
    stats: Sequence[ScopeStats],
    inputs: GraphInputs,
    cells: CellStats | None = None,
    cell_size: Array | int = 1,
) -> tuple[Array, Array]:
    """The blend of the normalizers' statistics: ``(mix_mean, a = scale / sqrt(mix_var + epsilon))``.

    ``stats`` may be of any shapes that broadcast together (the (N, C) path
    hands over (1, C) and (N, 1) statistics); so are the results. ``cells`` and
    ``cell_size`` as :func:`blend_weights_of`.
    """
    mean_weights, var_weights = unstack(
        blend_weights_of(config, compute_dtype, stats, inputs, cells, cell_size)
    )
    mixed = blend(stats, mean_weights, var_weights)
    a = lax.rsqrt(mixed.var + config.epsilon)
    if inputs.scale is not None:
        a = a * inputs.scale.astype(compute_dtype)
    return mixed.mean, a


def cell_graph(
    config: GraphConfig,
    compute_dtype: Any,
    shift: Array,
    inverse_unit: Array,
    s1: Array,
    s2: Array,
    count: Array | int,
    inputs: GraphInputs,
) -> tuple[Array, Array, BatchStats | None]:
    """From the cell sums to ``(mix_mean, a, batch_stats)``.

    ``s1``, ``s2`` are the statistics pass's scaled shifted sums of every
    (n, c) cell (K = ``shift``, see :func:`switchnorm._stats.cell_stats`);
    the normalize pass needs ``y = ((x - K) - mix_mean) * a + bias`` with

    * ``mix_mean``: the blended mean, relative to K;
    * ``a = scale / sqrt(mix_var + epsilon)``;

    ``batch_stats`` is the bn scope's batch mean and variance for the running
    averages (``None`` without "bn" or with ``use_running_average``).
    ``count`` is the elements per cell, or with a call-time mask each cell's
    (N, C) count of masked-in elements (:func:`switchnorm._stats.cell_stats`).
    """
    cells = cell_stats(shift, inverse_unit, s1, s2, count)
    stats = normalizer_stats(config, compute_dtype, cells, inputs)
    batch_stats = None
    if "bn" in config.normalizers and not config.use_running_average:
        batch_stats = batch_stats_of(stats[config.normalizers.index("bn")], shift, config)
    mix_mean, a = mixed_mean_and_factor(config, compute_dtype, stats, inputs, cells, count)
    return jnp.broadcast_to(mix_mean, shift.shape), jnp.broadcast_to(a, shift.shape), batch_stats


def graph_for(
    config: GraphConfig, compute_dtype: Any
) -> Callable[..., tuple[Array, Array, BatchStats | None]]:
    """``cell_graph`` with this configuration, traced once per input shape and reused.

    Every call of the layer traces the cell graph in its forward pass and again,
    with its VJP, in the backward pass, and a network's layers of equal (N, C)
    shapes trace the same graph over and over: Python tracing was about a third
    of SwitchNorm's share of a ResNet train step's compile time. As a nested
    ``jax.jit`` the graph's trace is cached by its configuration and input types
    (one trace for the forward passes and one for the backward passes of all
    equal layers); JAX lowers a repeated jaxpr once and XLA inlines it, so the
    compiled program is unchanged. A configuration that cannot be hashed
    (``axis_index_groups`` given as lists) is traced every time, as before.
    """
    try:
        return _jitted_graph(config, jnp.dtype(compute_dtype))
    except TypeError:  # unhashable configuration
        return functools.partial(cell_graph, config, compute_dtype)


@functools.lru_cache(maxsize=64)
def _jitted_graph(
    config: GraphConfig, compute_dtype: Any
) -> Callable[..., tuple[Array, Array, BatchStats | None]]:
    """The jitted graphs of one configuration: ``count`` static where it is an int, traced where an array."""

    def graph(shift, inverse_unit, s1, s2, count, inputs):
        return cell_graph(config, compute_dtype, shift, inverse_unit, s1, s2, count, inputs)

    by_array, by_int = jax.jit(graph), jax.jit(graph, static_argnums=4)

    def dispatch(shift, inverse_unit, s1, s2, count, inputs):
        return (by_int if isinstance(count, int) else by_array)(shift, inverse_unit, s1, s2, count, inputs)

    return dispatch
