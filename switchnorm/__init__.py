"""switchnorm: Switchable Normalization for JAX and Flax.

One layer computes BatchNorm, InstanceNorm, LayerNorm and GroupNorm statistics
from a single pass over its input and blends them with softmax weights over
learnable logits, so each layer learns which normalizer it wants.

    >>> import switchnorm                      # switchnorm.SwitchNorm: Flax NNX
    >>> from switchnorm import linen as snn    # snn.SwitchNorm: Flax Linen

The submodules ``switchnorm.nnx`` and ``switchnorm.linen`` are importable but
not in ``__all__``: ``from switchnorm import *`` would otherwise shadow
``flax.nnx`` and ``flax.linen`` in the importing namespace.
"""

from switchnorm import linen, nnx  # noqa: F401  (switchnorm.linen.SwitchNorm without an import)
from switchnorm._arguments import MIXINGS, NORMALIZERS, default_normalizers, default_num_groups
from switchnorm._collapse import ChannelAffine, CollapsedNorm, CollapseReport, collapse
from switchnorm._convert import convert
from switchnorm._core import switch_norm
from switchnorm._param_labels import param_labels, weight_decay_mask
from switchnorm._recalibrate import recalibrate, recalibrate_variables
from switchnorm._sparsestmax import radius_schedule, sparsestmax
from switchnorm._stats import BatchStats
from switchnorm.inspect import LayerWeightArrays, format_mixing_weights, mixing_weight_arrays, mixing_weights
from switchnorm.nnx import MixingRadius, SwitchNorm, set_radius

__version__ = "0.1.0"

__all__ = [
    "NORMALIZERS",
    "MIXINGS",
    "BatchStats",
    "ChannelAffine",
    "CollapseReport",
    "CollapsedNorm",
    "LayerWeightArrays",
    "MixingRadius",
    "SwitchNorm",
    "collapse",
    "convert",
    "default_normalizers",
    "default_num_groups",
    "format_mixing_weights",
    "mixing_weight_arrays",
    "mixing_weights",
    "param_labels",
    "radius_schedule",
    "recalibrate",
    "recalibrate_variables",
    "set_radius",
    "sparsestmax",
    "switch_norm",
    "weight_decay_mask",
]
