"""The training wing of switchnorm: datasets, example models, a training loop, the command.

Imports only jax, flax, optax and numpy; scikit-learn, mnist1d, orbax,
matplotlib and tqdm are imported when a function needs them (install them with
``pip install switchnorm[train]``). The layer never imports this package.

    >>> from switchnorm.train import Trainer, TrainConfig, load_dataset, build_model
    >>> from switchnorm.train import weight_decay_mask, param_labels, WeightHistory
"""

from switchnorm._param_labels import MIXING_LOGITS, param_labels, weight_decay_mask
from switchnorm.train.config import TrainConfig
from switchnorm.train.data import DATASETS, Dataset, load_dataset
from switchnorm.train.loop import (
    Callback,
    LinenAdapter,
    ShardingPlan,
    Trainer,
    TrainState,
    WeightHistory,
    initial_state,
    make_tx,
    model_weights,
)
from switchnorm.train.models import MODELS, NORMS, build_model
from switchnorm.train.optim import make_optimizer, warmup_cosine

__all__ = [
    "DATASETS",
    "MIXING_LOGITS",
    "MODELS",
    "NORMS",
    "Callback",
    "Dataset",
    "LinenAdapter",
    "ShardingPlan",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "WeightHistory",
    "build_model",
    "initial_state",
    "load_dataset",
    "make_optimizer",
    "make_tx",
    "model_weights",
    "param_labels",
    "warmup_cosine",
    "weight_decay_mask",
]
