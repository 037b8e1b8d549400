"""What a forward pass tells :func:`switchnorm.mixing_weights`: the normalizers each layer blends,
and a ``weights="sample"`` layer's per-sample weights.

Both depend on the layer's input (its rank; each sample's statistics), so they exist
only during a forward pass. :func:`switchnorm.mixing_weights` runs one inside
:func:`capturing`, which opens a context-local list; the layer body hands each call to
:func:`record`, which, only while such a list is open, appends the normalizers the call
blends and, for a ``"sample"`` layer, the weights its input gets (computed by the core
from the same statistics the layer blends). Outside :func:`capturing` a call pays one
context-variable lookup, and no module state changes either way. Per-sample weights
need concrete values: a ``"sample"`` layer called under a JAX transform while
capturing raises a ValueError.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np


class CapturedWeights(NamedTuple):
    """One call of one ``weights="sample"`` layer: who it was, its normalizers, its weights.

    Attributes:
      layer: the NNX layer object, or a Linen module's path (``"block/norm"``).
      names: the normalizers the call blended, in the order of the last axis.
      weights: (2, N, K) float array: the mean's and the variance's weights of each sample
        (None for a layer that blends the same way for every sample).
    """

    layer: Any
    names: tuple[str, ...]
    weights: np.ndarray | None


_RECORDS: contextvars.ContextVar[list[CapturedWeights] | None] = contextvars.ContextVar(
    "switchnorm_sample_weights", default=None
)


@contextlib.contextmanager
def capturing() -> Iterator[list[CapturedWeights]]:
    """Collects the per-sample weights of every ``"sample"`` layer called inside, in call order."""
    records: list[CapturedWeights] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def record(layer: Any, x: Any, names: tuple[str, ...], weights: Callable[[], Any] | None = None) -> None:
    """Appends ``layer``'s call on ``x`` while capturing: the ``names`` it blends, and ``weights()``, (2, N, K)."""
    records = _RECORDS.get()
    if records is None or getattr(x, "size", 0) == 0:
        return
    if weights is None:
        records.append(CapturedWeights(layer, names, None))
        return
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            "mixing_weights reads per-sample weights from an eager forward pass, but a "
            "weights='sample' layer was called under a JAX transform (jit, vmap, scan); pass "
            "forward=... that calls the model without transforms."
        )
    records.append(CapturedWeights(layer, names, np.asarray(weights(), np.float64)))
