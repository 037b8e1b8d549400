"""Telling SwitchNorm's mixing logits apart from the other parameters, for optax.

The mixing logits choose between normalizers. The SN paper learns them freely,
without weight decay, which would pull every layer back towards the uniform
blend; Sparse SN trains them with their own learning rate and clipped
gradients. :func:`weight_decay_mask` is the optax mask that leaves them out of
weight decay, and :func:`param_labels` labels them for
``optax.multi_transform``. Both work on any pytree keyed by name: an NNX
``State``, a Linen params dict, a plain nested dict. Neither needs more than JAX.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax

MIXING_LOGITS = ("mean_logits", "var_logits")
"""The names of SwitchNorm's mixing-logit parameters."""

MIXING = "mixing"
REST = "rest"
"""The two labels of :func:`param_labels`."""


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    """The parameter's own name: the last key of its path that is not a Variable's ``value``."""
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))
        if name not in ("value", "raw_value"):
            return None if name is None else str(name)
    return None


def weight_decay_mask(params: Any, exclude: Collection[str] = MIXING_LOGITS) -> Any:
    """A pytree of bools, shaped like ``params``: True where weight decay applies.

    A leaf is excluded when its own name (the last key of its path) is in
    ``exclude``; by default that is every SwitchNorm layer's ``mean_logits``
    and ``var_logits``. Pass it (or a ``functools.partial`` of it) as the
    ``mask`` of ``optax.add_decayed_weights`` or ``optax.adamw``.

    Example::

      >>> import jax.numpy as jnp, optax
      >>> import switchnorm
      >>> params = {"norm": {"mean_logits": jnp.zeros(4), "scale": jnp.ones(8)}}
      >>> switchnorm.weight_decay_mask(params)
      {'norm': {'mean_logits': False, 'scale': True}}
      >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=switchnorm.weight_decay_mask)
    """
    excluded = frozenset(exclude)
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in excluded, params)


def param_labels(params: Any, mixing: Collection[str] = MIXING_LOGITS) -> Any:
    """A pytree of labels, shaped like ``params``: ``"mixing"`` for the mixing logits, else ``"rest"``.

    A leaf is a mixing logit when its own name (the last key of its path) is in
    ``mixing``, as in :func:`weight_decay_mask`. Pass it as the ``param_labels``
    of ``optax.multi_transform`` to give the logits their own optimizer.

    Example::

      >>> import jax.numpy as jnp, optax
      >>> import switchnorm
      >>> params = {"norm": {"mean_logits": jnp.zeros(4), "scale": jnp.ones(8)}}
      >>> switchnorm.param_labels(params)
      {'norm': {'mean_logits': 'mixing', 'scale': 'rest'}}
      >>> tx = optax.multi_transform(
      ...     {"mixing": optax.sgd(1e-3), "rest": optax.adamw(1e-2)}, switchnorm.param_labels)
    """
    names = frozenset(mixing)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: MIXING if _leaf_name(path) in names else REST, params
    )
