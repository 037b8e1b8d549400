"""Logits that start a SwitchNorm on one normalizer: what converting a BatchNorm or GroupNorm sets.

A layer converted from Flax's ``BatchNorm`` (source "bn") or ``GroupNorm`` (source "gn") starts
with the source's weight ``w`` for its mean and its variance, the other normalizers sharing
``1 - w`` equally, so :func:`switchnorm.mixing_weights` reads ``w`` back:

* softmax: ``logits = log(weights)``, whose softmax is ``weights``;
* sparsestmax: ``logits = weights``, which the projection at radius 0 (sparsemax) returns as
  they are (a point of the simplex is its own projection), as a freshly built layer's radius is.

``w = 1`` does not give the others weight 0 (logits of -inf): those would get no gradient, so
the layer could never move off its source, and weight decay would turn them into NaN
(``-inf * 0``). The others share :data:`RESIDUAL` instead, 2**-24: float32's spacing just below
1, so the source's weight reads 1 - 2**-24 and the output differs from the source layer's by
about 2**-24 times the gap between the normalizers' statistics in units of the standard deviation,
below float32's resolution for activations of ordinary scale. The other logits get gradients
(about 2**-24 times the usual: plain SGD barely moves them, Adam's per-parameter scaling moves
them at its full step size); the source's own, minus the sum of theirs, rounds to 0 in float32,
which loses nothing (softmax depends only on the logits' differences). A softmax layer's
logits start ``log((K - 1) / 2**-24)`` (about 17.7 for K = 4) apart, so learning moves it off
the source slowly; give ``w < 1`` (e.g. 0.9) to let the layers move from the first steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

SOURCES = ("bn", "gn")
"""The normalizers a converted layer can start from: Flax's BatchNorm and GroupNorm."""

RESIDUAL = 2.0**-24
"""The weight the other normalizers share at ``source_weight=1``: float32's spacing below 1."""


def check_source_weight(source_weight: Any) -> float:
    """``source_weight`` as a float in (0, 1], or a TypeError/ValueError saying what it must be."""
    if isinstance(source_weight, bool) or not isinstance(source_weight, numbers.Real):
        raise TypeError(f"source_weight must be a number in (0, 1], got {source_weight!r}.")
    value = float(source_weight)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"source_weight must be in (0, 1], got {source_weight!r}: the weight the converted layer "
            "gives its source normalizer (1.0: the source's outputs; below 1 the others share the rest)."
        )
    return value


def source_weights(normalizers: Sequence[str], source: str, source_weight: float) -> np.ndarray:
    """(K,) float64 weights: ``source_weight`` on ``source``, the rest shared by the others.

    At ``source_weight=1`` the others share :data:`RESIDUAL` (module docstring); a layer
    with the source alone gets weight 1.
    """
    normalizers = tuple(normalizers)
    if source not in normalizers:
        raise ValueError(
            f"the layer's normalizers {normalizers} do not include {source!r}, the normalizer it "
            f"replaces; include {source!r} among them."
        )
    others = len(normalizers) - 1
    if others == 0:
        return np.ones(1)
    rest = RESIDUAL if source_weight == 1.0 else 1.0 - source_weight
    weights = np.full(len(normalizers), rest / others)
    weights[normalizers.index(source)] = 1.0 - rest
    return weights


def source_logits(normalizers: Sequence[str], source: str, source_weight: float, mixing: str) -> np.ndarray:
    """(K,) float64 logits whose ``mixing`` weights (at radius 0) are :func:`source_weights`."""
    weights = source_weights(normalizers, source, source_weight)
    return weights if mixing == "sparsestmax" else np.log(weights)
