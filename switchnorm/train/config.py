"""The one configuration of a run: every default, every check, and its JSON form (``config.json``).

:class:`TrainConfig` is what the training loop trains with, what ``switchnorm train`` runs and
what a run directory's ``config.json`` holds. The command line and the file go through the same
checks, so a value refused on one is refused on the other in the same words, and every value is
checked, with its range, before anything is allocated or written.

A ``config.json`` is complete or refused: every setting must be there, with its type, except the
few added after runs were first recorded (:data:`LATER_SETTINGS`), which read as the value such a
run had. A missing ``seed`` is an error, never a silent 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from switchnorm import _arguments
from switchnorm.train import data, models, optim

DATASET = "mnist1d"
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chosen so that each finishes quickly on a 2-core CPU (see docs/training.md).
    "mnist1d": {"model": "resnet1d", "epochs": 20, "batch_size": 64, "learning_rate": 3e-3},
    "digits": {"model": "resnet2d", "epochs": 30, "batch_size": 32, "learning_rate": 3e-3},
    "synthetic": {"model": "mlp", "epochs": 10, "batch_size": 32, "learning_rate": 1e-2},
}
"""The settings that depend on the dataset; the defaults of the others are the fields' own."""

LATER_SETTINGS: dict[str, Any] = {
    "mixing_lr_scale": 1.0,
    "mixing_clip": None,
    "weights": "layer",
    "recalibrate": 0,
    "collapsed": None,
}
"""The settings switchnorm added after runs were first recorded, with the value an older run had:
the only ones a ``config.json`` may leave out."""

DTYPES = ("float32", "bfloat16")
MAX_SEED = 2**32 - 1  # what jax.random.key and NumPy's generators take without wrapping
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 2**20
MAX_STEPS = 2**31 - 1  # the step counter is int32
MAX_CLASSES = 100_000
MAX_INPUT_SIZE = 2**16  # values in one example (digits: 64, MNIST-1D: 40)
MAX_INPUT_RANK = 4
MAX_FLOAT = float(np.finfo(np.float32).max)  # the training runs in float32: larger values overflow

_DATA_FIELDS = ("input_shape", "num_classes", "steps_per_epoch")
_MAY_BE_NONE = ("mixing_clip", "collapsed")  # None is a value here (no clipping, not collapsed)
_CHOICE_KEYS = ("affine", "mean", "var")  # one collapsed layer: switchnorm._collapse.LayerChoice


class ConfigError(ValueError):
    """A setting of the wrong type or out of its range.

    Attributes:
      field: the setting's name in ``config.json`` (``learning_rate``).
      problem: what is wrong, as the end of a sentence naming the setting.
    """

    def __init__(self, field: str, problem: str, *, standalone: bool = False):
        super().__init__(problem if standalone else f"{field} {problem}")
        self.field, self.problem, self.standalone = field, problem, standalone

    def naming(self, label: str) -> str:
        """The message with the setting called ``label`` (e.g. ``--lr`` on the command line)."""
        return self.problem if self.standalone else f"{label} {self.problem}"


_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": tuple(data.DATASETS),
    "model": tuple(models.MODELS),
    "norm": models.NORMS,
    "optimizer": optim.OPTIMIZERS,
    "dtype": DTYPES,
    "weights": _arguments.WEIGHTS,
}


def _check_choice(field: str, value: Any) -> None:
    if not isinstance(value, str) or value not in _CHOICES[field]:
        choices = ", ".join(_CHOICES[field])
        raise ConfigError(field, f"unknown {field} {value!r}; choose one of {choices}", standalone=True)


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


def _check_positive(field: str, value: Any) -> None:
    what = f"a positive number (at most {MAX_FLOAT:.3g}, float32's largest)"
    _check_float(field, value, lambda v: 0 < v <= MAX_FLOAT, what)


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
    field = "collapsed"
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(field, f"must be a non-empty JSON object of layer path -> choice, got {value!r}")
    for path, choice in value.items():
        if not isinstance(choice, Mapping) or sorted(choice) != list(_CHOICE_KEYS):
            raise ConfigError(field, f"of layer {path!r} must have exactly the keys {_CHOICE_KEYS}")
        for kind in ("mean", "var"):
            if choice[kind] not in _arguments.NORMALIZERS:
                raise ConfigError(field, f"of layer {path!r}: {kind} {choice[kind]!r} is not a normalizer")
        if not isinstance(choice["affine"], bool) or (
            choice["affine"] and (choice["mean"], choice["var"]) != ("bn", "bn")
        ):
            raise ConfigError(field, f"of layer {path!r}: affine must be a bool, true only for bn/bn")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, checked on construction (raises :class:`ConfigError`).

    The training loop reads the optimization settings (``epochs`` to ``recalibrate``); the
    command also the rest. :meth:`for_dataset` gives a dataset's own defaults
    (:data:`DATASET_DEFAULTS`). ``model`` None means the dataset's model. ``input_shape``,
    ``num_classes`` and ``steps_per_epoch`` describe the data a run trained on, filled in from
    the loaded dataset, so that ``inspect`` rebuilds the model without loading it.
    ``mixing_clip`` None means no clipping; ``collapsed`` is set only in a run made by
    ``switchnorm collapse``: the layers that compute only their chosen normalizers, by path.

    Attributes:
      epochs: passes over the training set.
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      optimizer: "sgd" (Nesterov momentum) or "adamw".
      learning_rate: the peak learning rate.
      momentum: SGD momentum or AdamW's b1.
      weight_decay: applied to every parameter except the mixing logits.
      warmup_epochs: linear warmup length, then cosine decay to zero.
      eval_every: evaluate every this many epochs, and always after the last one.
      seed: the data order (and, in the command, the model's initialization).
      mixing_lr_scale: the mixing logits' learning rate over everyone else's (Sparse SN: 0.1).
      mixing_clip: if set, the largest global norm of the mixing logits' gradient.
      recalibrate: if positive, before the last evaluation every SwitchNorm's bn running
        averages are recomputed over this many training batches (:func:`switchnorm.recalibrate`).
    """

    dataset: str = DATASET
    model: str | None = None
    norm: str = "sn"
    weights: str = "layer"  # one blend per layer (Switchable Normalization); "channel", "sample"
    optimizer: str = "adamw"
    epochs: int = DATASET_DEFAULTS[DATASET]["epochs"]
    batch_size: int = DATASET_DEFAULTS[DATASET]["batch_size"]
    learning_rate: float = DATASET_DEFAULTS[DATASET]["learning_rate"]
    momentum: float = 0.9
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    eval_every: int = 5
    seed: int = 0
    dtype: str = "float32"
    mixing_lr_scale: float = 1.0
    mixing_clip: float | None = None
    recalibrate: int = 0
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    steps_per_epoch: int | None = None
    collapsed: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        for field in ("dataset", "norm", "optimizer", "dtype", "weights"):
            _check_choice(field, getattr(self, field))
        try:
            models.check_weights(self.norm, self.weights)
        except ValueError as error:  # "weights 'channel' needs ...": the command line names its flag
            raise ConfigError("weights", str(error).rstrip(".").removeprefix("weights ")) from None
        self._check_numbers()
        self._check_data()
        if self.collapsed is not None:
            _check_collapsed(self.collapsed)
        if self.model is not None:
            _check_choice("model", self.model)
            self._check_model_fits()

    def _check_numbers(self) -> None:
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_positive("learning_rate", self.learning_rate)
        _check_float("momentum", self.momentum, lambda v: 0 <= v < 1, "a number >= 0 and < 1")
        _check_float("weight_decay", self.weight_decay, lambda v: 0 <= v <= 1, "a number between 0 and 1")
        _check_float(
            "warmup_epochs",
            self.warmup_epochs,
            lambda v: 0 <= v <= self.epochs,
            f"a number between 0 and {self.epochs}",
        )
        _check_int("eval_every", self.eval_every, 1, MAX_EPOCHS)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_positive("mixing_lr_scale", self.mixing_lr_scale)
        if self.mixing_clip is not None:
            _check_positive("mixing_clip", self.mixing_clip)
        _check_int("recalibrate", self.recalibrate, 0, MAX_STEPS)

    def _check_data(self) -> None:
        if self.input_shape is not None:
            _check_shape(self.input_shape)
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 2, MAX_CLASSES)
        if self.steps_per_epoch is not None:
            _check_int("steps_per_epoch", self.steps_per_epoch, 1, MAX_STEPS)
            if self.steps_per_epoch * self.epochs > MAX_STEPS:
                raise ConfigError(
                    "epochs",
                    f"times steps_per_epoch ({self.epochs} x {self.steps_per_epoch}) "
                    f"must be at most {MAX_STEPS} steps",
                )

    def _check_model_fits(self) -> None:
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
    def for_dataset(cls, dataset: str = DATASET, **settings: Any) -> TrainConfig:
        """A run's config: ``settings``, and the dataset's defaults for what they leave out."""
        _check_choice("dataset", dataset)
        return cls(dataset=dataset, **{**DATASET_DEFAULTS[dataset], **settings})

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """The config ``config.json`` holds; ConfigError for a missing, unknown or bad setting.

        ValueError if ``text`` is not JSON (NaN and nesting too deep for Python included).
        """
        values = loads(text)
        if not isinstance(values, Mapping):
            raise ConfigError("config", f"must be a JSON object, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"is not a setting of a run (known: {', '.join(sorted(known))})")
        missing = [k for k in known if k not in values and k not in LATER_SETTINGS]
        if missing:
            raise ConfigError(
                missing[0], f"is missing (every setting but {', '.join(LATER_SETTINGS)} must be)"
            )
        gaps = [k for k in known if values.get(k, 0) is None and k not in _MAY_BE_NONE]
        if gaps:
            raise ConfigError(gaps[0], "is null; a run's config.json records every setting")
        return cls(**{**LATER_SETTINGS, **values})

    def with_data(self, dataset: data.Dataset) -> TrainConfig:
        """This config with the data description of ``dataset`` (and the dataset's model, if unset)."""
        return dataclasses.replace(
            self,
            model=self.model or DATASET_DEFAULTS[self.dataset]["model"],
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            steps_per_epoch=data.steps_per_epoch(len(dataset.x_train), self.batch_size),
        )

    def to_json(self) -> str:
        """Strict JSON (no NaN), keys sorted: the bytes of ``config.json``."""
        values = dataclasses.asdict(self)
        if values["input_shape"] is not None:
            values["input_shape"] = list(values["input_shape"])
        return json.dumps(values, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(text: str) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` refused, and nesting too deep a ValueError, not a crash."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
