"""Reading the mixing weights a model learned, from either Flax front end."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchnorm._arguments import NORMALIZERS, default_normalizers, validate_normalizers
from switchnorm._mixing import mixing_weights_from_logits
from switchnorm.nnx import SwitchNorm

__all__ = ["LayerWeights", "format_mixing_weights", "mixing_weights"]

LayerWeights = dict[str, dict[str, float]]
"""One layer's weights: ``{"mean": {name: w}, "var": {name: w}}``."""


def _copy_suffix(index: tuple[int, ...]) -> str:
    """The path suffix of one copy of a stacked layer: ``[i]`` per stacking axis, "" for none."""
    return "".join(f"[{i}]" for i in index)


def _stacked_logits(path: str, mean_logits: Any, var_logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both logits as arrays of one shape (copies..., K), or a ValueError naming the layer."""
    mean_logits, var_logits = np.asarray(mean_logits), np.asarray(var_logits)
    if mean_logits.shape != var_logits.shape or mean_logits.ndim == 0:
        raise ValueError(
            f"layer {path!r}: mean_logits of shape {mean_logits.shape} and var_logits of shape "
            f"{var_logits.shape}; a layer needs two logits arrays of one shape (K,), or "
            "(copies..., K) for a stack of layers (nn.scan, nn.vmap, nnx.vmap, nnx.scan)."
        )
    return mean_logits, var_logits


def _weights(
    mean_logits: Any, var_logits: Any, names: Sequence[str], mixing: str = "softmax", radius: Any = 0.0
) -> LayerWeights:
    """The weights one layer blends: softmax, or sparsestmax at the layer's radius."""
    return {
        # jnp.asarray, not a dtype request: float64 logits (a NumPy checkpoint)
        # then become float32 quietly when x64 is off, instead of warning.
        kind: dict(
            zip(
                names,
                np.asarray(mixing_weights_from_logits(jnp.asarray(logits), mixing, radius)).tolist(),
                strict=True,
            )
        )
        for kind, logits in (("mean", mean_logits), ("var", var_logits))
    }


def _copies_weights(
    path: str,
    mean_logits: np.ndarray,
    var_logits: np.ndarray,
    names: Sequence[str],
    mixing: str = "softmax",
    radius: Any = 0.0,
) -> dict[str, LayerWeights]:
    """One entry per copy of a layer whose logits are (copies..., K), ``path[i]`` for copy i.

    Stacking transforms (``nn.scan``, ``nn.vmap``, ``nnx.vmap``, ``nnx.scan``) put the copies on
    the leading axes of every variable, so the normalizers stay on the last axis. An unstacked
    layer, logits (K,), is one entry under ``path`` itself. ``radius`` is one scalar for every
    copy or one per copy.
    """
    copies = mean_logits.shape[:-1]
    radius = np.asarray(radius)
    if radius.shape not in ((), copies):
        raise ValueError(
            f"layer {path!r}: a radius of shape {radius.shape} for logits of shape "
            f"{mean_logits.shape}; expected one radius, or one per copy {copies}."
        )
    radius = np.broadcast_to(radius, copies)
    return {
        path + _copy_suffix(index): _weights(
            mean_logits[index], var_logits[index], names, mixing, radius[index]
        )
        for index in np.ndindex(copies)
    }


def _nnx_layer_weights(path: str, layer: SwitchNorm) -> dict[str, LayerWeights]:
    """The weights an NNX layer blends, of the normalizers its last call used; one entry per copy."""
    mean_logits, var_logits = _stacked_logits(path, layer.mean_logits[...], layer.var_logits[...])
    if mean_logits.shape[-1] != len(layer.normalizers):
        raise ValueError(
            f"layer {path!r} holds logits of shape {mean_logits.shape} for normalizers "
            f"{layer.normalizers}: the normalizers must be the last axis; stack copies of a layer "
            "on a leading axis (nnx.vmap / nnx.scan with the default axis 0)."
        )
    names = layer.blended_normalizers
    index = np.array([layer.normalizers.index(n) for n in names])
    radius = np.asarray(layer.radius[...]) if layer.radius is not None else 0.0
    return _copies_weights(path, mean_logits[..., index], var_logits[..., index], names, layer.mixing, radius)


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


def _from_tree(
    tree: Mapping[str, Any], path: tuple[str, ...], normalizers: Any, out: dict, radii: Mapping[str, Any]
) -> None:
    """Walks a params tree; ``radii`` is the parallel "mixing_radius" subtree (a Linen
    sparsestmax layer holds a ``radius`` there, so its weights are sparsestmax at that radius)."""
    if "mean_logits" in tree and "var_logits" in tree:
        name = "/".join(path)
        mean_logits, var_logits = _stacked_logits(name, tree["mean_logits"], tree["var_logits"])
        names = _names_for(name, mean_logits.shape[-1], normalizers)
        if "radius" in radii:
            sparse = _copies_weights(name, mean_logits, var_logits, names, "sparsestmax", radii["radius"])
            out.update(sparse)
        else:
            out.update(_copies_weights(name, mean_logits, var_logits, names))
        return
    for key, child in tree.items():
        if isinstance(child, Mapping):
            child_radii = radii.get(key, {})
            _from_tree(
                child,
                (*path, str(key)),
                normalizers,
                out,
                child_radii if isinstance(child_radii, Mapping) else {},
            )


def mixing_weights(
    model_or_variables: Any, normalizers: Sequence[str] | Mapping[str, Sequence[str]] | None = None
) -> dict[str, LayerWeights]:
    """The weights every SwitchNorm layer blends, by path and normalizer.

    Softmax of the logits, or, for a ``mixing="sparsestmax"`` layer, sparsestmax at the
    layer's radius (an NNX layer's :class:`switchnorm.MixingRadius`; for Linen, the
    ``"mixing_radius"`` collection of the variables dict): one-hot rows at the end of a
    :func:`switchnorm.radius_schedule`.

    Args:
      model_or_variables: an NNX module (or any NNX graph holding SwitchNorm
        layers), a Linen variables dict (``{"params": ...}``), a params tree, or
        an ``nnx.State``.
      normalizers: only for trees, whose arrays do not carry the names: the
        names of every layer's logits, or a dict from layer path to names. By
        default a layer with 4 logits is read as ("bn", "in", "ln", "gn") and
        one with 2 as ("bn", "ln"), the layer's own defaults.

    An NNX layer built with the default normalizers keeps logits for all four
    but blends only "bn" and "ln" on (N, C) features; once it has been called
    on such input it reports those two, weighted as it blends them, as the
    Linen layer does (which creates only those two logits).

    A stack of layers (``nn.scan``, ``nn.vmap``, ``nnx.vmap``, ``nnx.scan``) holds
    logits of shape (L, K), the copies on the leading axis; each copy is read as a
    layer of its own, at the stack's path suffixed with its index (``"blocks/norm[0]"``,
    ``"blocks/norm[1]"``, ...; ``[i][j]`` for two stacking axes), with the radius of that
    copy. The normalizers are always the last axis, so L == K is read correctly.

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
    if isinstance(model_or_variables, nnx.Module):
        out: dict[str, LayerWeights] = {}
        for path, node in nnx.iter_graph(model_or_variables):
            if isinstance(node, SwitchNorm):
                out.update(_nnx_layer_weights("/".join(str(p) for p in path), node))
        return out
    if isinstance(model_or_variables, nnx.State):
        model_or_variables = nnx.to_pure_dict(model_or_variables)
    if not isinstance(model_or_variables, Mapping):
        raise TypeError(
            "mixing_weights expects an NNX module, a Linen variables dict or a params "
            f"tree, got {type(model_or_variables).__name__}."
        )
    tree = model_or_variables.get("params", model_or_variables)
    radii = model_or_variables.get("mixing_radius", {}) if "params" in model_or_variables else {}
    out = {}
    _from_tree(tree, (), normalizers, out, radii)
    return out


TIE_TOLERANCE = 4 * float(np.finfo(np.float32).eps)
"""Relative difference under which two weights tie: float32 rounding of a softmax."""


def _dominant(row: Mapping[str, float]) -> str | None:
    """The name of the largest weight, or None when another ties with it (e.g. four 0.25)."""
    top = max(row, key=row.__getitem__)
    tied = [n for n, w in row.items() if math.isclose(w, row[top], rel_tol=TIE_TOLERANCE)]
    return top if len(tied) == 1 else None


def format_mixing_weights(weights: Mapping[str, LayerWeights]) -> str:
    """A plain-text table: one row per layer and kind, the dominant weight marked ``*``.

    No weight is marked where the largest ones tie within float32 rounding,
    as the four 0.250 of a freshly built layer do.
    """
    names: list[str] = []
    for layer in weights.values():
        for name in layer["mean"]:
            if name not in names:
                names.append(name)
    layer_width = max([len("layer")] + [len(p or "(root)") for p in weights])
    header = f"{'layer':<{layer_width}}  kind " + "".join(f"{n:>8}" for n in names)
    lines = [header, "-" * len(header)]
    for path, layer in weights.items():
        for kind in ("mean", "var"):
            top = _dominant(layer[kind])
            row = layer[kind]
            cells = "".join(
                f"{row[n]:>7.3f}{'*' if n == top else ' '}" if n in row else f"{'-':>7} " for n in names
            )
            lines.append(f"{(path or '(root)') if kind == 'mean' else '':<{layer_width}}  {kind:<4} {cells}")
    return "\n".join(lines)
