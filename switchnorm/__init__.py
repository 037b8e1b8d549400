"""switchnorm: Switchable Normalization for JAX and Flax.

One layer computes BatchNorm, InstanceNorm, LayerNorm and GroupNorm statistics
from a single pass over its input and blends them with softmax weights over
learnable logits, so each layer learns which normalizer it wants.

    >>> import switchnorm                      # switchnorm.SwitchNorm: Flax NNX
    >>> from switchnorm import linen as snn    # snn.SwitchNorm: Flax Linen
"""

from switchnorm import linen, nnx
from switchnorm._core import (
    NORMALIZERS,
    default_normalizers,
    default_num_groups,
    switch_norm,
)
from switchnorm.inspect import format_mixing_weights, mixing_weights
from switchnorm.nnx import SwitchNorm

__version__ = "0.1.0"

__all__ = [
    "NORMALIZERS",
    "SwitchNorm",
    "default_normalizers",
    "default_num_groups",
    "format_mixing_weights",
    "linen",
    "mixing_weights",
    "nnx",
    "switch_norm",
]
