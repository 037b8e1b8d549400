"""Converting a Flax model's BatchNorm and GroupNorm layers into SwitchNorms that start where they were.

A model built (and often trained) with ``nnx.BatchNorm`` or ``nnx.GroupNorm`` becomes one with
:class:`switchnorm.SwitchNorm` in their places: each carries its source's scale, bias, running
averages, epsilon, momentum, axis and group count, and starts with the source's weight
``source_weight`` (``switchnorm._source_weights``): at 1.0 the model computes what it did, in
training and in evaluation mode, and from there learns which normalizers it wants.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from switchnorm import _graph, _source_weights
from switchnorm.nnx import SwitchNorm

__all__ = ["convert"]

SOURCES: tuple[type[nnx.Module], ...] = (nnx.BatchNorm, nnx.GroupNorm)
"""The Flax layers :func:`convert` replaces."""

LAYER_KWARGS = ("normalizers", "mixing", "weights", "num_groups", "group_size")
"""SwitchNorm's own arguments, which :func:`convert` passes on; the rest come from the source."""


def _check_layer_kwargs(layer_kwargs: dict[str, Any], sources: list[tuple[str, Any]]) -> None:
    unknown = sorted(set(layer_kwargs) - set(LAYER_KWARGS))
    if unknown:
        raise TypeError(
            f"convert passes only SwitchNorm's own arguments {LAYER_KWARGS} to the new layers, got "
            f"{unknown}: the rest (epsilon, momentum, axis, dtypes, ...) are the source layer's."
        )
    grouping = sorted({"num_groups", "group_size"} & set(layer_kwargs))
    groups = [path for path, node in sources if isinstance(node, nnx.GroupNorm)]
    if grouping and groups:
        raise ValueError(
            f"convert got {grouping[0]}= but the model holds a GroupNorm at {groups[0] or '(root)'!r}, "
            "whose group count the converted layer keeps; give it only for models of BatchNorms."
        )


def _take(old: nnx.Variable | None) -> Any:
    """The source's variable (its value and metadata, e.g. sharding), or an absent one."""
    return nnx.data(None) if old is None else old


def _stack_shape(source: Any) -> tuple[int, ...]:
    """The leading axes of a layer built under ``nnx.vmap`` (``()`` for a plain layer).

    A stack of L layers (Flax's scan-over-layers pattern) holds every variable with a leading
    axis of L: a per-channel one has shape (L, C) rather than (C,).
    """
    for name in ("scale", "bias", "mean"):
        variable = getattr(source, name, None)
        if variable is not None:
            return tuple(variable[...].shape[:-1])
    return ()


def _stacked(variable: Any, stack: tuple[int, ...]) -> None:
    """``variable`` (a new layer's own: logits, sample map, running averages) copied along ``stack``."""
    if variable is not None and stack:
        value = variable[...]
        variable.set_value(jnp.broadcast_to(value, stack + value.shape))


def _start(layer: SwitchNorm, source: str, source_weight: float, stack: tuple[int, ...]) -> None:
    """Sets the layer's logits to start on ``source``, and stacks its own variables like the source's."""
    logits = _source_weights.source_logits(layer.normalizers, source, source_weight, layer.mixing)
    shape = layer.mean_logits[...].shape  # (K,) or (K, C) with weights="channel"
    column = logits.reshape((-1,) + (1,) * (len(shape) - 1))
    for variable in (layer.mean_logits, layer.var_logits):
        variable[...] = jnp.broadcast_to(jnp.asarray(column, variable[...].dtype), shape)
    own: list[nnx.Variable | None] = [layer.mean_logits, layer.var_logits, layer.sample_map]
    if source == "gn":  # a BatchNorm's replacement holds the BatchNorm's running averages
        own += [layer.mean, layer.var]
    for own_variable in own:
        _stacked(own_variable, stack)


def _with_source(path: str, layer: SwitchNorm, source: Any, name: str) -> SwitchNorm:
    """``layer`` holding ``source``'s scale and bias, its logits starting on ``name``."""
    if name not in layer.normalizers:
        raise ValueError(
            f"convert: the layer at {path or '(root)'!r} replaces a {type(source).__name__}, but "
            f"normalizers={layer.normalizers} leave out {name!r}; include it."
        )
    layer.scale = _take(source.scale)
    layer.bias = _take(source.bias)
    return layer


SHARED = ("epsilon", "dtype", "param_dtype", "use_bias", "use_scale", "use_fast_variance", "promote_dtype")
"""The arguments Flax's normalization layers share with SwitchNorm, carried as they are both ways
(here, and by ``collapse(..., flax_layers=True)`` back to Flax's layers)."""


def _shared(source: Any) -> dict[str, Any]:
    return {name: getattr(source, name) for name in SHARED}


def _from_batch_norm(path: str, bn: nnx.BatchNorm, layer_kwargs: dict[str, Any]) -> SwitchNorm:
    layer = SwitchNorm(
        bn.num_features,
        use_running_average=bn.use_running_average,
        axis=bn.axis,
        momentum=bn.momentum,
        axis_name=bn.axis_name,
        axis_index_groups=bn.axis_index_groups,
        rngs=nnx.Rngs(0),
        **_shared(bn),
        **layer_kwargs,
    )
    if "bn" in layer.normalizers:
        layer.mean, layer.var = bn.mean, bn.var
    return _with_source(path, layer, bn, "bn")


def _group_norm_features(path: str, gn: nnx.GroupNorm) -> int:
    """The channel count of a GroupNorm, which it does not store: its groups times their size."""
    if gn.reduction_axes is not None or gn.axis_name is not None:
        raise ValueError(
            f"convert: the GroupNorm at {path or '(root)'!r} has reduction_axes="
            f"{gn.reduction_axes!r}, axis_name={gn.axis_name!r}; SwitchNorm's gn reduces over every "
            "axis but the batch axis, on each device: only reduction_axes=None, axis_name=None convert."
        )
    return int(gn.num_groups * gn.group_size)


def _from_group_norm(path: str, gn: nnx.GroupNorm, layer_kwargs: dict[str, Any]) -> SwitchNorm:
    layer = SwitchNorm(
        _group_norm_features(path, gn),
        axis=gn.feature_axis,
        num_groups=gn.num_groups,
        rngs=nnx.Rngs(0),
        **_shared(gn),
        **layer_kwargs,
    )
    return _with_source(path, layer, gn, "gn")


def convert(model: nnx.Module, source_weight: float = 1.0, **layer_kwargs: Any) -> nnx.Module:
    """A copy of ``model`` in which every ``nnx.BatchNorm`` and ``nnx.GroupNorm`` is a SwitchNorm.

    Each :class:`switchnorm.SwitchNorm` carries its source's scale and bias (the same
    variables, with their metadata), running averages (BatchNorm), epsilon, momentum, axis,
    dtypes, ``use_running_average`` (BatchNorm; a GroupNorm's replacement starts in training
    mode: call ``model.eval()`` / ``model.train()`` after converting) and group count
    (GroupNorm). Its source normalizer ("bn" or "gn") gets weight ``source_weight`` in the
    mean and in the variance and the others share the rest equally, as
    :func:`switchnorm.mixing_weights` reads them back.

    ``source_weight=1.0`` reproduces the source: the others share 2**-24, so the outputs equal
    the original's (to float32 rounding) in training and evaluation mode and the running
    averages update alike. The other logits still get gradients, but start about 17.7 apart
    (softmax), so training moves the layers off their source slowly; for fine-tuning where
    they should choose, start lower (e.g. 0.9). Not exactly one-hot because logits of -inf
    would never get a gradient and weight decay would make them NaN.

    A stack of layers built under ``nnx.vmap`` (for ``nnx.scan``) becomes a stack of
    SwitchNorms: their logits get the source's leading axes. A layer with the default
    normalizers on (N, C) input blends only bn and ln, whose two
    logits then give the source more than ``w`` (below 1; softmax: ``w / (w + (1 - w) / 3)``):
    pass ``normalizers=("bn", "ln")`` for a model of such layers. The model passed in is not changed;
    a layer held at several places (shared) becomes one SwitchNorm shared at each.

    Args:
      model: an NNX module holding ``nnx.BatchNorm`` or ``nnx.GroupNorm`` layers (or one).
      source_weight: in (0, 1]: the weight each converted layer starts with on its source.
      **layer_kwargs: SwitchNorm's own arguments for every new layer: ``normalizers`` (must
        include the source), ``mixing``, ``weights``, and for models of BatchNorms ``num_groups``
        or ``group_size`` (a GroupNorm's replacement keeps the GroupNorm's group count).

    Returns:
      The converted model, a new module.

    Raises:
      TypeError / ValueError: ``model`` is not an NNX module or holds no BatchNorm or
        GroupNorm, ``source_weight`` is outside (0, 1], an argument is not one of
        SwitchNorm's own, or ``normalizers`` leave out a layer's source.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
      >>> sn = switchnorm.convert(bn, source_weight=0.9)
      >>> type(sn).__name__, round(switchnorm.mixing_weights(sn)[""]["mean"]["bn"], 4)
      ('SwitchNorm', 0.9)
    """
    source_weight = _source_weights.check_source_weight(source_weight)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"convert expects an NNX module, got {type(model).__name__}.")
    sources = _graph.find(model, SOURCES)
    if not sources:
        raise ValueError(
            f"convert found no nnx.BatchNorm or nnx.GroupNorm in the {type(model).__name__} it was "
            "given; nothing to convert."
        )
    _check_layer_kwargs(layer_kwargs, sources)

    def make(path: str, node: Any) -> SwitchNorm:
        is_bn = isinstance(node, nnx.BatchNorm)
        layer = (_from_batch_norm if is_bn else _from_group_norm)(path, node, layer_kwargs)
        _start(layer, "bn" if is_bn else "gn", source_weight, _stack_shape(node))
        return layer

    return _graph.replace_each(model, sources, make)
