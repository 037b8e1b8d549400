"""The optimizers of the training wing: SGD or AdamW, the mixing logits left out of weight decay.

The mixing logits choose between normalizers; the SN paper learns them
freely, without weight decay (:func:`switchnorm.weight_decay_mask`, the
default ``mask`` here). Sparse SN (Shao et al., 2019) goes further and trains
the logits with a tenth of the learning rate and clipped gradients:
``make_optimizer(mixing_lr_scale=..., mixing_clip=...)`` builds that
treatment through ``optax.multi_transform`` and
:func:`switchnorm.param_labels`. This module imports only optax and the layer.
"""

from __future__ import annotations

from typing import Any

import optax

from switchnorm._param_labels import MIXING, REST, param_labels, weight_decay_mask

OPTIMIZERS = ("sgd", "adamw")
"""The choices of ``make_optimizer(name=...)``."""


def warmup_cosine(learning_rate: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to 0.

    Example::

      >>> from switchnorm import train
      >>> schedule = train.warmup_cosine(0.1, total_steps=100, warmup_steps=10)
      >>> float(schedule(0)), round(float(schedule(10)), 6), float(schedule(100))
      (0.0, 0.1, 0.0)
    """
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), 0.0
    )


def _base_optimizer(
    name: str, schedule: optax.ScalarOrSchedule, momentum: float, weight_decay: float, mask: Any
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum or AdamW on ``schedule``, weight decay masked by ``mask``."""
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            optax.sgd(schedule, momentum=momentum, nesterov=True),
        )
    if name == "adamw":
        return optax.adamw(schedule, b1=momentum, weight_decay=weight_decay, mask=mask)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(
    name: str,
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    mask: Any = weight_decay_mask,
    mixing_lr_scale: float = 1.0,
    mixing_clip: float | None = None,
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum or AdamW, weight decay masked by ``mask``.

    With the defaults (``mixing_lr_scale=1``, no ``mixing_clip``) every
    parameter shares one optimizer. Otherwise the mixing logits
    (:func:`param_labels`) get their own, through ``optax.multi_transform``:
    the same optimizer without weight decay, its learning rate times
    ``mixing_lr_scale``, their gradients first clipped to a global norm of at
    most ``mixing_clip`` (taken over all the logits together). The other
    parameters are trained exactly as without these options.

    Args:
      name: "sgd" or "adamw".
      schedule: the learning rate, a float or an optax schedule.
      momentum: SGD's momentum, AdamW's ``b1``.
      weight_decay: decoupled weight decay (AdamW's; for SGD added to the
        gradient, as ``torch.optim.SGD`` does).
      mask: which leaves weight decay touches; by default all but the mixing logits.
      mixing_lr_scale: the logits' learning rate over everyone else's (Sparse
        SN uses 0.1).
      mixing_clip: if set, the largest global norm of the logits' gradient.

    Example::

      >>> import jax.numpy as jnp
      >>> from switchnorm.train import make_optimizer
      >>> params = {"norm": {"var_logits": jnp.zeros(2), "scale": jnp.ones(2)}}
      >>> tx = make_optimizer("sgd", 1.0, momentum=0.0, mixing_lr_scale=0.5, mixing_clip=5.0)
      >>> grads = {"norm": {"var_logits": jnp.array([6.0, 8.0]), "scale": jnp.ones(2)}}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["norm"]["var_logits"]  # clipped to norm 5, then half the learning rate
      Array([-1.5, -2. ], dtype=float32)
      >>> updates["norm"]["scale"]  # the rest: as without the options
      Array([-1., -1.], dtype=float32)
    """
    base = _base_optimizer(name, schedule, momentum, weight_decay, mask)
    if mixing_lr_scale == 1.0 and mixing_clip is None:
        return base
    if not mixing_lr_scale > 0:
        raise ValueError(f"mixing_lr_scale must be positive, got {mixing_lr_scale!r}.")
    if mixing_clip is not None and not mixing_clip > 0:
        raise ValueError(f"mixing_clip must be positive or None, got {mixing_clip!r}.")
    clip = [] if mixing_clip is None else [optax.clip_by_global_norm(mixing_clip)]
    logits = optax.chain(
        *clip, _base_optimizer(name, schedule, momentum, 0.0, None), optax.scale(mixing_lr_scale)
    )
    return optax.multi_transform({MIXING: logits, REST: base}, param_labels)
