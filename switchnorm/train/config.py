"""The one run configuration: every default, every check, and its JSON form (``config.json``).

:class:`RunConfig` is what ``switchnorm train`` runs and what a run directory's
``config.json`` holds. The command line and the file go through the same
checks (:meth:`RunConfig.from_mapping`), so a value refused on the command line
is refused in the file too, with the same words, and every value is checked,
with its range, before anything is allocated or written.

``TrainConfig`` (the loop's own, smaller config) takes its defaults from the
constants here, so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

# -- the defaults: the one place each is written ----------------------------------------------

DATASET = "mnist1d"
NORM = "sn"
WEIGHTS = "layer"  # one blend per layer (Switchable Normalization); "channel" and "sample" are finer
OPTIMIZER = "adamw"
LEARNING_RATE = 3e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2
MIXING_LR_SCALE = 1.0  # the mixing logits' learning rate over the others' (Sparse SN: 0.1)
MIXING_CLIP = None  # the largest global norm of the logits' gradient; None: no clipping
RECALIBRATE = (
    0  # training batches to recompute the bn running averages over before the last evaluation; 0: none
)
WARMUP_EPOCHS = 1.0
EVAL_EVERY = 5
SEED = 0
DTYPE = "float32"
DTYPES = ("float32", "bfloat16")

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chosen so that each finishes quickly on a 2-core CPU (see docs/training.md).
    "mnist1d": {"epochs": 20, "batch_size": 64},
    "digits": {"epochs": 30, "batch_size": 32},
    "synthetic": {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2},
}
EPOCHS = DATASET_DEFAULTS[DATASET]["epochs"]
BATCH_SIZE = DATASET_DEFAULTS[DATASET]["batch_size"]

# -- the ranges ------------------------------------------------------------------------------

MAX_SEED = 2**32 - 1  # what jax.random.key and NumPy's generators take without wrapping
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**20
MAX_STEPS = 2**31 - 1  # the step counter is int32
MAX_CLASSES = 100_000
MAX_INPUT_SIZE = 2**16  # values in one example (digits: 64, MNIST-1D: 40)
MAX_INPUT_RANK = 4


_MAY_BE_NONE = ("mixing_clip", "collapsed")  # settings whose None is a value, not a gap to fill
_CHOICE_KEYS = ("affine", "mean", "var")  # one collapsed layer's record (switchnorm._collapse.LayerChoice)


class ConfigError(ValueError):
    """A setting of the wrong type or out of its range.

    Attributes:
      field: the setting's name in ``config.json`` (``learning_rate``).
      problem: what is wrong, as the end of a sentence naming the setting.
    """

    def __init__(self, field: str, problem: str, *, standalone: bool = False):
        super().__init__(problem if standalone else f"{field} {problem}")
        self.field = field
        self.problem = problem
        self.standalone = standalone

    def naming(self, label: str) -> str:
        """The message with the setting called ``label`` (e.g. ``--lr`` on the command line)."""
        return self.problem if self.standalone else f"{label} {self.problem}"


def _choices(field: str) -> tuple[str, ...]:
    from switchnorm import _arguments
    from switchnorm.train import data, models, optim

    return {
        "dataset": tuple(data.DATASETS),
        "model": tuple(models.MODELS),
        "norm": tuple(models.NORMS),
        "optimizer": tuple(optim.OPTIMIZERS),
        "dtype": DTYPES,
        "weights": _arguments.WEIGHTS,
    }[field]


def _check_choice(field: str, value: Any) -> None:
    choices = _choices(field)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            field, f"unknown {field} {value!r}; choose one of {', '.join(choices)}", standalone=True
        )


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(field, f"must be {what} (at most {high}), got {value}")


def _check_float(field: str, value: Any, accept: Callable[[float], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(field, f"must be {what}, got {value!r}")
    if not math.isfinite(value) or not accept(value):
        raise ConfigError(field, f"must be {what}, got {value}")


def _check_shape(value: Any) -> None:
    field = "input_shape"
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_INPUT_RANK:
        raise ConfigError(field, f"must be a list of 1 to {MAX_INPUT_RANK} positive integers, got {value!r}")
    for size in value:
        _check_int(field, size, 1, MAX_INPUT_SIZE)
    if math.prod(value) > MAX_INPUT_SIZE:
        raise ConfigError(field, f"must have at most {MAX_INPUT_SIZE} values per example, got {value!r}")


def _check_collapsed(value: Any) -> None:
    """``collapsed``: layer path -> {"mean": name, "var": name, "affine": bool}, as LayerChoice.to_dict."""
    from switchnorm import NORMALIZERS

    field = "collapsed"
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(field, f"must be a non-empty JSON object of layer path -> choice, got {value!r}")
    for path, choice in value.items():
        if not isinstance(choice, Mapping) or sorted(choice) != list(_CHOICE_KEYS):
            raise ConfigError(
                field, f"of layer {path!r} must have exactly the keys {_CHOICE_KEYS}, got {choice!r}"
            )
        for kind in ("mean", "var"):
            if choice[kind] not in NORMALIZERS:
                raise ConfigError(
                    field, f"of layer {path!r}: {kind} {choice[kind]!r} is not one of {NORMALIZERS}"
                )
        if not isinstance(choice["affine"], bool) or (
            choice["affine"] and (choice["mean"], choice["var"]) != ("bn", "bn")
        ):
            raise ConfigError(
                field, f"of layer {path!r}: affine must be a bool, true only for bn/bn, got {choice!r}"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, checked on construction (raises :class:`ConfigError`).

    ``epochs``, ``batch_size``, ``learning_rate`` and ``model`` left ``None``
    take the dataset's defaults (:meth:`resolved`). ``input_shape``,
    ``num_classes`` and ``steps_per_epoch`` describe the data the run trained
    on; they are filled in from the loaded dataset and let ``inspect`` rebuild
    the model without loading it. ``mixing_clip`` is ``None`` (no clipping) by
    choice, not for want of a value; a ``config.json`` written before
    ``mixing_lr_scale``, ``mixing_clip`` or ``weights`` existed loads with their defaults
    (``weights="layer"``: one blend per layer, the only kind there was). ``weights`` other than
    "layer" needs a norm that learns mixing weights (sn or ssn).
    ``collapsed`` is set only in a run made by ``switchnorm collapse``: the layers that
    compute only their chosen normalizers (``switchnorm.collapse``), by path.
    """

    dataset: str = DATASET
    model: str | None = None
    norm: str = NORM
    weights: str = WEIGHTS
    optimizer: str = OPTIMIZER
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    warmup_epochs: float = WARMUP_EPOCHS
    eval_every: int = EVAL_EVERY
    seed: int = SEED
    dtype: str = DTYPE
    mixing_lr_scale: float = MIXING_LR_SCALE
    mixing_clip: float | None = MIXING_CLIP
    recalibrate: int = RECALIBRATE
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    steps_per_epoch: int | None = None
    collapsed: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        for field in ("dataset", "norm", "optimizer", "dtype", "weights"):
            _check_choice(field, getattr(self, field))
        self._check_weights_fit_norm()
        if self.model is not None:
            _check_choice("model", self.model)
        self._check_numbers()
        self._check_data_fields()
        if self.collapsed is not None:
            _check_collapsed(self.collapsed)
        if self.model is not None:
            self._check_model_fits()

    def _check_weights_fit_norm(self) -> None:
        from switchnorm.train import models

        try:
            models.check_weights(self.norm, self.weights)
        except ValueError as error:
            # "weights 'channel' needs ...": the field name goes, so that the command line names its flag
            raise ConfigError("weights", str(error).rstrip(".").removeprefix("weights ")) from None

    def _check_numbers(self) -> None:
        if self.epochs is not None:
            _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.learning_rate is not None:
            _check_float("learning_rate", self.learning_rate, lambda v: v > 0, "a positive number")
        _check_float("momentum", self.momentum, lambda v: 0 <= v < 1, "a number >= 0 and < 1")
        _check_float("weight_decay", self.weight_decay, lambda v: 0 <= v <= 1, "a number between 0 and 1")
        most = self.epochs or MAX_EPOCHS
        _check_float(
            "warmup_epochs", self.warmup_epochs, lambda v: 0 <= v <= most, f"a number between 0 and {most}"
        )
        _check_int("eval_every", self.eval_every, 1, MAX_EPOCHS)
        _check_float("mixing_lr_scale", self.mixing_lr_scale, lambda v: v > 0, "a positive number")
        if self.mixing_clip is not None:
            _check_float("mixing_clip", self.mixing_clip, lambda v: v > 0, "a positive number")
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("recalibrate", self.recalibrate, 0, MAX_STEPS)

    def _check_data_fields(self) -> None:
        if self.input_shape is not None:
            _check_shape(self.input_shape)
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 2, MAX_CLASSES)
        if self.steps_per_epoch is not None:
            _check_int("steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
            if self.epochs is not None and self.steps_per_epoch * self.epochs > MAX_STEPS:
                raise ConfigError(
                    "epochs",
                    f"times steps_per_epoch ({self.epochs} x {self.steps_per_epoch}) "
                    f"must be at most {MAX_STEPS} steps",
                )

    def _check_model_fits(self) -> None:
        from switchnorm.train import models

        assert self.model is not None  # __post_init__ calls this only when a model is named
        rank = models.INPUT_RANK[self.model]
        try:
            models.check_norm(self.norm, spatial=rank is not None)
        except ValueError as error:
            raise ConfigError("norm", str(error).rstrip("."), standalone=True) from None
        if rank is not None and self.input_shape is not None and len(self.input_shape) != rank:
            raise ConfigError(
                "input_shape", f"must have rank {rank} for model {self.model!r}, got {list(self.input_shape)}"
            )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """A config from a JSON object; unknown settings are refused, absent ones take defaults."""
        if not isinstance(values, Mapping):
            raise ConfigError("config", f"must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"is not a setting of a run (known: {', '.join(sorted(known))})")
        return cls(**values)

    def resolved(self) -> RunConfig:
        """This config with the dataset's defaults filled in for what was left ``None``."""
        from switchnorm.train import models

        defaults = {**DATASET_DEFAULTS[self.dataset]}
        defaults.setdefault("learning_rate", LEARNING_RATE)
        defaults["model"] = models.DEFAULT_MODEL[self.dataset]
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def with_data(self, input_shape: tuple[int, ...], num_classes: int, steps_per_epoch: int) -> RunConfig:
        return dataclasses.replace(
            self, input_shape=tuple(input_shape), num_classes=num_classes, steps_per_epoch=steps_per_epoch
        )

    # -- use ----------------------------------------------------------------------------

    def train_config(self) -> Any:
        """The :class:`~switchnorm.train.loop.TrainConfig` of this run."""
        from switchnorm.train.loop import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_json(self) -> str:
        """Strict JSON (no NaN), keys sorted: the bytes of ``config.json``."""
        values = dataclasses.asdict(self)
        if values["input_shape"] is not None:
            values["input_shape"] = list(values["input_shape"])
        return json.dumps(values, indent=2, sort_keys=True, allow_nan=False) + "\n"

    @property
    def complete(self) -> bool:
        """True once every setting, the data description included, is known."""
        return not self.missing()

    def missing(self) -> list[str]:
        """The settings still unknown (``None``); ``mixing_clip`` and ``collapsed`` are ``None`` by
        choice, never missing."""
        return [k for k, v in dataclasses.asdict(self).items() if v is None and k not in _MAY_BE_NONE]
