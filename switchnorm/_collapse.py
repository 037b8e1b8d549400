"""Collapsing a trained model's SwitchNorm layers to the normalizers they chose.

Sparse Switchable Normalization ends training with every layer's weights one-hot
(:func:`switchnorm.radius_schedule` up to radius 1): the blend then computes statistics
that it multiplies by zero. :func:`collapse` returns a copy of the model in which each layer
that has chosen (a weight of at least ``min_weight`` for its mean and for its variance)
computes only the chosen statistics, with the weights fixed:

* :class:`CollapsedNorm`: the chosen normalizers' statistics alone (mean and variance may
  come from different normalizers), through the same core as :class:`switchnorm.SwitchNorm`
  (:func:`switchnorm._core.layer`), fed logits whose softmax is exactly one-hot.
* :class:`ChannelAffine`: a layer that chose bn for both, in inference mode, is a fixed
  per-channel ``y = x * a + b`` (``a = scale / sqrt(running_var + epsilon)``,
  ``b = bias - running_mean * a``), which XLA fuses into the preceding convolution's
  consumer like a folded BatchNorm.

With ``flax_layers=True`` a layer that chose one normalizer for both becomes Flax's own layer
(``nnx.BatchNorm``, ``nnx.GroupNorm``, ``nnx.InstanceNorm``, ``nnx.LayerNorm``), so a model whose
every layer chose so needs no switchnorm to run. Linen has no graph to edit in place: rebuild
the model with Flax's layers (or ``normalizers=(name,)``) at those places and move the
variables over with :func:`switchnorm.linen.collapse_variables`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import PromoteDtypeFn
from jax import lax

from switchnorm import _arguments, _core, _graph, _mixing
from switchnorm._convert import SHARED
from switchnorm.nnx import SwitchNorm

__all__ = ["ChannelAffine", "CollapseReport", "CollapsedLayer", "CollapsedNorm", "LayerChoice", "collapse"]

Array = jax.Array

MIN_WEIGHT = 0.99
"""The default weight a layer's mean and variance must each give one normalizer to collapse."""


# -- the collapsed layers ---------------------------------------------------------------------


def _one_hot_logits(normalizers: tuple[str, ...], chosen: str) -> Array:
    """Logits whose softmax is exactly one-hot on ``chosen``: 0 there, -inf elsewhere."""
    return jnp.array([0.0 if n == chosen else -jnp.inf for n in normalizers], jnp.float32)


def _variable(value: Any, kind: type[nnx.Variable]) -> Any:
    """``kind(value)`` for an array, ``nnx.data(None)`` for None (an absent scale or bias)."""
    return kind(jnp.asarray(value)) if value is not None else nnx.data(None)


class CollapsedNorm(nnx.Module):
    """A SwitchNorm with its weights fixed one-hot: only the chosen statistics are computed.

    ::

        y = scale * (x - mean_M) / sqrt(var_V + epsilon) + bias

    with M (``mean_normalizer``) and V (``var_normalizer``) from ("bn", "in", "ln", "gn"),
    the same or different. The statistics come from the core of
    :class:`switchnorm.SwitchNorm` restricted to {M, V}, with logits whose softmax is exactly
    one-hot (0 and -inf), so the output is the SwitchNorm's at those one-hot weights, bit for
    bit. With bn, training mode updates the running averages as SwitchNorm does.
    ``model.train()`` / ``model.eval()`` switch it the same way.

    ``promote_dtype`` is SwitchNorm's (:meth:`from_switch_norm` carries it): a function as
    ``nnx.BatchNorm``'s, or None to cast nothing.

    Build one from a layer with :meth:`from_switch_norm`; :func:`collapse` does.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> layer = switchnorm.SwitchNorm(4, rngs=nnx.Rngs(0))
      >>> norm = switchnorm.CollapsedNorm.from_switch_norm(layer, "bn", "ln")   # bn mean, ln variance
      >>> norm(jnp.ones((2, 3, 3, 4))).shape
      (2, 3, 3, 4)
    """

    def __init__(
        self,
        num_features: int,
        *,
        mean_normalizer: str,
        var_normalizer: str,
        scale: Array | None,
        bias: Array | None,
        running_mean: Array | None,
        running_var: Array | None,
        num_groups: int | None = None,
        use_running_average: bool | None = False,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        axis: int = -1,
        promote_dtype: PromoteDtypeFn | None = None,
    ):
        names = _arguments.validate_normalizers(tuple(dict.fromkeys((mean_normalizer, var_normalizer))))
        if "bn" in names and (running_mean is None or running_var is None):
            raise ValueError(f"CollapsedNorm with 'bn' among {names} needs running_mean and running_var.")
        self.num_features = num_features
        self.mean_normalizer = mean_normalizer
        self.var_normalizer = var_normalizer
        self.normalizers = names
        self.num_groups = num_groups if "gn" in names else None
        self.scale = _variable(scale, nnx.Param)
        self.bias = _variable(bias, nnx.Param)
        uses_bn = "bn" in names
        self.mean = _variable(running_mean if uses_bn else None, nnx.BatchStat)
        self.var = _variable(running_var if uses_bn else None, nnx.BatchStat)
        self.use_running_average = use_running_average
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.axis = axis
        self.promote_dtype = _arguments.check_promote_dtype(promote_dtype)

    @classmethod
    def from_switch_norm(cls, layer: SwitchNorm, mean_normalizer: str, var_normalizer: str) -> CollapsedNorm:
        """The layer with its weights fixed on ``mean_normalizer`` and ``var_normalizer``."""
        return cls(
            layer.num_features,
            mean_normalizer=mean_normalizer,
            var_normalizer=var_normalizer,
            scale=layer.scale[...] if layer.scale is not None else None,
            bias=layer.bias[...] if layer.bias is not None else None,
            running_mean=layer.mean[...] if layer.mean is not None else None,
            running_var=layer.var[...] if layer.var is not None else None,
            num_groups=layer.num_groups,
            use_running_average=layer.use_running_average,
            momentum=layer.momentum,
            epsilon=layer.epsilon,
            dtype=layer.dtype,
            axis_name=layer.axis_name,
            axis_index_groups=layer.axis_index_groups,
            axis=layer.axis,
            promote_dtype=layer.promote_dtype,
        )

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (features on ``axis``) with the chosen statistics; ``mask`` as SwitchNorm's."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        config = _core.Config(
            self.normalizers,
            self.num_groups or 1,
            self.epsilon,
            bool(use_running_average),
            self.axis_name,
            self.axis_index_groups,
        )
        spec = _core.LayerSpec(
            config, False, (self.axis,), self.num_features, self.dtype, self.promote_dtype, self.momentum
        )
        arrays = _core.LayerArrays(
            mean_logits=_one_hot_logits(self.normalizers, self.mean_normalizer),
            var_logits=_one_hot_logits(self.normalizers, self.var_normalizer),
            scale=self.scale[...] if self.scale is not None else None,
            bias=self.bias[...] if self.bias is not None else None,
            running_mean=self.mean[...] if self.mean is not None else None,
            running_var=self.var[...] if self.var is not None else None,
        )
        y, mean, var = _core.layer(self, spec, x, arrays, mask)
        if mean is not None:
            assert self.mean is not None and self.var is not None  # __init__ keeps them with bn
            self.mean[...], self.var[...] = mean, var
        return y


class ChannelAffine(nnx.Module):
    """``y = x * multiplier + offset`` per channel: a BatchNorm folded for inference.

    BatchNorm in inference mode only: it holds no batch statistics, so a call in training mode
    (``use_running_average=False``, as ``model.train()`` sets it) raises rather than quietly
    computing inference's output. To fine-tune a collapsed model, collapse it in training
    mode (its bn layers then stay :class:`CollapsedNorm`, which compute batch statistics) or
    with ``flax_layers=True`` (``nnx.BatchNorm``). :meth:`fold` builds it from a bn/bn
    SwitchNorm's running averages.

    Attributes:
      multiplier: (C,) ``scale / sqrt(running_var + epsilon)``.
      offset: (C,) ``bias - running_mean * multiplier``.
      dtype: the dtype of the result (default: the input's).
      axis: the feature axis, as the folded layer's.
      promote_dtype: the folded layer's (None casts nothing): called as
        ``promote_dtype((x, None, None, multiplier, offset), dtype=dtype)``, the
        places of ``nnx.BatchNorm``'s (x, mean, var, scale, bias).

    Example::

      >>> import jax.numpy as jnp
      >>> import switchnorm
      >>> affine = switchnorm.ChannelAffine(jnp.array([2.0, 3.0]), jnp.array([1.0, 0.0]))
      >>> affine(jnp.ones((1, 2)))
      Array([[3., 3.]], dtype=float32)
    """

    def __init__(
        self,
        multiplier: Array,
        offset: Array,
        *,
        dtype: Any = None,
        axis: int = -1,
        promote_dtype: PromoteDtypeFn | None = None,
    ):
        self.multiplier = nnx.Param(jnp.asarray(multiplier))
        self.offset = nnx.Param(jnp.asarray(offset))
        self.num_features = int(self.multiplier[...].shape[-1])
        self.dtype = dtype
        self.axis = axis
        self.promote_dtype = _arguments.check_promote_dtype(promote_dtype)
        self.use_running_average = True

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``, as on ``nnx.BatchNorm``; False makes calls refuse."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    @classmethod
    def fold(cls, layer: SwitchNorm | CollapsedNorm) -> ChannelAffine:
        """The layer's inference-mode bn as one multiply-add: running averages, epsilon, scale, bias."""
        if layer.mean is None or layer.var is None:
            raise ValueError("ChannelAffine.fold needs a layer with bn running averages.")
        running_mean, running_var = layer.mean[...], layer.var[...]
        multiplier = lax.rsqrt(running_var + layer.epsilon)
        if layer.scale is not None:
            multiplier = multiplier * layer.scale[...]
        offset = -running_mean * multiplier
        if layer.bias is not None:
            offset = offset + layer.bias[...]
        return cls(multiplier, offset, dtype=layer.dtype, axis=layer.axis, promote_dtype=layer.promote_dtype)

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """``x * multiplier + offset`` in float32 (or wider), cast to ``dtype`` or ``x``'s dtype.

        ``use_running_average`` (default: the attribute, True unless ``model.train()`` set it)
        must be True: the fold is BatchNorm in inference, with no batch statistics to compute.
        ``mask`` is accepted, so that calls written for the layer it replaces still work, and
        changes nothing (as ``nnx.BatchNorm`` ignores ``mask`` in inference).

        Raises:
          ValueError: in training mode.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if not use_running_average:
            raise ValueError(
                "ChannelAffine is a BatchNorm folded for inference and has no batch statistics, but "
                "it was called in training mode (use_running_average=False, e.g. after model.train()). "
                "Call model.eval() first, or, to train the collapsed model, collapse it in training "
                "mode or with flax_layers=True, which keep layers that compute batch statistics."
            )
        shape = tuple(getattr(x, "shape", ()))
        feature = _arguments.feature_axis(self.axis, len(shape))
        x, _ = _arguments.channels_last(x, mask, feature)
        _arguments.check_input(x, ("bn",), self.num_features)
        multiplier, offset = self.multiplier[...], self.offset[...]
        if self.promote_dtype is not None:
            x, _, _, multiplier, offset = self.promote_dtype(
                (x, None, None, multiplier, offset), dtype=self.dtype
            )
        compute = jnp.promote_types(x.dtype, jnp.float32)
        y = x.astype(compute) * multiplier.astype(compute) + offset.astype(compute)
        y = y.astype(x.dtype if self.dtype is None else self.dtype)
        return _arguments.channels_back(y, feature, shape)


# -- choosing and reporting ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """What one layer becomes: its mean's and variance's normalizers, and whether it folds.

    ``affine`` only for bn/bn in inference mode (:class:`ChannelAffine`); otherwise a
    :class:`CollapsedNorm`. The JSON form (:meth:`to_dict`) is what a collapsed run records.
    """

    mean: str
    var: str
    affine: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "affine": self.affine}


@dataclasses.dataclass(frozen=True)
class CollapsedLayer:
    """One SwitchNorm layer in a :class:`CollapseReport`.

    Attributes:
      path: the layer's path in the model, e.g. ``"layers/1/norm2"`` (``""`` for the root).
      mean: the normalizer with the largest mean weight.
      var: the normalizer with the largest variance weight.
      mean_dropped: ``1 - `` that mean weight: the weight the collapse drops.
      var_dropped: ``1 - `` that variance weight.
      form: ``"flax"`` (Flax's own layer, with ``flax_layers=True``), ``"affine"``
        (:class:`ChannelAffine`), ``"normalizer"`` (:class:`CollapsedNorm`) or ``"kept"`` (a
        weight below ``min_weight``: the layer stays a SwitchNorm).
      max_change: with a ``batch``, the largest absolute change of the model's output on it,
        in inference mode, when this layer alone is collapsed (None without a batch, or kept).
    """

    path: str
    mean: str
    var: str
    mean_dropped: float
    var_dropped: float
    form: str
    max_change: float | None = None

    @property
    def collapsed(self) -> bool:
        return self.form != "kept"


@dataclasses.dataclass(frozen=True)
class CollapseReport:
    """What :func:`collapse` did, layer by layer.

    Attributes:
      layers: one :class:`CollapsedLayer` per SwitchNorm, in the model's order.
      min_weight: the threshold it was called with.
      max_change: with a ``batch``, the largest absolute change of the model's output with
        every layer collapsed at once, in inference mode (None without a batch).

    Example::

      >>> from flax import nnx
      >>> import switchnorm
      >>> model = switchnorm.convert(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))   # weight 1 on bn
      >>> _, report = switchnorm.collapse(model)
      >>> [(layer.mean, layer.var, layer.form) for layer in report.layers]
      [('bn', 'bn', 'normalizer')]
    """

    layers: tuple[CollapsedLayer, ...]
    min_weight: float
    max_change: float | None = None

    def choices(self) -> dict[str, LayerChoice]:
        """The collapsed layers' choices by path: what :func:`apply_choices` rebuilds."""
        return {
            layer.path: LayerChoice(layer.mean, layer.var, layer.form == "affine")
            for layer in self.layers
            if layer.collapsed
        }

    def format(self) -> str:
        """A plain-text table: path, mean/var choice, form, dropped weights, output change."""
        width = max([len("layer")] + [len(layer.path or "(root)") for layer in self.layers])
        header = f"{'layer':<{width}}  mean/var  {'form':<10} dropped mean/var  max change"
        lines = [header, "-" * len(header)]
        for layer in self.layers:
            change = "-" if layer.max_change is None else f"{layer.max_change:.3g}"
            dropped = f"{layer.mean_dropped:.2e}/{layer.var_dropped:.2e}"
            lines.append(
                f"{layer.path or '(root)':<{width}}  {layer.mean + '/' + layer.var:<8}  "
                f"{layer.form:<10} {dropped:<17} {change}"
            )
        if self.max_change is not None:
            lines.append(f"all collapsed at once: max change {self.max_change:.3g}")
        return "\n".join(lines)


def _check_min_weight(min_weight: Any) -> float:
    if isinstance(min_weight, bool) or not isinstance(min_weight, int | float):
        raise TypeError(f"min_weight must be a number in (0.5, 1], got {min_weight!r}.")
    if not (math.isfinite(min_weight) and 0.5 < min_weight <= 1.0):
        raise ValueError(
            f"min_weight must be in (0.5, 1], got {min_weight}: above 0.5 so that at most one "
            "normalizer qualifies, at most 1 since weights sum to one; the default is 0.99."
        )
    return float(min_weight)


def _switch_norms(model: Any) -> list[tuple[str, SwitchNorm]]:
    """Every SwitchNorm of the model with its path (``"layers/1/norm2"``); ValueError if there is none."""
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"collapse expects an NNX module holding switchnorm.SwitchNorm layers, got "
            f"{type(model).__name__}; for Linen see the docstring of switchnorm.collapse."
        )
    found = _graph.find(model, (SwitchNorm,))
    if not found:
        raise ValueError(
            f"collapse found no switchnorm.SwitchNorm in the {type(model).__name__} it was given; "
            "nothing to collapse."
        )
    return found


def _top(row: dict[str, float]) -> tuple[str, float]:
    """The normalizer with the largest weight and that weight."""
    name = max(row, key=row.__getitem__)
    return name, row[name]


def _least_weights(path: str, layer: SwitchNorm) -> dict[str, dict[str, float]]:
    """Per kind and normalizer, the least weight any channel gives it (a layer: its weights).

    A ``weights="channel"`` layer has chosen a normalizer only where every channel has: its
    least weight then reaches ``min_weight`` (> 0.5), and the collapse drops at most
    ``1 - `` that from any channel. A ``"sample"`` layer's weights change with every input,
    so no fixed choice replaces it: a ValueError.
    """
    if layer.weights == "sample":
        raise ValueError(
            f"collapse: layer {path!r} has weights='sample': each sample's weights depend on its "
            "input, so no fixed choice can replace the layer; collapse handles weights='layer' "
            "and weights='channel' layers."
        )
    names = layer.blended_normalizers
    index = np.array([layer.normalizers.index(n) for n in names])
    radius = 0.0 if layer.radius is None else layer.radius[...]
    least = {}
    for kind, logits in (("mean", layer.mean_logits[...]), ("var", layer.var_logits[...])):
        logits = jnp.swapaxes(logits, -1, -2) if layer.weights == "channel" else logits  # normalizers last
        weights = np.asarray(_mixing.mixing_weights_from_logits(logits[..., index], layer.mixing, radius))
        least[kind] = dict(zip(names, np.min(np.atleast_2d(weights), axis=0).tolist(), strict=True))
    return least


def _describe(path: str, layer: SwitchNorm, min_weight: float, flax_layers: bool) -> CollapsedLayer:
    """The layer's choice and dropped weights, at the weights it blends now."""
    weights = _least_weights(path, layer)
    (mean, w_mean), (var, w_var) = _top(weights["mean"]), _top(weights["var"])
    if min(w_mean, w_var) < min_weight:
        form = "kept"
    elif flax_layers and mean == var and _flax_class(layer, mean) is not None:
        form = "flax"
    elif mean == var == "bn" and layer.use_running_average:
        form = "affine"
    else:
        form = "normalizer"
    return CollapsedLayer(path, mean, var, 1.0 - w_mean, 1.0 - w_var, form)


FLAX_LAYERS: dict[str, type[nnx.Module]] = {
    "bn": nnx.BatchNorm,
    "gn": nnx.GroupNorm,
    "in": nnx.InstanceNorm,
    "ln": nnx.LayerNorm,
}
"""Flax's layer of each normalizer: what ``collapse(..., flax_layers=True)`` builds."""


def _flax_class(layer: SwitchNorm, name: str) -> type[nnx.Module] | None:
    """Flax's layer that computes what ``layer`` does with its weights one-hot on ``name``, if any.

    ``nnx.BatchNorm``, ``nnx.GroupNorm`` (channels last only, its one layout),
    ``nnx.InstanceNorm``, or ``nnx.LayerNorm`` (once the layer has been called: "ln" reduces over
    every axis but the batch axis, which the input's rank gives); None where Flax has none.
    """
    rank = layer.last_input_rank
    channels_last = layer.axis == -1 or (rank is not None and layer.axis == rank - 1)
    if (name == "gn" and not channels_last) or (name == "ln" and rank is None):
        return None
    return FLAX_LAYERS[name]


def _flax_layer(layer: SwitchNorm, flax_class: type[nnx.Module]) -> nnx.Module:
    """An instance of ``flax_class`` (from :func:`_flax_class`) holding the SwitchNorm's own variables."""
    common: dict[str, Any] = {name: getattr(layer, name) for name in SHARED}
    common["promote_dtype"] = layer.promote_dtype or nnx.nn.dtypes.promote_dtype
    C = layer.num_features
    flax_layer: nnx.Module
    if flax_class is nnx.BatchNorm:
        flax_layer = nnx.BatchNorm(
            C,
            use_running_average=layer.use_running_average,
            axis=layer.axis,
            momentum=layer.momentum,
            axis_name=layer.axis_name,
            axis_index_groups=layer.axis_index_groups,
            rngs=nnx.Rngs(0),
            **common,
        )
        assert layer.mean is not None and layer.var is not None  # a layer that can choose bn holds them
        flax_layer.mean, flax_layer.var = layer.mean, layer.var
    elif flax_class is nnx.GroupNorm:
        flax_layer = nnx.GroupNorm(C, num_groups=layer.num_groups, rngs=nnx.Rngs(0), **common)
    elif flax_class is nnx.InstanceNorm:
        flax_layer = nnx.InstanceNorm(C, feature_axes=layer.axis, rngs=nnx.Rngs(0), **common)
    else:
        assert layer.last_input_rank is not None  # _flax_class gives LayerNorm only then
        axes = tuple(range(1, layer.last_input_rank))
        flax_layer = nnx.LayerNorm(
            C, reduction_axes=axes, feature_axes=layer.axis, rngs=nnx.Rngs(0), **common
        )
    flax_layer.scale, flax_layer.bias = layer.scale, layer.bias
    return flax_layer


def _replacement(layer: SwitchNorm, choice: LayerChoice, flax_layers: bool) -> nnx.Module:
    flax_class = _flax_class(layer, choice.mean) if flax_layers and choice.mean == choice.var else None
    if flax_class is not None:
        return _flax_layer(layer, flax_class)
    if choice.affine:
        return ChannelAffine.fold(layer)
    return CollapsedNorm.from_switch_norm(layer, choice.mean, choice.var)


def apply_choices(
    model: nnx.Module, choices: dict[str, LayerChoice], flax_layers: bool = False
) -> nnx.Module:
    """A copy of ``model`` with the SwitchNorm at each path of ``choices`` replaced as it says.

    The collapsed layers take their arrays from the SwitchNorms they replace; a layer held at
    several places (shared) is replaced by one collapsed layer, shared at each of them. What
    :func:`collapse` does once it has chosen; also how a collapsed run's model is rebuilt
    from a fresh one (the arrays then come from its checkpoint). ``flax_layers`` as
    :func:`collapse`'s.
    """
    layers = dict(_switch_norms(model))
    unknown = sorted(set(choices) - set(layers))
    if unknown:
        raise ValueError(f"no SwitchNorm at path {unknown[0]!r}; the model's are {sorted(layers)}.")
    chosen = [(path, layers[path]) for path in choices]
    return _graph.replace_each(
        model, chosen, lambda path, node: _replacement(node, choices[path], flax_layers)
    )


def _inference_output(model: nnx.Module, batch: Any) -> np.ndarray:
    """The model's output on ``batch`` in inference mode; ``model`` itself is left as it was."""
    copy = _graph.copy(model)
    copy.eval()
    return np.asarray(copy(batch))


def _max_change(reference: np.ndarray, model: nnx.Module, batch: Any) -> float:
    return float(np.max(np.abs(_inference_output(model, batch) - reference), initial=0.0))


def collapse(
    model: nnx.Module, min_weight: float = MIN_WEIGHT, batch: Any = None, *, flax_layers: bool = False
) -> tuple[nnx.Module, CollapseReport]:
    """A copy of ``model`` whose SwitchNorm layers that have chosen compute only their choice.

    A layer has chosen when its mean weights and its variance weights each give one
    normalizer at least ``min_weight`` (as :func:`switchnorm.mixing_weights` reports them:
    sparsestmax at the layer's radius, or softmax); a ``weights="channel"`` layer, when
    every channel gives the same normalizer at least that (the report's dropped weights are
    then the largest any channel drops). It becomes

    * with ``flax_layers=True``, where mean and variance chose the same normalizer, Flax's own
      layer holding the SwitchNorm's variables: ``nnx.BatchNorm`` (with its running averages
      and ``use_running_average``), ``nnx.GroupNorm`` (channels last, its only layout),
      ``nnx.InstanceNorm``, or ``nnx.LayerNorm`` reducing over every axis but the batch axis,
      as "ln" does (for a layer that has been called, so that its input's rank is known).
      A model whose every layer collapses so holds only Flax classes and runs where
      switchnorm is not installed; a SwitchNorm with ``promote_dtype=None`` gets Flax's
      default ``promote_dtype``, which gives the same result on float32 input and
      parameters;
    * a :class:`ChannelAffine` ``y = x * a + b`` if it chose bn for both and is in inference
      mode (``use_running_average``): ``a = scale / sqrt(running_var + epsilon)``,
      ``b = bias - running_mean * a``, which XLA fuses like a folded BatchNorm;
    * a :class:`CollapsedNorm` otherwise: the chosen mean and variance statistics only (they
      may come from different normalizers), the weights fixed one-hot.

    The other layers stay SwitchNorms. ``model`` is not changed. Collapsing drops the weight
    ``1 - w`` of every other normalizer: nothing when the weights were one-hot (sparsestmax at
    the end of :func:`switchnorm.radius_schedule`), where the output is unchanged up to the
    rounding of the fold (the affine computes ``x * a + b`` rather than ``(x - mean) * a + bias``).

    Linen: the model's structure is code: rebuild it with ``nn.BatchNorm`` (or GroupNorm, ...)
    in the places of the layers that chose one normalizer for both, and move the variables
    over with :func:`switchnorm.linen.collapse_variables`.

    Args:
      model: an NNX module holding :class:`switchnorm.SwitchNorm` layers, called at least
        once if it relies on their default normalizers on (N, C) input.
      min_weight: in (0.5, 1]; a layer collapses when both its largest weights reach it.
      batch: optional input to measure the change on: each layer alone collapsed, then all,
        in inference mode (``model.eval()`` on copies).
      flax_layers: replace layers that chose one normalizer for both by Flax's own layers.

    Returns:
      ``(collapsed_model, report)``: a new module, and a :class:`CollapseReport`.

    Raises:
      TypeError / ValueError: ``min_weight`` outside (0.5, 1], not an NNX module, no
        SwitchNorm in it, or a ``weights="sample"`` layer (its weights follow each input).

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> norm = switchnorm.SwitchNorm(4, mixing="sparsestmax", rngs=nnx.Rngs(0))
      >>> norm.mean_logits[...] = jnp.array([0.0, 0.0, 1.0, 0.0])   # ln
      >>> _ = switchnorm.set_radius(norm, 1.0)                       # one-hot
      >>> collapsed, report = switchnorm.collapse(norm)
      >>> type(collapsed).__name__, report.layers[0].mean, report.layers[0].var
      ('CollapsedNorm', 'ln', 'bn')
      >>> bn = switchnorm.convert(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))   # weight 1 on bn
      >>> type(switchnorm.collapse(bn, flax_layers=True)[0]).__name__
      'BatchNorm'
    """
    min_weight = _check_min_weight(min_weight)
    flax_layers = _arguments.check_flag("flax_layers", flax_layers)
    found = _switch_norms(model)
    layers = [_describe(path, node, min_weight, flax_layers) for path, node in found]
    report = CollapseReport(tuple(layers), min_weight)
    collapsed = apply_choices(model, report.choices(), flax_layers)
    if batch is None:
        return collapsed, report
    reference = _inference_output(model, batch)
    choices = report.choices()
    measured = tuple(
        dataclasses.replace(
            layer,
            max_change=_max_change(
                reference, apply_choices(model, {layer.path: choices[layer.path]}, flax_layers), batch
            ),
        )
        if layer.collapsed
        else layer
        for layer in layers
    )
    return collapsed, CollapseReport(measured, min_weight, _max_change(reference, collapsed, batch))
