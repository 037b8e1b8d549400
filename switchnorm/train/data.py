"""Datasets that need no download: scikit-learn digits, MNIST-1D, a synthetic set.

Every loader returns a :class:`Dataset` of NumPy arrays, channels last, float32
inputs standardized with the training split's statistics, int32 labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in memory.

    Attributes:
      name: the name ``load_dataset`` knows it by.
      x_train, y_train, x_test, y_test: inputs (N, *S, C) float32, labels (N,) int32.
      num_classes: the number of labels.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, without the batch axis."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test, "
            f"input {self.input_shape}, {self.num_classes} classes"
        )


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits as (N, 8, 8, 1): a stratified 80/20 split.

    The split is fixed (``random_state=0``) so that every run, whatever its
    training seed, is scored on the same 360 test images.
    """
    del seed  # the split never changes
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float64)[..., None]  # (1797, 8, 8, 1), values 0..16
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def mnist1d(seed: int = 0) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally: 4000 train / 1000 test, (N, 40, 1).

    Uses ``mnist1d.data.make_dataset`` with the package's default arguments
    (its own fixed seed), so the split is the standard one of the paper.
    """
    del seed  # the standard split has its own seed
    import contextlib
    import io

    from mnist1d.data import get_dataset_args, make_dataset

    with contextlib.redirect_stdout(io.StringIO()):  # the generator prints progress
        data = make_dataset(get_dataset_args())
    x_train, x_test = _standardize(data["x"][..., None], data["x_test"][..., None])
    return Dataset(
        "mnist1d",
        x_train,
        np.asarray(data["y"], np.int32),
        x_test,
        np.asarray(data["y_test"], np.int32),
        10,
    )


def synthetic(seed: int = 0, num_train: int = 512, num_test: int = 256, features: int = 8) -> Dataset:
    """A small, quick, learnable set of (N, features) vectors in 4 classes.

    The label is the quadrant of two random projections of a Gaussian vector,
    a problem a linear model solves only partly and a small MLP solves well.
    Each feature is standardized with the training split's statistics.
    """
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(features, 2))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(size=(n, features))
        p = z @ projection
        y = (p[:, 0] > 0).astype(np.int32) * 2 + (p[:, 1] > 0).astype(np.int32)
        return z, y

    x_train, y_train = sample(num_train)
    x_test, y_test = sample(num_test)
    mean, std = x_train.mean(0), x_train.std(0)
    x_train, x_test = ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, 4)


DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "synthetic": synthetic,
}
"""Loader by name; each takes a seed (used only where the split is random)."""


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """The dataset called ``name`` (one of ``DATASETS``).

    Example::

      >>> from switchnorm import train
      >>> data = train.load_dataset("synthetic")
      >>> data.input_shape, data.num_classes
      ((8,), 4)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name](seed)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the training set for one epoch: a function of (seed, epoch) only.

    Because it depends on nothing else, a run resumed at any epoch sees the
    same batches as a run that never stopped.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches of one epoch; the last partial batch is dropped.

    Dropping it keeps every step the same shape (one compilation); the shuffle
    means every example is still seen across epochs.
    """
    order = epoch_order(len(x), seed, epoch)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return num_examples // batch_size
