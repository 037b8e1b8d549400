"""Reading the mixing weights a model learned, from either Flax front end.

:func:`mixing_weights` gives one float per layer, kind and normalizer (the mean
over the channels or samples of a ``weights="channel"`` or ``"sample"`` layer);
:func:`mixing_weight_arrays` gives the weights themselves, per channel or per
sample of a batch; :func:`format_mixing_weights` prints either as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchnorm import _sample_weights
from switchnorm._arguments import NORMALIZERS, default_normalizers, validate_normalizers
from switchnorm._mixing import mixing_weights_from_logits
from switchnorm._sample_weights import CapturedWeights
from switchnorm.nnx import SwitchNorm

__all__ = [
    "LayerWeightArrays",
    "LayerWeights",
    "format_mixing_weights",
    "mixing_weight_arrays",
    "mixing_weights",
]

LayerWeights = dict[str, dict[str, float]]
"""One layer's weights: ``{"mean": {name: w}, "var": {name: w}}``."""

Forward = Callable[[Any, Any], Any]
"""``forward(model_or_variables, batch)``: one forward pass, for reading per-sample weights."""


class LayerWeightArrays(NamedTuple):
    """Every weight one layer (or one copy of a stack) blends, the normalizers on the last axis.

    Attributes:
      weights: the layer's ``weights`` mode: "layer", "channel" or "sample".
      names: the normalizers, in the order of the last axis.
      mean: the mean's weights: (K,) for "layer", (C, K) for "channel", (N, K) for
        "sample" (one row per sample of the batch the model ran on).
      var: the variance's weights, of the same shape.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> layer = switchnorm.SwitchNorm(4, weights="channel", rngs=nnx.Rngs(0))
      >>> arrays = switchnorm.mixing_weight_arrays(layer)[""]
      >>> arrays.weights, arrays.names, arrays.mean.shape
      ('channel', ('bn', 'in', 'ln', 'gn'), (4, 4))
      >>> arrays.summary()["var"]
      {'bn': 0.25, 'in': 0.25, 'ln': 0.25, 'gn': 0.25}
    """

    weights: str
    names: tuple[str, ...]
    mean: np.ndarray
    var: np.ndarray

    def summary(self) -> LayerWeights:
        """What :func:`mixing_weights` reports: the weights, or their mean over the rows."""
        return self._per_kind(lambda w: w if w.ndim == 1 else np.mean(w.astype(np.float64), axis=0))

    def spread(self) -> LayerWeights | None:
        """The standard deviation of each weight over the channels or samples; None for "layer"."""
        if self.mean.ndim == 1:
            return None
        return self._per_kind(lambda w: np.std(w.astype(np.float64), axis=0))

    def _per_kind(self, reduce: Callable[[np.ndarray], np.ndarray]) -> LayerWeights:
        return {
            kind: dict(zip(self.names, reduce(weights).tolist(), strict=True))
            for kind, weights in (("mean", self.mean), ("var", self.var))
        }


def _copy_suffix(index: tuple[int, ...]) -> str:
    """The path suffix of one copy of a stacked layer: ``[i]`` per stacking axis, "" for none."""
    return "".join(f"[{i}]" for i in index)


def _concrete(path: str, name: str, value: Any) -> Any:
    """``value`` (an array, or an NNX variable's), or a TypeError for an abstract one (``eval_shape``)."""
    if isinstance(value, nnx.Variable):
        value = value.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
        raise TypeError(
            f"layer {path!r}: {name} is a jax.ShapeDtypeStruct of shape {value.shape}, an abstract "
            "value (from jax.eval_shape or nnx.eval_shape) with no numbers in it; mixing weights "
            "are read from the initialized or trained parameters."
        )
    return value


def _stacked_logits(path: str, mean_logits: Any, var_logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both logits as arrays of one shape (copies..., K), or a ValueError naming the layer."""
    mean_logits = np.asarray(_concrete(path, "mean_logits", mean_logits))
    var_logits = np.asarray(_concrete(path, "var_logits", var_logits))
    if mean_logits.shape != var_logits.shape or mean_logits.ndim == 0:
        raise ValueError(
            f"layer {path!r}: mean_logits of shape {mean_logits.shape} and var_logits of shape "
            f"{var_logits.shape}; a layer needs two logits arrays of one shape (K,), or "
            "(copies..., K) for a stack of layers (nn.scan, nn.vmap, nnx.vmap, nnx.scan)."
        )
    return mean_logits, var_logits


def _rows(logits: np.ndarray, mixing: str, radius: Any) -> np.ndarray:
    """The weights of every row of ``logits`` (normalizers on the last axis), as NumPy."""
    # jnp.asarray, not a dtype request: float64 logits (a NumPy checkpoint)
    # then become float32 quietly when x64 is off, instead of warning.
    return np.asarray(mixing_weights_from_logits(jnp.asarray(logits), mixing, radius))


def _copies_arrays(
    path: str,
    mode: str,
    mean_logits: np.ndarray,
    var_logits: np.ndarray,
    names: Sequence[str],
    mixing: str = "softmax",
    radius: Any = 0.0,
) -> dict[str, LayerWeightArrays]:
    """One entry per copy of a layer, ``path[i]`` for copy i, from its logits.

    The logits have the normalizers on the last axis: (copies..., K), or
    (copies..., C, K) for ``mode="channel"``. Stacking transforms (``nn.scan``,
    ``nn.vmap``, ``nnx.vmap``, ``nnx.scan``) put the copies on the leading axes of
    every variable. An unstacked layer is one entry under ``path`` itself.
    ``radius`` is one scalar for every copy or one per copy.
    """
    copies = mean_logits.shape[: mean_logits.ndim - (2 if mode == "channel" else 1)]
    radius = np.asarray(radius)
    if radius.shape not in ((), copies):
        raise ValueError(
            f"layer {path!r}: a radius of shape {radius.shape} for logits of shape "
            f"{mean_logits.shape}; expected one radius, or one per copy {copies}."
        )
    radius = np.broadcast_to(radius, copies)
    return {
        path + _copy_suffix(index): LayerWeightArrays(
            mode,
            tuple(names),
            _rows(mean_logits[index], mixing, radius[index]),
            _rows(var_logits[index], mixing, radius[index]),
        )
        for index in np.ndindex(copies)
    }


def _captured_arrays(path: str, records: Sequence[CapturedWeights]) -> LayerWeightArrays:
    """A ``"sample"`` layer's weights over every sample it saw in the forward pass."""
    records = [r for r in records if r.weights is not None]
    if not records:
        raise ValueError(
            f"layer {path!r} has weights='sample' but was not called by the forward pass on batch=; "
            "pass forward=... that runs the model through it."
        )
    names = records[0].names
    if any(r.names != names for r in records):
        raise ValueError(f"layer {path!r} blended {[r.names for r in records]} in one forward pass.")
    weights = np.concatenate([r.weights for r in records if r.weights is not None], axis=1)  # (2, N, K)
    return LayerWeightArrays("sample", names, weights[0], weights[1])


def _sample_needs_batch(path: str, linen: bool = False) -> ValueError:
    """The error for a ``"sample"`` layer read without a batch to run the model on."""
    how = (
        "batch= and forward=lambda variables, batch: module.apply(variables, batch) "
        "(a variables dict cannot run itself)"
        if linen
        else "batch= (a batch of inputs; forward=... if the model is not called as model(batch))"
    )
    return ValueError(
        f"layer {path!r} has weights='sample': its weights depend on its input, so reading them "
        f"needs a forward pass; pass {how}."
    )


def _nnx_layer_arrays(
    path: str, layer: SwitchNorm, captured: Mapping[int, list[CapturedWeights]] | None
) -> dict[str, LayerWeightArrays]:
    """The weights an NNX layer blends, of the normalizers its last call used; one entry per copy."""
    mode = layer.weights
    if mode == "sample":
        if captured is None:
            raise _sample_needs_batch(path)
        return {path: _captured_arrays(path, captured.get(id(layer), []))}
    mean_logits, var_logits = _stacked_logits(path, layer.mean_logits, layer.var_logits)
    if mode == "channel":  # (copies..., K, C): the normalizers to the last axis
        mean_logits, var_logits = np.swapaxes(mean_logits, -1, -2), np.swapaxes(var_logits, -1, -2)
    if mean_logits.shape[-1] != len(layer.normalizers):
        where = "the next to last axis, channels last" if mode == "channel" else "the last axis"
        raise ValueError(
            f"layer {path!r} holds logits of shape {layer.mean_logits.shape} for normalizers "
            f"{layer.normalizers}: the normalizers must be {where}; stack copies of a layer "
            "on a leading axis (nnx.vmap / nnx.scan with the default axis 0)."
        )
    names = layer.blended_normalizers
    index = np.array([layer.normalizers.index(n) for n in names])
    radius = np.asarray(_concrete(path, "radius", layer.radius)) if layer.radius is not None else 0.0
    return _copies_arrays(
        path, mode, mean_logits[..., index], var_logits[..., index], names, layer.mixing, radius
    )


def _names_for(path: str, size: int, normalizers: Any) -> tuple[str, ...]:
    """The normalizer names of a layer known only by its logits' length."""
    if isinstance(normalizers, Mapping):
        normalizers = normalizers.get(path)
    if normalizers is not None:
        names = validate_normalizers(normalizers)
    elif size == len(NORMALIZERS):
        names = NORMALIZERS
    elif size == 2:
        names = default_normalizers(2)
    else:
        raise ValueError(
            f"layer {path!r} has {size} logits, which is not a default set of "
            "normalizers; pass normalizers=(...) (or a dict path -> names) to "
            "mixing_weights to name them."
        )
    if len(names) != size:
        raise ValueError(f"layer {path!r} has {size} logits but normalizers={names} names {len(names)}.")
    return names


def _tree_mode(tree: Mapping[str, Any], logits: np.ndarray) -> str:
    """A params tree layer's mode: "sample" with a ``sample_map``; "channel" when its logits
    have one axis more than its ``scale`` or ``bias`` (C,), or (copies..., C) for a stack."""
    if "sample_map" in tree:
        return "sample"
    features = [np.shape(tree[k]) for k in ("scale", "bias") if k in tree]
    return "channel" if features and logits.ndim == len(features[0]) + 1 else "layer"


def _tree_layer_arrays(
    path: str,
    tree: Mapping[str, Any],
    normalizers: Any,
    radii: Mapping[str, Any],
    captured: Mapping[str, list[CapturedWeights]] | None,
) -> dict[str, LayerWeightArrays]:
    """One Linen layer's (or params tree layer's) entries, one per copy of a stack."""
    mean_logits, var_logits = _stacked_logits(path, tree["mean_logits"], tree["var_logits"])
    mode = _tree_mode(tree, mean_logits)
    if mode == "sample":
        if captured is None:
            raise _sample_needs_batch(path, linen=True)
        return {path: _captured_arrays(path, captured.get(path, []))}
    if mode == "channel":
        mean_logits, var_logits = np.swapaxes(mean_logits, -1, -2), np.swapaxes(var_logits, -1, -2)
    names = _names_for(path, mean_logits.shape[-1], normalizers)
    blended = captured.get(path, []) if captured is not None else []
    if blended and blended[0].names != names:  # a default layer on (N, C) input: bn and ln of its four
        index = [names.index(n) for n in blended[0].names]
        mean_logits, var_logits, names = mean_logits[..., index], var_logits[..., index], blended[0].names
    if "radius" in radii:
        return _copies_arrays(path, mode, mean_logits, var_logits, names, "sparsestmax", radii["radius"])
    return _copies_arrays(path, mode, mean_logits, var_logits, names)


def _from_tree(
    tree: Mapping[str, Any],
    path: tuple[str, ...],
    normalizers: Any,
    out: dict,
    radii: Mapping[str, Any],
    captured: Mapping[str, list[CapturedWeights]] | None,
) -> None:
    """Walks a params tree; ``radii`` is the parallel "mixing_radius" subtree (a Linen
    sparsestmax layer holds a ``radius`` there, so its weights are sparsestmax at that radius)."""
    if "mean_logits" in tree and "var_logits" in tree:
        out.update(_tree_layer_arrays("/".join(path), tree, normalizers, radii, captured))
        return
    for key, child in tree.items():
        if isinstance(child, Mapping):
            child_radii = radii.get(key, {})
            child_radii = child_radii if isinstance(child_radii, Mapping) else {}
            _from_tree(child, (*path, str(key)), normalizers, out, child_radii, captured)


def _sample_layer_paths(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[str]:
    """The paths of a params tree's ``weights="sample"`` layers (those holding a ``sample_map``)."""
    if "mean_logits" in tree and "sample_map" in tree:
        return ["/".join(path)]
    return [
        p
        for key, child in tree.items()
        if isinstance(child, Mapping)
        for p in _sample_layer_paths(child, (*path, str(key)))
    ]


def _run_capturing(model: Any, batch: Any, forward: Forward) -> dict[Any, list[CapturedWeights]]:
    """Runs ``forward(model, batch)`` and returns each sample layer's calls, by layer key."""
    with _sample_weights.capturing() as records:
        forward(model, batch)
    by_layer: dict[Any, list[CapturedWeights]] = {}
    for record in records:
        key = record.layer if isinstance(record.layer, str) else id(record.layer)
        by_layer.setdefault(key, []).append(record)
    return by_layer


def _nnx_arrays(model: nnx.Module, batch: Any, forward: Forward | None) -> dict[str, LayerWeightArrays]:
    """Every NNX SwitchNorm's entries; the forward pass, if needed, runs on a clone of ``model``."""
    layers = [("/".join(str(p) for p in path), n) for path, n in nnx.iter_graph(model)]
    layers = [(path, n) for path, n in layers if isinstance(n, SwitchNorm)]
    sample = [path for path, n in layers if n.weights == "sample"]
    captured = None
    if sample:
        if batch is None:
            raise _sample_needs_batch(sample[0])
        model = nnx.clone(model)  # the forward pass updates no running average of the model's
        captured = _run_capturing(model, batch, forward or (lambda m, b: m(b)))
        layers = [("/".join(str(p) for p in path), n) for path, n in nnx.iter_graph(model)]
        layers = [(path, n) for path, n in layers if isinstance(n, SwitchNorm)]
    out: dict[str, LayerWeightArrays] = {}
    for path, layer in layers:
        out.update(_nnx_layer_arrays(path, layer, captured))
    return out


def mixing_weight_arrays(
    model_or_variables: Any,
    normalizers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    batch: Any = None,
    forward: Forward | None = None,
) -> dict[str, LayerWeightArrays]:
    """Every weight every SwitchNorm layer blends, as arrays: per layer, channel or sample.

    Arguments, paths and stacks are those of :func:`mixing_weights`, which
    summarises these arrays. Each entry is a :class:`LayerWeightArrays`, the
    normalizers on the last axis: (K,) for a ``weights="layer"`` layer, (C, K)
    for ``"channel"`` (row c: channel c's weights), (N, K) for ``"sample"``
    (row n: the weights sample n of ``batch`` got; a layer called more than
    once in the forward pass has the rows of every call, in call order).

    Example::

      >>> from flax import nnx
      >>> import switchnorm
      >>> layer = switchnorm.SwitchNorm(8, weights="channel", rngs=nnx.Rngs(0))
      >>> switchnorm.mixing_weight_arrays(layer)[""].mean.shape
      (8, 4)
    """
    if isinstance(model_or_variables, nnx.Module):
        return _nnx_arrays(model_or_variables, batch, forward)
    variables = model_or_variables
    if isinstance(variables, nnx.State):
        variables = nnx.to_pure_dict(variables)
    if not isinstance(variables, Mapping):
        raise TypeError(
            "mixing_weights expects an NNX module, a Linen variables dict or a params "
            f"tree, got {type(variables).__name__}."
        )
    tree = variables.get("params", variables)
    radii = variables.get("mixing_radius", {}) if "params" in variables else {}
    captured = None
    sample = _sample_layer_paths(tree)
    if sample and (batch is None or forward is None):
        raise _sample_needs_batch(sample[0], linen=True)
    if batch is not None and forward is not None:  # what each layer blends, and per-sample weights
        captured = _run_capturing(model_or_variables, batch, forward)
    out: dict[str, LayerWeightArrays] = {}
    _from_tree(tree, (), normalizers, out, radii, captured)
    return out


def mixing_weights(
    model_or_variables: Any,
    normalizers: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    batch: Any = None,
    forward: Forward | None = None,
) -> dict[str, LayerWeights]:
    """The weights every SwitchNorm layer blends, by path and normalizer.

    Softmax of the logits, or, for a ``mixing="sparsestmax"`` layer, sparsestmax at the
    layer's radius (an NNX layer's :class:`switchnorm.MixingRadius`; for Linen, the
    ``"mixing_radius"`` collection of the variables dict): one-hot rows at the end of a
    :func:`switchnorm.radius_schedule`.

    Finer weights (``SwitchNorm(..., weights=...)``) are summarised by their mean:

    * ``weights="channel"``: the mean over the channels of each channel's weights.
      In a params tree such a layer is recognised by logits (K, C), one axis
      more than its ``scale`` or ``bias``; one with neither reads as a stack.
    * ``weights="sample"``: the mean over the samples of ``batch`` of the weights
      each sample gets. These depend on the layer's input, so the model runs once
      on ``batch``: ``forward(model, batch)``, by default ``model(batch)``, in the
      mode the model is in (``model.eval()``: bn's term is the running averages;
      ``model.train()``: the batch's statistics). An NNX model runs as a clone
      (``nnx.clone``), so its running averages stay as they are. While that pass
      runs, every ``"sample"`` layer hands its input to a context-local list
      (:mod:`switchnorm._sample_weights`), which computes the weights from it
      with the core's own functions; outside this function the layers record
      nothing. The pass must be eager: a sample layer called under ``jit``,
      ``vmap`` or ``scan`` (a stack of sample layers too) raises a ValueError.
      A Linen variables dict cannot run itself: pass ``forward=lambda variables,
      batch: module.apply(variables, batch, ...)``. A sample layer and no batch
      (or, for Linen, no forward) is a ValueError naming the layer.

    :func:`mixing_weight_arrays` gives the weights themselves, per channel or
    sample; :func:`format_mixing_weights` of those shows their spread.

    Args:
      model_or_variables: an NNX module (or any NNX graph holding SwitchNorm
        layers), a Linen variables dict (``{"params": ...}``), a params tree, or
        an ``nnx.State``.
      normalizers: only for trees, whose arrays do not carry the names: the
        names of every layer's logits, or a dict from layer path to names. By
        default a layer with 4 logits is read as ("bn", "in", "ln", "gn") and
        one with 2 as ("bn", "ln"), the layer's own defaults.
      batch: the input the model runs on, needed with ``weights="sample"`` layers;
        with Linen variables (and ``forward``) it also tells which normalizers each
        layer blends (below).
      forward: ``forward(model_or_variables, batch)``, the forward pass, for a
        model not called as ``model(batch)`` and for Linen variables.

    A layer built with the default normalizers holds logits for all four, in
    both front ends, but blends only "bn" and "ln" on (N, C) features. An NNX
    layer that has been called on such input reports those two, weighted as it
    blends them. Linen variables do not say what input a layer saw: give
    ``batch`` and ``forward`` for the same report, or ``normalizers={path:
    ("bn", "ln")}``; without either such a layer's four logits read as all four.

    A stack of layers (``nn.scan``, ``nn.vmap``, ``nnx.vmap``, ``nnx.scan``) holds
    logits of shape (L, K) ((L, K, C) for ``"channel"``), the copies on the leading
    axis; each copy is read as a layer of its own, at the stack's path suffixed with
    its index (``"blocks/norm[0]"``, ``"blocks/norm[1]"``, ...; ``[i][j]`` for two
    stacking axes), with the radius of that copy. The normalizers' axis is known,
    so L == K is read correctly.

    Returns:
      ``{path: {"mean": {name: weight}, "var": {name: weight}}}`` in the order
      the layers appear (the copies of a stack in index order), with paths such as
      ``"block1/norm"``; weights are Python floats that sum to one per layer and kind.

    Example::

      >>> from flax import nnx
      >>> import switchnorm
      >>> w = switchnorm.mixing_weights(switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0)))
      >>> w[""]["mean"]["bn"]
      0.25
    """
    arrays = mixing_weight_arrays(model_or_variables, normalizers, batch=batch, forward=forward)
    return {path: layer.summary() for path, layer in arrays.items()}


def _printed(weight: float) -> str:
    """A weight as the table prints it: three decimals."""
    return f"{weight:.3f}"


def _dominant(row: Mapping[str, float]) -> str | None:
    """The name of the largest weight, or None when another prints the same (e.g. four 0.250).

    A mark on one of several equal printed values would single out a normalizer on a
    difference the reader cannot see (a freshly built layer, or one a few steps in).
    """
    top = max(row, key=row.__getitem__)
    tied = [n for n, w in row.items() if _printed(w) == _printed(row[top])]
    return top if len(tied) == 1 else None


def _spreads(layer: LayerWeights | LayerWeightArrays) -> tuple[LayerWeights, LayerWeights | None]:
    """A layer's (mean) weights and, for per-channel or per-sample arrays, their spread."""
    if isinstance(layer, LayerWeightArrays):
        return layer.summary(), layer.spread()
    return layer, None


def format_mixing_weights(weights: Mapping[str, LayerWeights | LayerWeightArrays]) -> str:
    """A plain-text table: one row per layer and kind, the dominant weight marked ``*``.

    ``weights`` is what :func:`mixing_weights` returns, or what
    :func:`mixing_weight_arrays` returns: a ``"channel"`` or ``"sample"`` layer's
    cells then read ``mean±std``, the mean weight and its standard deviation
    over the channels or samples (``0.412±0.080``), and the dominant weight is
    the largest mean. No weight is marked where the largest ones print the
    same, as the four 0.250 of a freshly built layer do.

    Example::

      >>> import switchnorm
      >>> weights = {"norm": {"mean": {"bn": 0.7, "ln": 0.3}, "var": {"bn": 0.4, "ln": 0.6}}}
      >>> print(switchnorm.format_mixing_weights(weights))
      layer  kind       bn      ln
      ----------------------------
      norm   mean   0.700*  0.300
             var    0.400   0.600*
    """
    rows = {path: _spreads(layer) for path, layer in weights.items()}
    names: list[str] = []
    for summary, _ in rows.values():
        for name in summary["mean"]:
            if name not in names:
                names.append(name)
    width = 14 if any(spread is not None for _, spread in rows.values()) else 8
    layer_width = max([len("layer")] + [len(p or "(root)") for p in weights])
    header = f"{'layer':<{layer_width}}  kind " + "".join(f"{n:>{width}}" for n in names)
    lines = [header, "-" * len(header)]
    for path, (summary, spread) in rows.items():
        for kind in ("mean", "var"):
            row, top = summary[kind], _dominant(summary[kind])
            cells = ""
            for n in names:
                text = "-" if n not in row else _printed(row[n])
                if spread is not None and n in row:
                    text += f"±{spread[kind][n]:.3f}"
                cells += f"{text:>{width - 1}}{'*' if n == top else ' '}"
            lines.append(f"{(path or '(root)') if kind == 'mean' else '':<{layer_width}}  {kind:<4} {cells}")
    return "\n".join(lines)
