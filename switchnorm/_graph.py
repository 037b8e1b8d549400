"""Editing an NNX graph: copy a model and swap one layer for another wherever the graph holds it.

:func:`switchnorm.collapse` and :func:`switchnorm.convert` both return a new model with some
layers replaced; a layer held at several places (shared) is replaced by one new layer, shared
at each of them, and the model passed in is not changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def copy(model: nnx.Module) -> nnx.Module:
    """A deep copy: a new graph of new variables, so that training it leaves ``model`` as it was.

    ``nnx.merge(*nnx.split(model))`` would not do: the graph it builds holds ``model``'s own
    variable objects, which an optimizer's update writes in place.
    """
    return nnx.clone(model)


def references(root: Any, target: Any) -> list[tuple[Any, Any]]:
    """Every ``(parent, key)`` at which the graph of ``root`` holds ``target``: a shared layer has several.

    ``nnx.iter_graph`` visits each node once, at its first path; this walks every edge.
    """
    found, seen = [], set()

    def walk(node: Any) -> None:
        implementation = nnx.graph.get_node_impl(node)
        if id(node) in seen or implementation is None:  # a leaf
            return
        seen.add(id(node))
        for key, child in implementation.node_dict(node).items():
            if child is target:
                found.append((node, key))
            else:
                walk(child)

    walk(root)
    return found


def _put(parent: Any, key: Any, value: Any) -> None:
    if isinstance(parent, nnx.Module) and isinstance(key, str):
        setattr(parent, key, value)
    else:
        parent[key] = value


def replace(root: nnx.Module, node: nnx.Module, replacement: nnx.Module) -> nnx.Module:
    """Puts ``replacement`` wherever ``root``'s graph holds ``node``; returns the new root.

    ``root`` is edited in place (give it a :func:`copy`); the new root is ``replacement``
    itself where ``node`` is ``root``.
    """
    if node is root:
        return replacement
    for parent, key in references(root, node):
        _put(parent, key, replacement)
    return root


def path_name(path: tuple[Any, ...]) -> str:
    """A graph path as the reports print it: ``"layers/1/norm2"``, ``""`` for the root."""
    return "/".join(map(str, path))


def find(model: nnx.Module, kinds: tuple[type, ...]) -> list[tuple[str, Any]]:
    """Every node of ``model`` that is one of ``kinds``, with its path, each shared node once."""
    return [(path_name(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, kinds)]


def replace_each(
    model: nnx.Module, nodes: list[tuple[str, Any]], make: Callable[[str, Any], nnx.Module]
) -> nnx.Module:
    """A copy of ``model`` with each ``(path, node)`` of ``nodes`` (found in ``model``) replaced by ``make``."""
    new = copy(model)
    by_path = dict(find(new, tuple({type(node) for _, node in nodes})))
    for path, _ in nodes:
        node = by_path[path]
        new = replace(new, node, make(path, node))
    return new
