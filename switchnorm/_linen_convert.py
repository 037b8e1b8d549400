"""Moving Linen variables between a model with Flax's normalizers and the same model with SwitchNorm.

A Linen model is code plus a variables dict; swapping ``nn.BatchNorm`` for
:class:`switchnorm.linen.SwitchNorm` in the code changes the dict's layout. Two functions
move trained variables across that swap, one each way:

* :func:`convert_variables`: BatchNorm / GroupNorm model -> SwitchNorm model. Each SwitchNorm
  starts as its source layer (its scale, bias and, for a BatchNorm, running averages), with
  logits that give the source normalizer ``source_weight`` (:mod:`switchnorm._source_weights`).
* :func:`collapse_variables`: SwitchNorm model -> BatchNorm / GroupNorm / LayerNorm /
  InstanceNorm model, at the layers that have chosen one normalizer for their mean and their
  variance, so the trained model runs without switchnorm.

Which layer is which. A layer is a module path in every collection of the dict. Paths the
two models share name the same layer (explicitly named layers, ``norm1`` in both, and every
other module). Flax numbers auto-named layers per class within their scope (``BatchNorm_0``,
``BatchNorm_1``, ``SwitchNorm_0``), so the swap renames them: in each scope, the k-th
``SwitchNorm_*`` (by number) that the other model lacks pairs with the k-th Flax norm layer
(``BatchNorm_*``, ``GroupNorm_*``, ...) that the SwitchNorm model lacks. A model that replaced
its BatchNorms and kept its GroupNorms therefore pairs as it should. Two cases cannot be read
from the variables and are refused, asking for explicit names: the unpaired Flax layers of
one scope are of two kinds (the order in which the model called a BatchNorm and a GroupNorm
is not in the dict; dict order does not survive ``jax.tree`` operations or checkpoints), and
a scope that replaced some layers of a kind and kept others of it (Flax renumbers the kept
ones).

Nothing is dropped silently: every leaf of the source dict lands in the result or is one the
other model has no use for (a SwitchNorm's logits and radius when it collapses; its running
averages when it collapses to a normalizer other than bn), and every leaf of the result comes
from the source or is SwitchNorm state the source has none of (logits, set; ``sample_map``
and ``mixing_radius``, as initialized; a SwitchNorm's running averages when converting a
GroupNorm, as initialized).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from switchnorm import _arguments, _mixing, _source_weights
from switchnorm._collapse import MIN_WEIGHT, _check_min_weight

__all__ = ["collapse_variables", "convert_variables"]

Path = tuple[str, ...]
Key = tuple[str, str]
"""A leaf of one layer: (collection, name), e.g. ("params", "scale")."""
Leaves = dict[Key, Any]

SWITCH = "SwitchNorm"
FLAX_NORMS = {"BatchNorm": "bn", "GroupNorm": "gn", "LayerNorm": "ln", "InstanceNorm": "in"}
"""Flax's normalization layers by class name, and the normalizer each computes."""
SOURCES = {name: n for name, n in FLAX_NORMS.items() if n in _source_weights.SOURCES}
"""The layers :func:`convert_variables` starts a SwitchNorm from: BatchNorm and GroupNorm."""

_AUTO_NAME = re.compile(r"^([A-Za-z]\w*?)_(\d+)$")
_SCALE_BIAS = {("params", "scale"), ("params", "bias")}
_RUNNING = {("batch_stats", "mean"), ("batch_stats", "var")}
_LOGITS = (("params", "mean_logits"), ("params", "var_logits"))
_RADIUS = ("mixing_radius", "radius")
_SAMPLE_MAP = ("params", "sample_map")


def _show(path: Path) -> str:
    return "/".join(path) or "(root)"


def _auto_name(name: str) -> tuple[str, int] | None:
    """("BatchNorm", 3) for "BatchNorm_3": the class and number of a Flax auto-name."""
    match = _AUTO_NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


# -- the variables dict as layers -------------------------------------------------------------


def _layers(variables: Any, argument: str) -> dict[Path, Leaves]:
    """Every module path of ``variables`` with its own leaves, keyed by (collection, name)."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"{argument} must be a Linen variables dict, got {type(variables).__name__}.")
    layers: dict[Path, Leaves] = {}

    def walk(collection: str, path: Path, node: Any) -> None:
        if isinstance(node, Mapping):
            for name, child in node.items():
                walk(collection, (*path, str(name)), child)
        elif path:
            layers.setdefault(path[:-1], {})[(collection, path[-1])] = node
        else:
            raise ValueError(f"{argument}[{collection!r}] is a leaf; a variables dict holds a dict there.")

    for collection, tree in variables.items():
        walk(str(collection), (), tree)
    return layers


def _rebuild(variables: Mapping[str, Any], values: dict[tuple[str, Path], Any]) -> dict[str, Any]:
    """A plain dict shaped like ``variables`` holding ``values[(collection, leaf path)]``."""

    def build(collection: str, path: Path, node: Any) -> Any:
        if isinstance(node, Mapping):
            return {str(k): build(collection, (*path, str(k)), child) for k, child in node.items()}
        return values[(collection, path)]

    return {str(c): build(str(c), (), tree) for c, tree in variables.items()}


def _own(leaf: Any) -> Any:
    """The leaf, copied if it is a mutable NumPy array (the result shares nothing mutable)."""
    return np.array(leaf) if isinstance(leaf, np.ndarray) else leaf


# -- which layer of one model is which layer of the other ---------------------------------------


def _children(layers: dict[Path, Leaves]) -> dict[Path, set[str]]:
    """Every scope with the names of the modules directly in it."""
    children: dict[Path, set[str]] = {}
    for path in layers:
        for depth in range(len(path)):
            children.setdefault(path[:depth], set()).add(path[depth])
    return children


def _auto_named(names: set[str], classes: Any) -> list[tuple[str, int, str]]:
    """(class, number, name) of the auto-named modules of ``classes`` among ``names``, by number."""
    found = [(*parsed, name) for name in names if (parsed := _auto_name(name)) and parsed[0] in classes]
    return sorted(found, key=lambda item: (item[1], item[0]))


def _pair_layers(
    switch: dict[Path, Leaves], plain: dict[Path, Leaves], flax_norms: Any, names: tuple[str, str]
) -> dict[Path, Path]:
    """SwitchNorm path -> Flax norm path for every auto-named layer the swap renamed.

    ``names``: the arguments that hold ``switch`` and ``plain``, for the messages. Paths
    absent from the result are the same in both models.
    """
    switch_name, plain_name = names
    switch_children, plain_children = _children(switch), _children(plain)
    pairs: dict[Path, Path] = {}
    for scope in sorted(switch_children.keys() | plain_children.keys()):
        in_switch, in_plain = switch_children.get(scope, set()), plain_children.get(scope, set())
        switches = _auto_named(in_switch - in_plain, {SWITCH})
        norms = _auto_named(in_plain - in_switch, flax_norms)
        kinds = sorted({kind for kind, _, _ in norms})
        if switches and len(kinds) > 1:
            listed = ", ".join(_show((*scope, name)) for _, _, name in norms)
            raise ValueError(
                f"{plain_name} holds auto-named layers of {len(kinds)} kinds ({listed}) in scope "
                f"{_show(scope)!r} where {switch_name} holds SwitchNorm_*: the order in which the "
                "model called them is not in the variables, so which SwitchNorm replaces which "
                "cannot be told. Name those layers explicitly (name='norm1', ...) in both models."
            )
        kept = _auto_named(in_switch & in_plain, {*kinds, SWITCH})
        if switches and norms and kept:
            raise ValueError(
                f"scope {_show(scope)!r} replaced some {kinds[0]} or SwitchNorm layers and kept "
                f"others ({', '.join(name for _, _, name in kept)}): Flax renumbers the kept ones, so "
                "which layer became which cannot be told from the names. Name those layers "
                "explicitly (name='norm1', ...) in both models."
            )
        for (_, _, switch_layer), (_, _, norm) in zip(switches, norms, strict=False):
            pairs[(*scope, switch_layer)] = (*scope, norm)
        if len(switches) > len(norms):
            path = _show((*scope, switches[len(norms)][2]))
            raise ValueError(
                f"{switch_name} holds a SwitchNorm at {path!r} with no layer in {plain_name} to "
                f"pair with: scope {_show(scope)!r} of {plain_name} has {len(norms)} auto-named "
                f"{'/'.join(flax_norms)} layer(s) that {switch_name} lacks for {len(switches)} SwitchNorm_*."
            )
        if len(norms) > len(switches):
            kind, _, name = norms[len(switches)]
            raise ValueError(
                f"{plain_name} holds a {kind} at {_show((*scope, name))!r} that no SwitchNorm of "
                f"{switch_name} corresponds to (and {switch_name} has no layer of that name): the "
                "two models differ there."
            )
    return pairs


# -- moving the leaves of one layer -------------------------------------------------------------


def _check_shape(path: Path, key: Key, target: Any, source: Any, names: tuple[str, str]) -> None:
    if tuple(np.shape(target)) != tuple(np.shape(source)):
        raise ValueError(
            f"{_show((*path, key[1]))!r} ({key[0]}) has shape {tuple(np.shape(source))} in {names[1]} "
            f"but {tuple(np.shape(target))} in {names[0]}: the two models differ there."
        )


def _move(
    paths: tuple[Path, Path],
    leaves: tuple[Leaves, Leaves],
    names: tuple[str, str],
    made: Leaves | None = None,
    kept: set[Key] | None = None,
    unused: set[Key] | None = None,
) -> Leaves:
    """One layer's leaves in the target: the source's, ``made`` ones, and the target's ``kept``.

    Every target leaf not made or kept comes from the source leaf of the same key; every
    source leaf is moved or ``unused`` (one the target has no use for). ``paths``, ``leaves``
    and ``names`` are (target, source) pairs.
    """
    (target_path, source_path), (target, source) = paths, leaves
    made, kept, unused = made or {}, kept or set(), unused or set()
    result: Leaves = {}
    for key, value in target.items():
        if key in made:
            result[key] = made[key]
        elif key in kept:
            result[key] = value
        elif key in source:
            _check_shape(target_path, key, value, source[key], names)
            result[key] = _own(source[key])
        else:
            raise ValueError(
                f"{_show((*target_path, key[1]))!r} ({key[0]}) of {names[0]} is not in {names[1]} "
                f"(at {_show(source_path)!r}): the two models differ there."
            )
    for key in source.keys() - target.keys() - unused:
        raise ValueError(
            f"{_show((*source_path, key[1]))!r} ({key[0]}) of {names[1]} has no place in {names[0]} "
            f"(at {_show(target_path)!r}): the two models differ there, and it would be dropped."
        )
    return result


def _flax_norm_kind(path: Path, leaves: Leaves, argument: str, kinds: Any) -> str:
    """The class of the Flax norm layer at ``path``: by its auto-name, else by its collections.

    An explicitly named layer with running averages is a BatchNorm; one without is taken
    as a GroupNorm (LayerNorm and InstanceNorm hold the same variables). ValueError if the
    leaves are not those of that class.
    """
    auto = _auto_name(path[-1]) if path else None
    has_running = any(key[0] == "batch_stats" for key in leaves)
    kind = auto[0] if auto and auto[0] in kinds else ("BatchNorm" if has_running else "GroupNorm")
    expected = _SCALE_BIAS | (_RUNNING if kind == "BatchNorm" else set())
    if not leaves.keys() <= expected or (kind == "BatchNorm" and not _RUNNING <= leaves.keys()):
        held = ", ".join(f"{name} ({collection})" for collection, name in sorted(leaves))
        raise ValueError(
            f"{argument} holds {held} at {_show(path)!r}, which is not a {kind}'s variables "
            f"({', '.join(name for _, name in sorted(expected))}): the two models differ there."
        )
    return kind


def _normalizers(path: Path, logits: Any, normalizers: Sequence[str] | None) -> tuple[str, ...]:
    """The normalizers the layer's logits stand for, checked against the logits' length."""
    names = _arguments.validate_normalizers(_arguments.NORMALIZERS if normalizers is None else normalizers)
    if np.shape(logits)[:1] != (len(names),):
        raise ValueError(
            f"SwitchNorm {_show(path)!r} holds logits of shape {tuple(np.shape(logits))} but "
            f"normalizers={names} names {len(names)}: pass normalizers= as the layer was built, "
            "in the order of its logits."
        )
    return names


def _transfer(
    target_variables: Any,
    source_variables: Any,
    names: tuple[str, str],
    flax_norms: Any,
    target_is_switch: bool,
    move_layer: Callable[[tuple[Path, Path], tuple[Leaves, Leaves]], Leaves | None],
) -> tuple[dict[str, Any], int]:
    """The target-shaped variables, every layer moved from its source; and how many were converted.

    ``move_layer`` returns the leaves of a converted layer, or None for a layer copied as it is.
    """
    target = _layers(target_variables, names[0])
    source = _layers(source_variables, names[1])
    held = {c for leaves in source.values() if _LOGITS[0] not in leaves for c, _ in leaves}
    missing = sorted(held - set(target_variables))  # a SwitchNorm's own leaves are moved layer by layer
    if missing:
        raise ValueError(
            f"{names[1]} holds the collection(s) {missing}, which {names[0]} lacks: they would be "
            f"dropped. Remove them from {names[1]} if the new model has no use for them."
        )
    switch, plain = (target, source) if target_is_switch else (source, target)
    pairs = _pair_layers(switch, plain, flax_norms, (names[0], names[1]) if target_is_switch else names[::-1])
    to_source = pairs if target_is_switch else {v: k for k, v in pairs.items()}
    values: dict[tuple[str, Path], Any] = {}
    used: set[Path] = set()
    converted = 0
    for path, leaves in target.items():
        source_path = to_source.get(path, path)
        if source_path not in source:
            raise ValueError(
                f"{names[0]} holds {_show(path)!r}, which has no counterpart in {names[1]} "
                f"(looked for {_show(source_path)!r}): the two models differ there."
            )
        used.add(source_path)
        pair = ((path, source_path), (leaves, source[source_path]))
        moved = move_layer(*pair)
        converted += moved is not None
        if moved is None:
            moved = _move(*pair, names)
        for (collection, name), value in moved.items():
            values[(collection, (*path, name))] = value
    for path in sorted(source.keys() - used):
        raise ValueError(
            f"{names[1]} holds {_show(path)!r}, which has no counterpart in {names[0]}: the two "
            "models differ there, and its variables would be dropped."
        )
    return _rebuild(target_variables, values), converted


# -- the two directions ---------------------------------------------------------------------------


def convert_variables(
    bn_variables: Any,
    sn_variables: Any,
    source_weight: float = 1.0,
    normalizers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The variables of a Linen model with BatchNorm/GroupNorm, moved onto it with SwitchNorm there.

    Rebuild the model with :class:`switchnorm.linen.SwitchNorm` in the places of its
    ``nn.BatchNorm`` (and ``nn.GroupNorm``) layers, ``init`` it, and pass both variables
    dicts: every SwitchNorm then starts as the layer it replaces, its scale and bias (and, from
    a BatchNorm, its running averages) moved over and its logits giving the source normalizer
    ``source_weight`` for the mean and for the variance. Every other leaf (kernels, biases, any
    layer both models share) is copied from ``bn_variables``.

    Layers pair by path (module docstring): an explicit name (``name="norm1"``) is the same
    layer in both models; the k-th auto-named ``SwitchNorm_*`` of a scope is the k-th
    ``BatchNorm_*``/``GroupNorm_*`` of that scope the SwitchNorm model lacks. An auto-named
    source is a BatchNorm or a GroupNorm by its name; an explicitly named one is a BatchNorm
    if it holds ``batch_stats``, else a GroupNorm (a LayerNorm source would be read as one).
    To reproduce a GroupNorm, build its SwitchNorm with the same ``num_groups`` and
    ``epsilon`` (``nn.GroupNorm``'s defaults are 32 groups and 1e-6, which a SwitchNorm of gn
    alone takes too; a blend's are :func:`switchnorm.default_num_groups` and 1e-5): the
    variables cannot tell.

    At ``source_weight=1`` the other normalizers share 2**-24, so the converted model's outputs
    and running-average updates are the source model's to float32 resolution and the other
    logits still get gradients; below 1 they share ``1 - source_weight`` equally
    (:mod:`switchnorm._source_weights`). A SwitchNorm with ``mixing="sparsestmax"`` (a
    ``mixing_radius`` entry) gets logits for that mixing at its initial radius 0.
    ``sample_map`` (``weights="sample"``) stays at its initial zeros.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from switchnorm import linen as snn
      >>> class Net(nn.Module):
      ...     norm: type = nn.BatchNorm
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return self.norm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> bn_vars = Net().init(jax.random.key(0), x)
      >>> sn_vars = Net(snn.SwitchNorm).init(jax.random.key(1), x)
      >>> variables = snn.convert_variables(bn_vars, sn_vars)
      >>> sorted(variables["params"])
      ['Conv_0', 'SwitchNorm_0']
      >>> y = Net(snn.SwitchNorm).apply(variables, x)

    Args:
      bn_variables: the variables (dict or FrozenDict) of the model with Flax's layers.
      sn_variables: the variables of the same model with SwitchNorm in their places, e.g.
        from its ``init``; they give the result's structure, the shapes, and the SwitchNorm
        state the source has none of.
      source_weight: the weight in (0, 1] each converted layer gives its source normalizer
        ("bn" for a BatchNorm, "gn" for a GroupNorm), for its mean and its variance.
      normalizers: the SwitchNorms' ``normalizers``, in the order of their logits;
        ``None``: :data:`switchnorm.NORMALIZERS`, the layer's default. Must include the
        source's normalizer.

    Returns:
      A new plain dict shaped like ``sn_variables``; neither input is changed.

    Raises:
      ValueError: the two models do not correspond (a SwitchNorm with no source, a source
        layer or any other leaf with no place, a shape that differs, a collection the
        SwitchNorm model lacks), the auto-names are ambiguous, no layer converts, or
        ``source_weight`` is outside (0, 1]. Each message names the path.
      TypeError: ``source_weight`` is not a number.
    """
    weight = _source_weights.check_source_weight(source_weight)
    names = ("sn_variables", "bn_variables")

    def move_layer(paths: tuple[Path, Path], leaves: tuple[Leaves, Leaves]) -> Leaves | None:
        (path, source_path), (target, source) = paths, leaves
        if _LOGITS[0] not in target or _LOGITS[0] in source:
            return None  # not a SwitchNorm, or one in both models: copied
        kind = _flax_norm_kind(source_path, source, names[1], SOURCES)
        chosen = SOURCES[kind]
        layer_normalizers = _normalizers(path, target[_LOGITS[0]], normalizers)
        mixing = "sparsestmax" if _RADIUS in target else "softmax"
        try:
            logits = _source_weights.source_logits(layer_normalizers, chosen, weight, mixing)
        except ValueError as error:
            raise ValueError(f"SwitchNorm {_show(path)!r} replaces a {kind}: {error}") from None
        made = {}
        for key in _LOGITS:
            shape, dtype = np.shape(target[key]), target[key].dtype
            column = logits.reshape((len(logits),) + (1,) * (len(shape) - 1))
            made[key] = jnp.asarray(np.broadcast_to(column, shape), dtype)
        kept = {_SAMPLE_MAP, _RADIUS} | (_RUNNING if kind == "GroupNorm" else set())
        return _move(paths, leaves, names, made=made, kept=kept)

    result, converted = _transfer(sn_variables, bn_variables, names, SOURCES, True, move_layer)
    if not converted:
        raise ValueError(
            "convert_variables found no BatchNorm or GroupNorm in bn_variables that a SwitchNorm of "
            "sn_variables replaces: nothing to convert. Build the SwitchNorm model with "
            "switchnorm.linen.SwitchNorm in the places of its nn.BatchNorm/nn.GroupNorm layers."
        )
    return result


def _choice(path: Path, source: Leaves, normalizers: Sequence[str] | None) -> tuple[tuple[str, float], ...]:
    """(normalizer, weight) that the SwitchNorm's mean and variance each give most (least over channels)."""
    if _SAMPLE_MAP in source:
        raise ValueError(
            f"SwitchNorm {_show(path)!r} has weights='sample': each sample's weights depend on its "
            "input, so no fixed Flax layer can replace it; keep a SwitchNorm there."
        )
    mixing = "sparsestmax" if _RADIUS in source else "softmax"
    radius = source.get(_RADIUS, 0.0)
    chosen = []
    for key in _LOGITS:
        logits = jnp.asarray(source[key])
        layer_normalizers = _normalizers(path, logits, normalizers)
        logits = jnp.swapaxes(logits, 0, -1)  # normalizers last: (K,) or (C, K)
        weights = np.asarray(_mixing.mixing_weights_from_logits(logits, mixing, radius))
        least = np.min(np.atleast_2d(weights), axis=0)  # weights="channel": the least over channels
        index = int(np.argmax(least))
        chosen.append((layer_normalizers[index], float(least[index])))
    return tuple(chosen)


def collapse_variables(
    sn_variables: Any,
    flax_variables: Any,
    min_weight: float = MIN_WEIGHT,
    normalizers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The variables of a SwitchNorm model moved onto it with Flax's own layers where it has chosen.

    The way out of switchnorm after training: where a SwitchNorm's mean and variance each give
    one normalizer at least ``min_weight`` (the least over channels for ``weights="channel"``),
    put Flax's layer for it in the model's code (bn: ``nn.BatchNorm``; gn: ``nn.GroupNorm``;
    in: ``nn.InstanceNorm``; ln: ``nn.LayerNorm``), ``init`` that model, and pass its
    variables: the result holds the SwitchNorm's scale and bias (and, for a BatchNorm, its
    running averages) there, and every other leaf from ``sn_variables`` (layers left as
    SwitchNorm included). The model then no longer needs switchnorm. The inverse of
    :func:`convert_variables`, pairing layers the same way (module docstring).

    The layer there must be what the SwitchNorm chose, for its mean and its variance alike:
    checked by auto-name (``BatchNorm_k``, ``GroupNorm_k``, ...); an explicitly named layer is
    a BatchNorm if it holds ``batch_stats``, and otherwise accepted for gn, in or ln (their
    variables are alike). What the variables cannot check is the user's to match: a
    ``GroupNorm`` with the SwitchNorm's group count; the epsilon (``nn.GroupNorm``,
    ``nn.LayerNorm`` and ``nn.InstanceNorm`` default to 1e-6, a SwitchNorm blend to 1e-5); for ln, a
    ``nn.LayerNorm(reduction_axes=(1, 2, 3))`` on (N, H, W, C) input, since SwitchNorm's ln
    normalizes over all but the batch axis and Flax's LayerNorm by default over the last.
    A collapsed layer drops its logits (and radius), and for gn, in or ln its bn running
    averages, which the chosen normalizer does not use.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from switchnorm import linen as snn
      >>> class Net(nn.Module):
      ...     norm: type = nn.BatchNorm
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return self.norm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> bn_vars = Net().init(jax.random.key(0), x)
      >>> sn_vars = snn.convert_variables(bn_vars, Net(snn.SwitchNorm).init(jax.random.key(1), x))
      >>> plain = snn.collapse_variables(sn_vars, bn_vars)  # bn_vars: only its structure is read
      >>> y = Net().apply(plain, x)

    Args:
      sn_variables: the variables (dict or FrozenDict) of the model with SwitchNorm.
      flax_variables: the variables of the same model with Flax's layers in the places of
        the SwitchNorms that chose, e.g. from its ``init``; they give the result's structure.
      min_weight: in (0.5, 1]: the weight the mean's and the variance's normalizer must each
        reach for a layer to be replaced.
      normalizers: the SwitchNorms' ``normalizers``, in the order of their logits;
        ``None``: :data:`switchnorm.NORMALIZERS`, the layer's default.

    Returns:
      A new plain dict shaped like ``flax_variables``; neither input is changed.

    Raises:
      ValueError: a Flax layer stands where its SwitchNorm chose another normalizer, chose
        none, or has ``weights="sample"``; the two models do not otherwise correspond (as in
        :func:`convert_variables`); or nothing collapses. Each message names the path.
    """
    threshold = _check_min_weight(min_weight)
    names = ("flax_variables", "sn_variables")

    def move_layer(paths: tuple[Path, Path], leaves: tuple[Leaves, Leaves]) -> Leaves | None:
        (path, source_path), (target, source) = paths, leaves
        if _LOGITS[0] not in source or _LOGITS[0] in target:
            return None  # not a SwitchNorm, or one in both models: copied
        kind = _flax_norm_kind(path, target, names[0], FLAX_NORMS)
        (mean, mean_weight), (var, var_weight) = _choice(source_path, source, normalizers)
        auto = _auto_name(path[-1])
        explicit = not (auto and auto[0] in FLAX_NORMS)
        wanted = {"bn"} if kind == "BatchNorm" else ({"gn", "in", "ln"} if explicit else {FLAX_NORMS[kind]})
        if mean != var or min(mean_weight, var_weight) < threshold:
            fix = f"keep a SwitchNorm there, or lower min_weight (now {threshold:g})"
        elif mean not in wanted:
            fix = f"put nn.{next(k for k, n in FLAX_NORMS.items() if n == mean)} there"
        else:
            fix = ""
        if fix:
            raise ValueError(
                f"layer {_show(source_path)!r} chose {mean}/{var} (weights {mean_weight:.4g}/{var_weight:.4g}) "
                f"but the target holds a {kind} there ({_show(path)!r} of {names[0]}): {fix}."
            )
        unused = {*_LOGITS, _RADIUS} | (set() if kind == "BatchNorm" else _RUNNING)
        return _move(paths, leaves, names, unused=unused)

    result, collapsed = _transfer(flax_variables, sn_variables, names, FLAX_NORMS, False, move_layer)
    if not collapsed:
        raise ValueError(
            "collapse_variables found no Flax norm layer in flax_variables in the place of a SwitchNorm "
            "of sn_variables: nothing to collapse. Build the model with nn.BatchNorm/nn.GroupNorm "
            "where its SwitchNorms chose bn/gn."
        )
    return result
