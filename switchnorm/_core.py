"""The functional core of Switchable Normalization: arrays in, arrays out, no Flax.

Data flows one way, one module per step::

    x --shifted_sums---> per-cell scaled sums of x - K, (x - K)^2     (_passes.py, one pass)
      --cell_graph-----> cell and scope statistics, the blend,         (_stats.py, _cell_graph.py:
                         a = scale / sqrt(mixed var + eps)              (N, C) arrays only)
      --normalize_pass-> y = ((x - K) - mixed mean) * a + bias         (_passes.py, one pass)

(N, C) input, with one element per cell, skips the cell graph: each normalizer's
statistics come from sums of x over its scope (_dense.py).

Important details:

* :func:`switch_norm` checks its arguments once, at trace time
  (:mod:`switchnorm._arguments`), then calls :func:`normalize_checked`. The
  Flax front ends check at construction what they can, check the input at
  each call, and call :func:`normalize_checked` themselves, so no check runs
  twice in one call.
* Empty input (N = 0 or a spatial size of 0) returns an empty output, as
  Flax's BatchNorm does, and no batch statistics, so running averages stay
  as they are (docs/design.md, "Numerics: dtypes, range, empty input").
* Both Flax front ends (:mod:`switchnorm.nnx`, :mod:`switchnorm.linen`)
  only hold parameters and state; all the math is behind this module.

:func:`switch_norm` is long only in its docstring, the functional API's
reference; its body is the checks and one call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from switchnorm import _arguments, _mixing, _passes
from switchnorm._arguments import NORMALIZERS
from switchnorm._cell_graph import GraphConfig, GraphInputs, graph_for
from switchnorm._dense import normalize_dense
from switchnorm._sparsestmax import _checked_radius
from switchnorm._stats import BatchStats

Array = jax.Array


class LayerArrays(NamedTuple):
    """The layer's arrays besides x: parameters, and running averages for inference."""

    mean_logits: Array
    var_logits: Array
    scale: Array | None = None
    bias: Array | None = None
    running_mean: Array | None = None
    running_var: Array | None = None
    radius: Array | float = 0.0  # read only with mixing="sparsestmax"
    sample_map: Array | None = None  # (2, 2K, K), read only with weights="sample"


def graph_inputs(config: GraphConfig, arrays: LayerArrays, compute_dtype: Any) -> GraphInputs:
    """The cell graph's inputs from the layer's arrays: only those ``config`` reads."""
    uses_running = config.use_running_average and "bn" in config.normalizers
    return GraphInputs(
        mean_logits=jnp.asarray(arrays.mean_logits),
        var_logits=jnp.asarray(arrays.var_logits),
        scale=arrays.scale,
        running_mean=arrays.running_mean if uses_running else None,
        running_var=arrays.running_var if uses_running else None,
        radius=jnp.asarray(arrays.radius, compute_dtype) if config.mixing == "sparsestmax" else None,
        sample_map=jnp.asarray(arrays.sample_map) if config.weights == "sample" else None,
    )


def promote_arrays(
    promote_dtype: Any, x: Array, arrays: LayerArrays, dtype: Any
) -> tuple[Array, LayerArrays]:
    """``x`` and the arrays ``nnx.BatchNorm`` promotes, through ``promote_dtype`` if one is given.

    ``promote_dtype((x, mean, var, scale, bias), dtype=dtype)`` as in ``nnx.BatchNorm``
    (None casts nothing). The running averages promoted are what inference reads;
    the updates, as in ``nnx.BatchNorm``, go to the stored averages.
    """
    if promote_dtype is None:
        return x, arrays
    x, mean, var, scale, bias = promote_dtype(
        (x, arrays.running_mean, arrays.running_var, arrays.scale, arrays.bias), dtype=dtype
    )
    return x, arrays._replace(running_mean=mean, running_var=var, scale=scale, bias=bias)


def normalize_checked(
    config: GraphConfig,
    x: Array,
    arrays: LayerArrays,
    dtype: Any = None,
    use_custom_vjp: bool = True,
    mask: Array | None = None,
) -> tuple[Array, BatchStats | None]:
    """:func:`switch_norm` on arguments already checked (``config``, the shapes, ``mask``)."""
    out_dtype = x.dtype if dtype is None else dtype
    if x.size == 0:  # nothing to normalize, and no batch statistics to report
        return jnp.zeros(x.shape, out_dtype), None
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    inputs = graph_inputs(config, arrays, compute_dtype)
    graph = graph_for(config, compute_dtype)
    normalize = _passes.normalize if use_custom_vjp else _passes.normalize_autodiff
    general = functools.partial(normalize, graph, compute_dtype, out_dtype)
    if mask is not None:  # cells of unequal counts: the general path's weighted merges
        return general(x, inputs, arrays.bias, mask)
    if x.ndim == 2 and config.axis_name is None:  # one element per cell: no cell graph needed
        return normalize_dense(config, compute_dtype, out_dtype, x, inputs, arrays.bias, use_custom_vjp)
    return general(x, inputs, arrays.bias, None)


def _check_arrays(arrays: LayerArrays, normalizers: tuple[str, ...], num_channels: int, weights: str) -> None:
    """Shapes of the logits (and the sample map), of scale and bias, and of the running averages."""
    for name in ("mean_logits", "var_logits"):
        want = _mixing.logits_shape(weights, len(normalizers), num_channels)
        why = f"for normalizers {normalizers} with weights={weights!r}"
        _arguments.check_shape(name, getattr(arrays, name), want, why)
    if weights == "sample":
        if arrays.sample_map is None:
            raise ValueError(
                "weights='sample' needs sample_map, the (2, 2K, K) map from each sample's descriptors "
                "to its logits; zeros start every sample at the layer's logits."
            )
        want = _mixing.sample_map_shape(len(normalizers))
        _arguments.check_shape("sample_map", arrays.sample_map, want, f"for normalizers {normalizers}")
    for name in ("scale", "bias", "running_mean", "running_var"):
        want = (num_channels,)
        _arguments.check_shape(name, getattr(arrays, name), want, f"for an input of {num_channels} channels")


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
    use_custom_vjp: bool = True,
    mixing: str = "softmax",
    radius: Array | float = 0.0,
    weights: str = "layer",
    sample_map: Array | None = None,
    mask: Array | None = None,
) -> tuple[Array, BatchStats | None]:
    """Switchable Normalization of a channels-last array (Luo et al., ICLR 2019).

    ::

        y = scale * (x - mu) / sqrt(var + epsilon) + bias
        mu  = sum_k softmax(mean_logits)_k * mu_k
        var = sum_k softmax(var_logits)_k  * var_k      k in normalizers

    With ``mixing="sparsestmax"`` both softmaxes become ``sparsestmax(logits, radius)``
    (Sparse Switchable Normalization, Shao et al., CVPR 2019): sparse weights, one-hot from
    ``radius >= sqrt(1 - 1/K)`` on (docs/design.md, "Sparse selection").

    Important details:

    * One pass over x gives per-(n, c) shifted sums; bn, in, ln and gn
      statistics are merged from those (N, C)-sized arrays through their
      moments about each scope's first cell's mean, never with
      ``E[x^2] - E[x]^2`` on raw data (docs/design.md, "One pass: shifted
      sums per cell" and "Merging cells: moments about the first cell's
      mean"). Float32 input with mean 1e4 and std 1 normalizes within 1e-3
      of float64.
    * Reductions and the normalize step run in float32 for half-precision
      input (float64 stays float64); the output has ``dtype``, by default
      the input's dtype.
    * Range: where the raw sums overflow, the statistics pass is taken
      again in units of a power of two near each cell's first element, so
      the output and the batch statistics stay finite and accurate
      wherever the variance itself is representable (float32 data with std
      up to about 1e19). Gradients are accurate to a std of about 1e12 in
      float32 (1e100 in float64): beyond, d rsqrt(v) / dv = -v^-1.5 / 2
      underflows and the variance's part of the gradient is lost, under the
      custom VJP and plain autodiff alike ("Numerics: dtypes, range, empty
      input").
    * With ``use_running_average`` only the bn term changes: it uses
      ``running_mean`` / ``running_var``; in, ln and gn are always per sample.
    * With ``axis_name`` the bn statistics span that named axis (``shard_map``,
      ``pmap``), as in ``flax.linen.BatchNorm``; in, ln and gn stay local.
    * The gradient is a ``jax.custom_vjp`` whose backward pass reads x and dy
      in one reduction pass and one elementwise pass, like the forward
      ("The backward pass"). Reverse mode of any order works; forward mode
      (``jax.jvp``, ``jax.jacfwd``) needs ``use_custom_vjp=False``.
    * Empty input (N = 0 or a spatial size of 0) gives an empty output and
      ``batch_stats=None``.
    * ``mask``, as in Flax's BatchNorm, LayerNorm and GroupNorm, restricts
      every normalizer's statistics to the masked-in elements (padded
      sequences); every element is still normalized. Cells are then merged
      weighted by their counts; a scope with no masked-in element gets mean 0
      and variance 0, and under ``axis_name`` bn's statistics are those of the
      masked-in elements of the whole batch (docs/design.md, "Masks").

    Args:
      x: input of shape (N, *spatial, C), rank >= 2, floating point, C >= 1.
      mean_logits: (len(normalizers),) logits of the mean weights; (len(normalizers), C)
        with ``weights="channel"``.
      var_logits: logits of the variance weights, shaped as ``mean_logits``.
      scale: optional (C,) multiplier (gamma).
      bias: optional (C,) offset (beta).
      normalizers: names from ("bn", "in", "ln", "gn"); their order is the
        order of the logits. :func:`switchnorm.default_normalizers` gives the
        layers' default for an input rank.
      num_groups: gn group count; ``None`` chooses
        :func:`switchnorm.default_num_groups`.
      group_size: gn channels per group; give this or ``num_groups``.
      epsilon: added to the mixed variance; a float > 0.
      use_running_average: use the running averages for the bn term.
      running_mean: (C,) running mean, needed for inference with "bn".
      running_var: (C,) running variance, needed for inference with "bn".
      axis_name: named axis over which bn statistics are combined.
      axis_index_groups: subsets of devices along ``axis_name`` to combine.
      dtype: dtype of the output; ``None`` keeps the input's dtype.
      use_custom_vjp: differentiate with the two-pass custom VJP (default,
        faster) or, if False, with plain JAX autodiff of the same forward
        computation (forward mode included).
      mixing: "softmax" (default) or "sparsestmax": how the logits become weights.
      radius: sparsestmax's radius, a scalar >= 0 (float or array, may be traced; see
        :func:`switchnorm.radius_schedule`); ignored with softmax.
      weights: "layer" (default): one blend per layer, logits of shape (K,). "channel": one
        per channel, logits of shape (K, C). "sample": one per sample, the (K,) logits plus
        ``sample_map`` times the sample's descriptors (docs/design.md, "Finer weights").
      sample_map: (2, 2K, K) map of ``weights="sample"`` (mean, variance); zeros give every
        sample the layer's logits. Ignored otherwise.
      mask: optional booleans of a shape that broadcasts to x's: True where an
        element counts towards the statistics.

    Returns:
      ``(y, batch_stats)``: the normalized array and the bn scope's batch mean
      and variance per channel, for the running averages (``None`` when "bn"
      is not used, ``use_running_average`` is true or x is empty).
    """
    normalizers = _arguments.validate_normalizers(normalizers)
    _arguments.check_input(x, normalizers)
    num_channels = x.shape[-1]
    groups = _arguments.resolve_num_groups(num_channels, num_groups, group_size) if "gn" in normalizers else 1
    mixing = _arguments.check_mixing(mixing)
    weights = _arguments.check_weights(weights)
    arrays = LayerArrays(mean_logits, var_logits, scale, bias, running_mean, running_var, radius, sample_map)
    _check_arrays(arrays, normalizers, num_channels, weights)
    if mixing == "sparsestmax":
        _arguments.check_shape("radius", radius, (), "(one radius per layer)")
        _checked_radius(radius)
    if use_running_average and "bn" in normalizers and (running_mean is None or running_var is None):
        raise ValueError("use_running_average=True with 'bn' needs running_mean and running_var.")
    config = GraphConfig(
        normalizers=normalizers,
        num_groups=groups,
        epsilon=_arguments.check_epsilon(epsilon),
        use_running_average=bool(use_running_average),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        mixing=mixing,
        weights=weights,
    )
    mask = _arguments.check_mask(mask, x.shape)
    return normalize_checked(config, x, arrays, dtype, use_custom_vjp, mask)


def switch_norm_autodiff(*args: Any, **kwargs: Any) -> tuple[Array, BatchStats | None]:
    """``switch_norm(..., use_custom_vjp=False)``: the reference the custom VJP is tested against."""
    return switch_norm(*args, use_custom_vjp=False, **kwargs)
