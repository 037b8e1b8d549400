"""The layer's arguments: their defaults, and the checks that refuse bad ones.

Important details:

* Every check runs at construction (NNX) or at trace time (the functional
  core, Linen), never on traced values, and each runs once per call: the
  front ends check what they know at construction and hand the core checked
  values (see :mod:`switchnorm._core`).
* Every message names the argument, the bad value and the fix.
* One place for each default: :data:`NORMALIZERS`, :func:`default_normalizers`
  and :func:`default_num_groups` are what the front ends and
  :mod:`switchnorm.inspect` use.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

NORMALIZERS: tuple[str, ...] = ("bn", "in", "ln", "gn")
"""Every normalizer name, in the default order of the logits."""

SPATIAL_NORMALIZERS: tuple[str, ...] = ("in", "gn")
"""Normalizers that need a spatial extent, hence an input of rank >= 3."""

MIXINGS: tuple[str, ...] = ("softmax", "sparsestmax")
"""How a layer turns its logits into weights: softmax (Switchable Normalization, the default) or
sparsestmax at the layer's radius (Sparse Switchable Normalization, docs/design.md section 10)."""

WEIGHTS: tuple[str, ...] = ("layer", "channel", "sample")
"""How finely a layer blends: one blend per layer (Switchable Normalization, the default), one per
channel, or one per sample computed from its statistics (docs/design.md, "Finer weights")."""

MAX_DEFAULT_GROUPS = 32
"""Flax GroupNorm's default group count, the most :func:`default_num_groups` picks."""


def default_normalizers(rank: int) -> tuple[str, ...]:
    """The normalizers that apply to a channels-last input of this rank.

    (N, C) features have no spatial extent, so "in" and "gn" are meaningless
    there and the default is ("bn", "ln"); any higher rank gets all four.

    Example::

      >>> import switchnorm
      >>> switchnorm.default_normalizers(4), switchnorm.default_normalizers(2)
      (('bn', 'in', 'ln', 'gn'), ('bn', 'ln'))
    """
    return NORMALIZERS if rank > 2 else ("bn", "ln")


def default_num_groups(num_channels: int) -> int:
    """Default group count for the gn term: always a valid grouping.

    The largest divisor of ``num_channels`` that is at most
    ``min(32, num_channels // 2)``: Flax GroupNorm's 32 groups where the channel
    count allows it (64 -> 32, 256 -> 32), otherwise as many groups as keep at
    least two channels per group, so gn stays distinct from in (16 -> 8,
    48 -> 24, 3 -> 1). A prime channel count gets one group (gn equals ln).

    Example::

      >>> import switchnorm
      >>> [switchnorm.default_num_groups(c) for c in (64, 16, 48, 3)]
      [32, 8, 24, 1]
    """
    limit = max(1, min(MAX_DEFAULT_GROUPS, num_channels // 2))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def validate_normalizers(normalizers: Sequence[str]) -> tuple[str, ...]:
    """Returns ``normalizers`` as a tuple, or raises if a name is bad."""
    if normalizers is None:
        raise TypeError(
            "normalizers=None: the functional core needs the names of its logits, in their order; "
            "pass switchnorm.default_normalizers(x.ndim) for the layers' default."
        )
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


def _check_count(name: str, value: Any, num_channels: int) -> int:
    """``value`` as a positive int dividing ``num_channels``, or a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); write {name}=2.")
    if value < 1 or num_channels % value:
        raise ValueError(
            f"{name}={value} does not divide the {num_channels} channels; "
            "use a positive divisor of the channel count."
        )
    return int(value)


def resolve_num_groups(
    num_channels: int, num_groups: int | None, group_size: int | None, normalizers: Sequence[str] = ()
) -> int:
    """The gn group count from GroupNorm-style ``num_groups`` / ``group_size``.

    Neither given: a layer of gn alone is Flax's GroupNorm and takes its default,
    :data:`MAX_DEFAULT_GROUPS` groups (an error where they do not divide the channels, as
    GroupNorm raises); a blend takes :func:`default_num_groups`.
    """
    if num_groups is not None and group_size is not None:
        raise ValueError(
            f"give num_groups or group_size, not both (got num_groups={num_groups}, group_size={group_size})."
        )
    if group_size is not None:
        return num_channels // _check_count("group_size", group_size, num_channels)
    if num_groups is not None:
        return _check_count("num_groups", num_groups, num_channels)
    if tuple(normalizers) != ("gn",):
        return default_num_groups(num_channels)
    if num_channels % MAX_DEFAULT_GROUPS:
        raise ValueError(
            f"a layer with normalizers=('gn',) is Flax's GroupNorm and takes its default of "
            f"{MAX_DEFAULT_GROUPS} groups, which does not divide its {num_channels} channels; "
            "pass num_groups (or group_size), as GroupNorm needs."
        )
    return MAX_DEFAULT_GROUPS


def _real(name: str, value: Any, requirement: str) -> float:
    """``value`` as a float, or a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float {requirement}, got {value!r} ({type(value).__name__}).")
    return float(value)


BLEND_EPSILON = 1e-5
"""The default epsilon of a blend: BatchNorm's, as Switchable Normalization's."""

FLAX_EPSILON = {"bn": 1e-5, "in": 1e-6, "ln": 1e-6, "gn": 1e-6}
"""The default epsilon of Flax's BatchNorm, InstanceNorm, LayerNorm and GroupNorm."""


def resolve_epsilon(epsilon: Any, normalizers: Sequence[str]) -> float:
    """``epsilon`` checked, or by default: a layer of one normalizer is that Flax layer and takes
    its epsilon (1e-6 for in, ln and gn), a blend :data:`BLEND_EPSILON`."""
    if epsilon is None:
        normalizers = tuple(normalizers)
        epsilon = FLAX_EPSILON[normalizers[0]] if len(normalizers) == 1 else BLEND_EPSILON
    return check_epsilon(epsilon)


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a float if it is positive (NaN is not), else an error naming it."""
    value = _real("epsilon", epsilon, "> 0")
    if not value > 0:  # also NaN
        raise ValueError(f"epsilon must be > 0 (it keeps 1 / sqrt(var + epsilon) finite), got {epsilon!r}.")
    return value


def check_momentum(momentum: Any) -> float:
    """``momentum`` as a float if it is in [0, 1] (NaN is not), else an error naming it."""
    value = _real("momentum", momentum, "in [0, 1]")
    if not 0.0 <= value <= 1.0:  # also NaN
        raise ValueError(
            f"momentum must be in [0, 1] (the running average keeps this fraction of itself "
            f"each step, as in Flax), got {momentum!r}; 0.99 is the default."
        )
    return value


def check_mixing(mixing: Any) -> str:
    """``mixing`` if it is one of :data:`MIXINGS`, else a ValueError naming it and the choices."""
    if not isinstance(mixing, str) or mixing not in MIXINGS:
        raise ValueError(
            f"mixing must be one of {MIXINGS}, got {mixing!r}; 'softmax' blends every normalizer "
            "(Switchable Normalization), 'sparsestmax' selects sparsely (Sparse Switchable Normalization)."
        )
    return mixing


def check_weights(weights: Any) -> str:
    """``weights`` if it is one of :data:`WEIGHTS`, else a ValueError naming it and the choices."""
    if not isinstance(weights, str) or weights not in WEIGHTS:
        raise ValueError(
            f"weights must be one of {WEIGHTS}, got {weights!r}; 'layer' learns one blend per layer "
            "(Switchable Normalization), 'channel' one per channel, 'sample' one per sample from its "
            "statistics."
        )
    return weights


def check_axis(axis: Any) -> int:
    """``axis`` (the NNX layer's feature axis) as an int, or a TypeError naming it."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"axis must be an int, the one feature (channel) axis of the input as in Flax's "
            f"nnx.BatchNorm, got {axis!r} ({type(axis).__name__}); write axis=1 for channels-first "
            "input (several feature axes: switchnorm.linen.SwitchNorm, as nn.BatchNorm, takes a tuple)."
        )
    return int(axis)


def feature_axis(axis: int, rank: int) -> int:
    """The feature axis ``axis`` of a rank-``rank`` input as an index in [1, rank).

    Axis 0 holds the samples, so it cannot be the feature axis. Below rank 2 this returns
    ``rank - 1`` and leaves the refusal to :func:`check_input`, whose message names the shape.
    """
    if rank < 2:
        return rank - 1
    if not -rank <= axis < rank:
        raise ValueError(
            f"axis={axis} is out of range for an input of rank {rank}; "
            f"pass a feature axis in [1, {rank - 1}] (or [-{rank - 1}, -1])."
        )
    if axis % rank == 0:
        raise ValueError(
            f"axis={axis} is the batch axis of an input of rank {rank}: SwitchNorm takes the "
            f"samples on axis 0 and the features on another axis, e.g. axis=1 (channels first) "
            "or -1 (channels last, the default)."
        )
    return axis % rank


def check_axes(axis: Any) -> tuple[int, ...]:
    """``axis`` (Linen's feature axis or axes, as ``flax.linen.BatchNorm`` takes them) as a tuple of ints."""
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes:
        raise ValueError("axis=() names no feature axis; pass one axis (e.g. -1) or several, e.g. (1, 3).")
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral):
            raise TypeError(
                f"axis must be an int or a tuple of ints, the feature axes of the input as in Flax's "
                f"BatchNorm, got {axis!r}; write axis=1 for channels-first input."
            )
    return tuple(int(a) for a in axes)


def feature_axes(axes: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The feature axes of a rank-``rank`` input as sorted indices in [1, rank) (:func:`feature_axis`)."""
    found = tuple(sorted(feature_axis(a, rank) for a in axes))
    if len(set(found)) != len(found):
        raise ValueError(f"axis={axes} names the same axis twice for an input of rank {rank}.")
    return found


def _as_axes(features: int | tuple[int, ...]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


def channels_last(x: Any, mask: Any, features: int | tuple[int, ...]) -> tuple[Any, Any]:
    """``x`` and its call-time ``mask`` (checked, of x's rank) with the feature axes moved last.

    Several feature axes (Linen's ``axis=(1, 3)``) are then flattened into one channel axis,
    in their order; :func:`channels_back` undoes it. A mask keeps its length-1 axes; where any
    of its feature axes is longer than 1, all of them are broadcast to x's, so that they
    flatten into the channel axis. The front ends' first step; ``x`` itself is checked after,
    by :func:`check_input`.
    """
    axes = _as_axes(features)
    shape = getattr(x, "shape", None)
    if shape is not None:
        mask = check_mask(mask, tuple(shape))
    if shape is None or axes == (len(shape) - 1,):
        return x, mask
    rank, k = len(shape), len(axes)
    if mask is not None and any(mask.shape[a % rank] != 1 for a in axes):
        full = {a % rank for a in axes}
        mask = jnp.broadcast_to(mask, tuple(shape[i] if i in full else mask.shape[i] for i in range(rank)))

    def move(a: Any) -> Any:
        moved = jnp.moveaxis(a, axes, tuple(range(rank - k, rank)))
        return moved.reshape(*moved.shape[: rank - k], int(np.prod(moved.shape[rank - k :])))

    return move(x), None if mask is None else move(mask)


def channels_back(y: Any, features: int | tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """The inverse of :func:`channels_last` for an output ``y``: back to the input's ``shape``."""
    axes, rank = _as_axes(features), len(shape)
    if axes == (rank - 1,):
        return y
    moved = [shape[a] for a in range(rank) if a not in axes] + [shape[a] for a in axes]
    return jnp.moveaxis(y.reshape(moved), tuple(range(rank - len(axes), rank)), axes)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a TypeError naming ``name``."""
    if not isinstance(value, (bool, jnp.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def check_promote_dtype(promote_dtype: Any) -> Any:
    """``promote_dtype`` if it is None or callable, else a TypeError naming it."""
    if promote_dtype is not None and not callable(promote_dtype):
        raise TypeError(
            f"promote_dtype must be a function such as flax.nnx.nn.dtypes.promote_dtype, or None "
            f"(cast nothing), got {promote_dtype!r}."
        )
    return promote_dtype


def check_input(x: Any, normalizers: tuple[str, ...], num_features: int | None = None) -> None:
    """Raises ``TypeError``/``ValueError`` if ``x`` cannot go through the layer."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"SwitchNorm expects an array, got {type(x).__name__}.")
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            f"SwitchNorm expects a channels-last input of rank >= 2 such as (N, C) or "
            f"(N, H, W, C), got shape {shape} (rank {len(shape)})."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"SwitchNorm expects a floating-point input, got dtype {dtype}; "
            "cast it with x.astype(jnp.float32) first."
        )
    if shape[-1] == 0:
        raise ValueError(
            f"the input has shape {shape}: no channels (its last axis has size 0) to normalize; "
            "SwitchNorm needs at least one channel."
        )
    check_channels(shape, num_features)
    if len(shape) == 2:
        spatial = [n for n in normalizers if n in SPATIAL_NORMALIZERS]
        if spatial:
            raise ValueError(
                f"normalizers {spatial} need a spatial extent, but the input has shape "
                f"{shape} (N, C); use ('bn', 'ln') for dense features."
            )


def check_channels(shape: tuple[int, ...], num_features: int | None) -> None:
    """Raises a ValueError unless the channels-last ``shape`` has ``num_features`` channels (None: any)."""
    if num_features is not None and shape[-1] != num_features:
        raise ValueError(
            f"the input has {shape[-1]} channels (last axis of shape {shape}) "
            f"but the layer was built for num_features={num_features}."
        )


def check_shape(name: str, value: Any, shape: tuple[int, ...], why: str) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is None or has ``shape``."""
    if value is not None and tuple(jnp.shape(value)) != shape:
        raise ValueError(f"{name} has shape {tuple(jnp.shape(value))}, expected {shape} {why}.")


def check_mask(mask: Any, shape: tuple[int, ...]) -> Any:
    """A call-time ``mask`` of the input's rank, or None; raises if it cannot be one.

    Its length-1 axes are kept, not broadcast to ``shape``: a padding mask (N, L, 1) stays
    1/C of x's size through the layer (:func:`switchnorm._passes.mask_cells`).

    As for Flax's BatchNorm, LayerNorm and GroupNorm: booleans, True where an
    element counts towards the statistics, of a shape that broadcasts to the
    input's (e.g. (N, L, 1) for padded sequences of shape (N, L, C)). Other
    dtypes are refused, not thresholded: 0.5 has no meaning as a mask.
    """
    if mask is None:
        return None
    mask_shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
    if mask_shape is None or dtype is None:
        raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}.")
    if dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array (True where an element counts towards the statistics), "
            f"got dtype {dtype}; pass e.g. mask=(m > 0)."
        )
    try:
        fits = jnp.broadcast_shapes(tuple(mask_shape), shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask has shape {tuple(mask_shape)}, which does not broadcast to the input's {shape}."
        )
    return jnp.reshape(mask, (1,) * (len(shape) - len(mask_shape)) + tuple(mask_shape))
