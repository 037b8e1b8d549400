"""The functional core of Switchable Normalization, and the one layer body every front end calls.

Data flows one way::

    x --statistics pass--> per-cell sums of x - K                     (_passes, one pass over x)
      --graph------------> each normalizer's mean and variance,        (_stats, on (N, C) arrays)
                           the blend, a = scale / sqrt(mix_var + eps)  (_mixing for the weights)
      --normalize pass---> y = ((x - K) - mix_mean) * a + bias          (_passes, one pass over x)

Important details:

* The gradient is a ``jax.custom_vjp`` with the forward's shape: one reduction pass over
  (dy, x), the graph's VJP on (N, C) arrays (plain autodiff), one elementwise pass for dx
  (design.md, "The backward pass"). With one element per cell ((N, C) input) the graph is
  as large as x, so there is nothing to save: autodiff differentiates the same forward.
* The passes over x go through :mod:`switchnorm._xla_cpu`, the one seam where the
  computation lowered for XLA:CPU differs from the plain form (same values).
* :func:`layer` is jitted with its configuration static: an eager call runs one compiled
  program (compiled once per shape), and equal layers of a network share one trace.
* Empty input (N = 0 or a spatial size of 0) gives an empty output and no batch
  statistics, so running averages stay as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm import _arguments, _mixing, _passes, _sample_weights, _stats, _xla_cpu
from switchnorm._arguments import NORMALIZERS
from switchnorm._sparsestmax import _checked_radius
from switchnorm._stats import BatchStats, Cells, Stats

Array = jax.Array


class Config(NamedTuple):
    """A layer's static configuration, checked; hashable (it keys the compiled programs)."""

    normalizers: tuple[str, ...]
    num_groups: int = 1
    epsilon: float = 1e-5
    use_running_average: bool = False
    axis_name: Any = None
    axis_index_groups: Any = None
    mixing: str = "softmax"
    weights: str = "layer"


class LayerArrays(NamedTuple):
    """The layer's arrays besides x: parameters, running averages, sparsestmax's radius."""

    mean_logits: Array
    var_logits: Array
    scale: Array | None = None
    bias: Array | None = None
    running_mean: Array | None = None
    running_var: Array | None = None
    radius: Array | float = 0.0  # read only with mixing="sparsestmax"
    sample_map: Array | None = None  # (2, 2K, K), read only with weights="sample"


# -- the graph: from cell statistics to the blend, on (N, C) arrays --------------------------------


def statistics(
    config: Config, cells: Cells, arrays: LayerArrays, means: Callable = _stats.moments
) -> list[Stats]:
    """Every normalizer's statistics on the cells (:mod:`switchnorm._stats`); bn's the running averages in inference.

    ``means`` is :func:`switchnorm._stats.merge`'s: how a scope's two moments are reduced.
    """
    stats = []
    for name in config.normalizers:
        if name == "bn" and config.use_running_average:
            assert arrays.running_mean is not None and arrays.running_var is not None
            stats.append(_stats.running_stats(arrays.running_mean, arrays.running_var, cells.var.dtype))
        else:
            scope = config.num_groups, config.axis_name, config.axis_index_groups
            stats.append(_stats.normalizer_stats(name, cells, *scope, means=means))
    return stats


def _weights(config: Config, cells: Cells, stats: list[Stats], arrays: LayerArrays) -> Array:
    """(2, K, ...): the mean's and the variance's weights (:mod:`switchnorm._mixing`)."""
    descriptors = None
    if config.weights == "sample":
        means = [(_stats.relative(s, cells.shift), s.var) for s in stats]
        descriptors = _mixing.sample_descriptors(cells, means, config.epsilon)
    logits = jnp.stack([jnp.asarray(arrays.mean_logits), jnp.asarray(arrays.var_logits)])
    radius = jnp.asarray(arrays.radius, cells.var.dtype) if config.mixing == "sparsestmax" else None
    weights = _mixing.blend_weights(
        config.weights, config.mixing, logits, radius, arrays.sample_map, descriptors
    )
    return weights.astype(cells.var.dtype)


def mixed(config: Config, cells: Cells, stats: list[Stats], arrays: LayerArrays) -> tuple[Array, Array, Any]:
    """``(mix_mean, a, batch_stats)`` from the normalizers' statistics, on the cells' (N, C).

    ``mix_mean`` is the blended mean relative to each cell's shift, ``a = scale /
    sqrt(mix_var + epsilon)``; ``batch_stats`` bn's batch mean and variance for the running
    averages (None without "bn" or in inference).
    """
    weights = _weights(config, cells, stats, arrays)
    mix_mean, mix_var = _stats.blend(stats, cells.shift, list(weights[0]), list(weights[1]))
    # A variance beyond the dtype's range (float32 std above about 1e19) gives NaN, not y = 0.
    a = jnp.where(jnp.isinf(mix_var), jnp.nan, lax.rsqrt(mix_var + config.epsilon))
    if arrays.scale is not None:
        a = a * arrays.scale.astype(a.dtype)
    batch = None
    if "bn" in config.normalizers and not config.use_running_average:
        batch = _stats.batch_stats(stats[config.normalizers.index("bn")])
    shape = _stats.shape_of(cells)
    return jnp.broadcast_to(mix_mean, shape), jnp.broadcast_to(a, shape), batch


def _graph_of_sums(
    config: Config, sums: _passes.Sums, count: Array | int, arrays: LayerArrays
) -> tuple[Array, Array, Any]:
    """The (N, C) graph between the passes: cell statistics, every normalizer's, the blend."""
    cells = _stats.cell_stats(sums.shift, sums.inverse_unit, sums.s1, sums.s2, count)
    return mixed(config, cells, statistics(config, cells, arrays), arrays)


# -- spatial input: the custom VJP ----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _normalize(config: Config, compute_dtype: Any, out_dtype: Any, x: Array, arrays: LayerArrays, keep: Any):
    """``(y, batch_stats)``: statistics pass, graph, normalize pass; the backward has the same shape."""
    return _forward(config, compute_dtype, out_dtype, x, arrays, keep)[0]


def _forward(config, compute_dtype, out_dtype, x, arrays, keep):
    sums = _xla_cpu.statistics_pass(x, keep, compute_dtype)
    mix_mean, a, batch = _graph_of_sums(config, sums, _passes.counts(keep, x, compute_dtype), arrays)
    y = _xla_cpu.normalize_pass(x, sums.shift, mix_mean, a, arrays.bias, compute_dtype, out_dtype)
    return (y, batch), (x, sums, arrays, keep)


def _backward(config, compute_dtype, out_dtype, residuals, cotangents):
    """One reduction pass over (dy, x), the graph's VJP on (N, C) arrays, one elementwise pass."""
    del out_dtype
    x, sums, arrays, keep = residuals
    dy, batch_bar = cotangents
    # The graph again, cheaper to redo than to keep; its VJP traced here, where the cotangents'
    # types (varying over a shard_map axis, say) are known.
    count = _passes.counts(keep, x, compute_dtype)
    (mix_mean, a, _), graph_vjp = jax.vjp(
        lambda s1, s2, arrays: _graph_of_sums(config, sums._replace(s1=s1, s2=s2), count, arrays),
        sums.s1,
        sums.s2,
        arrays,
    )
    r1, r2, bias_bar = _xla_cpu.backward_sums(dy, x, sums, mix_mean, compute_dtype)
    g1, g2, arrays_bar = graph_vjp((_like(-a * r1, mix_mean), _like(r2, a), batch_bar))
    dx = _xla_cpu.dx_pass(dy, x, sums, a, g1, g2, keep, compute_dtype)
    if arrays.bias is not None:
        arrays_bar = arrays_bar._replace(bias=_like(bias_bar, arrays.bias).astype(arrays.bias.dtype))
    return dx, arrays_bar, None


_normalize.defvjp(_forward, _backward)


def _like(cotangent: Array, primal: Array) -> Array:
    """``cotangent`` summed over the shard_map axes along which it varies and ``primal`` does not.

    A value replicated over a ``shard_map`` axis (a bn-only ``a``, built from ``pmean``-ed
    statistics) gets a cotangent from the local dy that varies: autodiff transposes the
    implicit broadcast into a ``psum``, and so must this VJP.
    """
    extra = _varying(cotangent) - _varying(primal)
    return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _varying(v: Array) -> frozenset:
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()) or ())


def _normalize_autodiff(config, compute_dtype, out_dtype, x, arrays, keep):
    """The same forward, for JAX's autodiff (forward mode included)."""
    return _forward(config, compute_dtype, out_dtype, x, arrays, keep)[0]


# -- (N, C) input: one element per cell -----------------------------------------------------------


def _dense(
    config: Config,
    compute_dtype: Any,
    out_dtype: Any,
    x: Array,
    arrays: LayerArrays,
    keep: Any,
    steered: bool,
):
    """(N, C) input: the same statistics and blend on cells of one element, differentiated by autodiff.

    Each element is a cell of its own and its own shift (0 where masked out), so that no
    mean near 1e4 is subtracted from x in float32, and each scope's reductions read x
    through a difference of their own. On the CPU each scope is first taken in absolute
    terms, from reductions of x itself (:func:`switchnorm._xla_cpu.dense`), unless not
    ``steered``: that choice is differentiated by a custom VJP, which forward mode cannot
    differentiate.
    """
    kept = None if keep is None else keep[:, 0, :]

    def cells_of(x: Array, absolute: bool) -> Cells:  # x in its own dtype; variances in the compute dtype
        zero = jnp.zeros((), compute_dtype)
        if absolute:
            return Cells(None, x, zero, 1)
        if kept is None:
            return Cells(x, zero, zero, 1)
        count = jnp.broadcast_to(kept, x.shape).astype(compute_dtype)
        return Cells(jnp.where(kept, x, 0.0), zero, zero, count)  # an empty cell: shift and mean 0

    def normalized(stats: list[Stats] | None, operands: tuple, absolute: bool = False) -> tuple[Array, Any]:
        x, arrays = operands
        cells = cells_of(x, absolute)
        if stats is None:
            stats = statistics(config, cells, arrays, _xla_cpu.scope_moments)
        mix_mean, a, batch = mixed(config, cells, stats, arrays)
        y = ((x.astype(compute_dtype) if absolute else x - cells.shift) - mix_mean) * a
        if arrays.bias is not None:
            y = y + arrays.bias.astype(y.dtype)
        return y.astype(out_dtype), batch

    relative = functools.partial(normalized, None)
    if keep is not None or config.axis_name is not None or not steered:  # counts, devices, forward mode
        return relative((x, arrays))
    absolute = functools.partial(statistics, config, cells_of(x, True), arrays, _xla_cpu.scope_moments)
    of_x = [not (name == "bn" and config.use_running_average) for name in config.normalizers]
    return _xla_cpu.dense(absolute, functools.partial(normalized, absolute=True), relative, (x, arrays), of_x)


# -- the functional API ---------------------------------------------------------------------------


def normalize(
    config: Config, dtype: Any, use_custom_vjp: bool, x: Array, arrays: LayerArrays, mask: Array | None
) -> tuple[Array, BatchStats | None]:
    """``switch_norm`` on checked arguments: ``config``, channels-last ``x``, and a mask of x's rank."""
    out_dtype = x.dtype if dtype is None else dtype
    if x.size == 0:
        return jnp.zeros(x.shape, out_dtype), None
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    keep = _passes.mask_cells(mask, x)
    if _passes.cell_size(x) == 1:
        return _dense(config, compute_dtype, out_dtype, x, arrays, keep, steered=use_custom_vjp)
    normalize_ = _normalize if use_custom_vjp else _normalize_autodiff
    return normalize_(config, compute_dtype, out_dtype, x, arrays, keep)


def check_arrays(arrays: LayerArrays, normalizers: tuple[str, ...], num_channels: int, weights: str) -> None:
    """Shapes of the logits (and the sample map), of scale and bias, and of the running averages."""
    for name in ("mean_logits", "var_logits"):
        want = _mixing.logits_shape(weights, len(normalizers), num_channels)
        _arguments.check_shape(
            name, getattr(arrays, name), want, f"for normalizers {normalizers} with weights={weights!r}"
        )
    if weights == "sample":
        if arrays.sample_map is None:
            raise ValueError(
                "weights='sample' needs sample_map, the (2, 2K, K) map from each sample's descriptors "
                "to its logits; zeros start every sample at the layer's logits."
            )
        _arguments.check_shape(
            "sample_map",
            arrays.sample_map,
            _mixing.sample_map_shape(len(normalizers)),
            f"for normalizers {normalizers}",
        )
    for name in ("scale", "bias", "running_mean", "running_var"):
        _arguments.check_shape(
            name, getattr(arrays, name), (num_channels,), f"for an input of {num_channels} channels"
        )


def _hashable(config: Config) -> Config:
    """``config`` with ``axis_index_groups`` as tuples, so that it can key the compiled programs."""
    groups = config.axis_index_groups
    if groups is not None:
        groups = tuple(tuple(int(i) for i in group) for group in groups)
    return config._replace(axis_index_groups=groups)


def _compiled(fn: Callable, jitted: Callable, *static: Any) -> Callable:
    """``jitted`` (``fn`` with ``static`` as its first, static arguments) where ``static`` hashes, else ``fn``.

    The compiled program is cached by those arguments and the arrays' shapes: an eager
    call compiles nothing after the first, and equal layers share one trace. An
    ``axis_name`` that cannot be hashed is traced at every call instead.
    """
    try:
        hash(static)
    except TypeError:
        return functools.partial(fn, *static)
    return functools.partial(jitted, *static)


_normalize_jit = jax.jit(normalize, static_argnums=(0, 1, 2))


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
    epsilon: float | None = None,
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

    with mu_k and var_k the mean and biased variance of normalizer k: bn over the
    batch and space, in over space, ln over space and channels, gn over space and
    a group of channels (docs/design.md, section 1). With ``mixing="sparsestmax"``
    both softmaxes become ``sparsestmax(logits, radius)`` (Sparse Switchable
    Normalization, Shao et al., CVPR 2019): one-hot from ``radius >= sqrt(1 - 1/K)``.

    Important details:

    * One pass over x gives every (sample, channel) cell's sums relative to the
      cell's first element; every normalizer's statistics are merged from those
      (N, C) arrays about the scope's first cell, never with ``E[x^2] - E[x]^2``
      on raw data: float32 input with mean 1e4 and std 1 normalizes within 1e-3
      of float64 (design.md, sections 2 and 3).
    * Reductions and the normalize step run in float32 for half-precision input
      (float64 stays float64); the output has ``dtype``, by default x's.
    * Range: sums are taken in units of a power of two near each cell's first
      element, so outputs and statistics stay finite wherever the variance is
      (float32 data with std up to about 1e19); beyond, the output is NaN where the
      blended variance overflows, and bn's variance is infinite. Gradients lose the variance's
      part beyond a std of about 1e12 in float32 (design.md, section 8).
    * In inference (``use_running_average``) only bn changes, to the running
      averages; in, ln and gn always use each sample's own statistics.
    * ``axis_name``: bn's statistics span that named axis (``shard_map``, ``pmap``),
      as in ``flax.linen.BatchNorm``; in, ln and gn stay local.
    * The gradient is a ``jax.custom_vjp`` with the forward's shape (one reduction
      pass, one elementwise pass). Reverse mode of any order works; forward mode
      (``jax.jvp``) needs ``use_custom_vjp=False``, plain autodiff of the same forward.
    * ``mask``, as in Flax's normalization layers, restricts every statistic to the
      masked-in elements; every element is normalized (design.md, "Masks").
    * Empty input (N = 0 or a spatial size of 0) gives an empty output and
      ``batch_stats=None``.

    Args:
      x: input of shape (N, *spatial, C), rank >= 2, floating point, C >= 1.
      mean_logits: (K,) logits of the mean weights, K = len(normalizers); (K, C) with
        ``weights="channel"``.
      var_logits: logits of the variance weights, shaped as ``mean_logits``.
      scale: optional (C,) multiplier (gamma).
      bias: optional (C,) offset (beta).
      normalizers: names from ("bn", "in", "ln", "gn"), in the order of the logits;
        :func:`switchnorm.default_normalizers` gives the layers' default for a rank.
      num_groups: gn's group count; None: :func:`switchnorm.default_num_groups` (32, as Flax's
        GroupNorm, for gn alone).
      group_size: gn's channels per group; give this or ``num_groups``.
      epsilon: added to the mixed variance; a float > 0. None: 1e-5 for a blend, the Flax
        layer's default for one normalizer (1e-6 for in, ln and gn).
      use_running_average: use the running averages for the bn term.
      running_mean: (C,) running mean, needed for inference with "bn".
      running_var: (C,) running variance, needed for inference with "bn".
      axis_name: named axis over which bn's statistics are combined.
      axis_index_groups: subsets of devices along ``axis_name`` to combine.
      dtype: dtype of the output; None keeps x's.
      use_custom_vjp: the custom VJP (default), or plain autodiff of the same forward if False (forward mode).
      mixing: "softmax" (default) or "sparsestmax".
      radius: sparsestmax's radius, a scalar >= 0 (may be traced; see
        :func:`switchnorm.radius_schedule`); ignored with softmax.
      weights: "layer" (default): one blend per layer, logits (K,); "channel": one per
        channel, logits (K, C); "sample": one per sample, the (K,) logits plus
        ``sample_map`` times the sample's descriptors (design.md, "Finer weights").
      sample_map: (2, 2K, K) map of ``weights="sample"``; zeros start every sample at
        the layer's logits.
      mask: optional booleans broadcastable to x: True where an element counts
        towards the statistics.

    Returns:
      ``(y, batch_stats)``: the normalized array, and bn's batch mean and variance per
      channel for the running averages (None without "bn", in inference, or for empty x).

    Example::

      >>> import jax.numpy as jnp
      >>> import switchnorm
      >>> x = jnp.arange(24.0).reshape(2, 3, 4)
      >>> y, stats = switchnorm.switch_norm(x, jnp.zeros(4), jnp.zeros(4), num_groups=2)
      >>> y.shape, stats.mean.shape
      ((2, 3, 4), (4,))
    """
    normalizers = _arguments.validate_normalizers(normalizers)
    _arguments.check_input(x, normalizers)
    channels = x.shape[-1]
    groups = 1
    if "gn" in normalizers:
        groups = _arguments.resolve_num_groups(channels, num_groups, group_size, normalizers)
    weights = _arguments.check_weights(weights)
    arrays = LayerArrays(mean_logits, var_logits, scale, bias, running_mean, running_var, radius, sample_map)
    check_arrays(arrays, normalizers, channels, weights)
    config = Config(
        normalizers,
        groups,
        _arguments.resolve_epsilon(epsilon, normalizers),
        bool(use_running_average),
        axis_name,
        axis_index_groups,
        _arguments.check_mixing(mixing),
        weights,
    )
    if config.mixing == "sparsestmax":
        _arguments.check_shape("radius", radius, (), "(one radius per layer)")
        _checked_radius(radius)
    if use_running_average and "bn" in normalizers and (running_mean is None or running_var is None):
        raise ValueError("use_running_average=True with 'bn' needs running_mean and running_var.")
    mask = _arguments.check_mask(mask, x.shape)
    return _compiled(normalize, _normalize_jit, _hashable(config), dtype, use_custom_vjp)(
        x, _arrays_in(arrays), mask
    )


def _arrays_in(arrays: LayerArrays) -> LayerArrays:
    """The arrays as arrays (a Python radius too): what the compiled programs take."""
    return arrays._replace(radius=jnp.asarray(arrays.radius))


def switch_norm_autodiff(*args: Any, **kwargs: Any) -> tuple[Array, BatchStats | None]:
    """``switch_norm(..., use_custom_vjp=False)``: the reference the custom VJP is tested against."""
    return switch_norm(*args, use_custom_vjp=False, **kwargs)


# -- the layer body every front end calls ---------------------------------------------------------


class LayerSpec(NamedTuple):
    """What a front end's call fixes besides its arrays (static, hashable).

    Attributes:
      config: the layer's configuration, ``normalizers`` those it holds logits for.
      default_normalizers: built with ``normalizers=None``: it holds all four and blends
        ("bn", "ln") on (N, C) input (:func:`switchnorm.default_normalizers`).
      axes: the feature axis or axes, as the layer was given them.
      num_features: the channel count the layer was built for (None: any).
      dtype: the output's dtype (None: x's, after ``promote_dtype``).
      promote_dtype: None, or a function as ``nnx.BatchNorm``'s.
      momentum: the running averages' decay.
    """

    config: Config
    default_normalizers: bool = False
    axes: tuple[int, ...] = (-1,)
    num_features: int | None = None
    dtype: Any = None
    promote_dtype: Any = None
    momentum: float = 0.99


def blended(spec: LayerSpec, rank: int) -> tuple[str, ...]:
    """The normalizers a layer blends on input of ``rank``: what it holds, but bn and ln on (N, C) by default."""
    return _arguments.default_normalizers(rank) if spec.default_normalizers else spec.config.normalizers


def _prepared(spec: LayerSpec, x: Array, arrays: LayerArrays, mask: Array | None) -> tuple:
    """``(config, x, arrays, mask, features)``: channels last, the blended normalizers' logits, promoted."""
    rank = len(getattr(x, "shape", ()))
    features = _arguments.feature_axes(spec.axes, rank) if rank >= 2 else (rank - 1,)
    x, mask = _arguments.channels_last(x, mask, features)
    names = blended(spec, rank)
    _arguments.check_input(x, names, spec.num_features)
    if names != spec.config.normalizers:  # the logits of the blended normalizers only
        index = [spec.config.normalizers.index(n) for n in names]
        sample_map = (
            None if arrays.sample_map is None else _mixing.select_normalizers(arrays.sample_map, index)
        )
        at = jnp.array(index)
        arrays = arrays._replace(
            mean_logits=arrays.mean_logits[at], var_logits=arrays.var_logits[at], sample_map=sample_map
        )
    if spec.promote_dtype is not None:  # as nnx.BatchNorm: (x, mean, var, scale, bias), dtype=dtype
        x, mean, var, scale, bias = spec.promote_dtype(
            (x, arrays.running_mean, arrays.running_var, arrays.scale, arrays.bias), dtype=spec.dtype
        )
        arrays = arrays._replace(running_mean=mean, running_var=var, scale=scale, bias=bias)
    return spec.config._replace(normalizers=names), x, arrays, mask, features


def _layer(spec: LayerSpec, x: Array, arrays: LayerArrays, mask: Array | None) -> tuple[Array, Any, Any]:
    config, xs, wide, keep, features = _prepared(spec, x, arrays, mask)
    check_arrays(wide, config.normalizers, xs.shape[-1], config.weights)
    y, batch = normalize(config, spec.dtype, True, xs, wide, keep)
    mean = var = None
    if batch is not None:  # the stored averages, as nnx.BatchNorm updates them (not the promoted ones)
        assert arrays.running_mean is not None and arrays.running_var is not None
        stop = lax.stop_gradient
        mean = _stats.update_running_average(arrays.running_mean, stop(batch.mean), spec.momentum)
        var = _stats.update_running_average(arrays.running_var, stop(batch.var), spec.momentum)
    return _arguments.channels_back(y, features, tuple(x.shape)), mean, var


_layer_jit = jax.jit(_layer, static_argnums=0)


def sample_weights(spec: LayerSpec, x: Array, arrays: LayerArrays, mask: Array | None = None) -> Array:
    """(2, N, K): the blend weights each sample of ``x`` gets in a ``"sample"`` layer."""
    config, x, arrays, mask, _ = _prepared(spec, x, arrays, mask)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    keep = _passes.mask_cells(mask, x)
    sums = _passes.statistics_pass(x, keep, compute_dtype)
    cells = _stats.cell_stats(
        sums.shift, sums.inverse_unit, sums.s1, sums.s2, _passes.counts(keep, x, compute_dtype)
    )
    weights = _weights(config, cells, statistics(config, cells, _arrays_in(arrays)), _arrays_in(arrays))
    return jnp.swapaxes(weights[..., 0], 1, 2)  # (2, K, N, 1) -> (2, N, K)


def layer(owner: Any, spec: LayerSpec, x: Array, arrays: LayerArrays, mask: Array | None = None):
    """One call of a front end: ``(y, new running mean, new running var)``, the averages None unless updated.

    ``arrays`` hold what the layer stores (the running averages flat, (C,)); x is in the
    layer's own layout. The NNX, Linen and collapsed layers all call this. ``owner``
    names the layer to :func:`switchnorm.mixing_weights` when it reads per-sample weights.
    """
    spec = spec._replace(config=_hashable(spec.config))
    weights = None
    if spec.config.weights == "sample":
        weights = functools.partial(sample_weights, spec, x, arrays, mask)
    _sample_weights.record(owner, x, blended(spec, len(getattr(x, "shape", ()))), weights)
    return _compiled(_layer, _layer_jit, spec)(x, _arrays_in(arrays), mask)
