"""Optax pieces for training SwitchNorm models: the weight-decay mask and the optimizers.

The mixing logits choose between normalizers; the SN paper learns them
freely, without weight decay, which would pull every layer back towards the
uniform blend. :func:`weight_decay_mask` builds the optax mask that leaves them
out; :func:`make_optimizer` uses it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import optax

MIXING_LOGITS = ("mean_logits", "var_logits")
"""The names of SwitchNorm's mixing-logit parameters."""

OPTIMIZERS = ("sgd", "adamw")
"""The choices of ``make_optimizer(name=...)``."""


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
    and ``var_logits``. Works on NNX ``State`` objects, Linen params dicts and
    any other pytree keyed by name. Pass it (or a ``functools.partial`` of it)
    as the ``mask`` of ``optax.add_decayed_weights`` or ``optax.adamw``.

    Example::

      >>> import jax.numpy as jnp, optax
      >>> from switchnorm.train import weight_decay_mask
      >>> params = {"norm": {"mean_logits": jnp.zeros(4), "scale": jnp.ones(8)}}
      >>> weight_decay_mask(params)
      {'norm': {'mean_logits': False, 'scale': True}}
      >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=weight_decay_mask)
    """
    excluded = frozenset(exclude)
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in excluded, params)


def warmup_cosine(learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to 0."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), 0.0
    )


def make_optimizer(
    name: str,
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any = weight_decay_mask,
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum or AdamW, weight decay masked by ``mask``.

    Args:
      name: "sgd" or "adamw".
      schedule: the learning rate, a float or an optax schedule.
      momentum: SGD's momentum, AdamW's ``b1``.
      weight_decay: decoupled weight decay (AdamW's; for SGD added to the
        gradient, as ``torch.optim.SGD`` does).
      mask: which leaves weight decay touches; by default all but the mixing logits.
    """
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            optax.sgd(schedule, momentum=momentum, nesterov=True),
        )
    if name == "adamw":
        return optax.adamw(schedule, b1=momentum, weight_decay=weight_decay, mask=mask)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
