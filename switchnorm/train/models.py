"""Example models whose every normalization layer is chosen by one argument, ``norm``.

``norm="sn"`` puts a :class:`switchnorm.SwitchNorm` blending all four
normalizers (bn and ln only on (N, C) features) after every convolution or
dense layer; ``"ssn"`` the same layer with ``mixing="sparsestmax"`` (Sparse
Switchable Normalization: the training loop raises its radius so that every
layer ends on one normalizer); ``"bn"``, ``"in"``, ``"ln"`` or ``"gn"`` puts the same layer
restricted to that single normalizer (which computes exactly Flax's own
BatchNorm, InstanceNorm, LayerNorm or GroupNorm); ``"none"`` puts no layer and
gives the preceding convolution a bias instead. Everything else is identical,
so comparisons are one flag apart. ``weights`` ("layer", "channel" or "sample",
:class:`switchnorm.SwitchNorm`'s argument) chooses how finely the sn and ssn
layers blend: one blend per layer (the default, the paper's), per channel, or
per sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import switchnorm
from switchnorm import _arguments

NORMS = ("sn", "ssn", "bn", "in", "ln", "gn", "none")
"""The choices of ``norm``."""

LEARNED_NORMS = ("sn", "ssn")
"""The norms whose layers learn mixing weights: the only ones ``weights`` other than "layer" fits."""


def check_norm(norm: str, spatial: bool) -> None:
    """Raises ValueError unless ``norm`` is a choice that fits the model's input."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}.")
    if not spatial and norm in ("in", "gn"):
        raise ValueError(
            f"norm {norm!r} needs spatial positions, but this model sees (N, C) features; "
            "choose sn, ssn, bn, ln or none."
        )


def check_weights(norm: str, weights: str) -> None:
    """Raises ValueError unless ``weights`` is a choice that ``norm``'s layers can take."""
    if weights not in _arguments.WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(_arguments.WEIGHTS)}.")
    if weights != "layer" and norm not in LEARNED_NORMS:
        raise ValueError(
            f"weights {weights!r} needs learned mixing weights, which only norm sn and ssn have, "
            f"but norm is {norm!r}; choose norm sn or ssn, or weights 'layer'."
        )


def make_norm(
    norm: str, features: int, *, spatial: bool, dtype: Any = None, weights: str = "layer", rngs: nnx.Rngs
) -> nnx.Module | None:
    """The normalization layer for ``norm``, or None for ``"none"``; ``weights`` as SwitchNorm's."""
    check_norm(norm, spatial)
    check_weights(norm, weights)
    if norm == "none":
        return None
    learned = norm in LEARNED_NORMS
    normalizers = (None if spatial else ("bn", "ln")) if learned else (norm,)
    mixing = "sparsestmax" if norm == "ssn" else "softmax"
    # Every norm takes the blend's epsilon and group count, not the single Flax layer's
    # defaults (1e-6, 32 groups), so that runs differ in their normalizer and nothing else.
    return switchnorm.SwitchNorm(
        features,
        normalizers=normalizers,
        epsilon=_arguments.BLEND_EPSILON,
        num_groups=switchnorm.default_num_groups(features) if norm == "gn" else None,
        dtype=dtype,
        mixing=mixing,
        weights=weights,
        rngs=rngs,
    )


def _apply(norm: nnx.Module | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


class ResidualBlock(nnx.Module):
    """conv-norm-relu-conv-norm plus a shortcut (a strided 1x1 conv when the shape changes).

    ``norm_layer(features)`` makes each normalization layer; ``conv(i, o, kernel, stride)`` each
    convolution.
    """

    def __init__(self, in_features: int, out_features: int, *, kernel: int, stride: int, conv, norm_layer):
        self.conv1 = conv(in_features, out_features, kernel, stride)
        self.norm1 = norm_layer(out_features)
        self.conv2 = conv(out_features, out_features, kernel, 1)
        self.norm2 = norm_layer(out_features)
        changes = stride != 1 or in_features != out_features
        self.shortcut = conv(in_features, out_features, 1, stride) if changes else nnx.data(None)
        self.shortcut_norm = norm_layer(out_features) if changes else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(_apply(self.norm1, self.conv1(x)))
        y = _apply(self.norm2, self.conv2(y))
        if self.shortcut is not None:
            x = _apply(self.shortcut_norm, self.shortcut(x))
        return jax.nn.relu(x + y)


class Stem(nnx.Module):
    """conv -> norm -> relu, the first layer of :class:`ResNet`."""

    def __init__(self, in_features: int, out_features: int, *, kernel: int, conv, norm_layer):
        self.conv = conv(in_features, out_features, kernel, 1)
        self.norm = norm_layer(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(_apply(self.norm, self.conv(x)))


class ResNet(nnx.Module):
    """A small residual CNN over 1-D sequences (N, L, C) or 2-D images (N, H, W, C).

    stem conv -> norm -> relu, then one residual block per entry of ``widths``
    (stride 2 wherever the width grows), global average pooling, a linear head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        widths: tuple[int, ...],
        kernel: int,
        norm: str = "sn",
        dtype: Any = None,
        weights: str = "layer",
        rngs: nnx.Rngs,
    ):
        ndim = len(input_shape) - 1
        check_norm(norm, spatial=True)
        check_weights(norm, weights)
        self.dtype = dtype
        norm_layer = functools.partial(make_norm, norm, spatial=True, dtype=dtype, weights=weights, rngs=rngs)

        def conv(i: int, o: int, k: int, s: int) -> nnx.Conv:
            return nnx.Conv(
                i, o, (k,) * ndim, strides=(s,) * ndim, use_bias=norm == "none", dtype=dtype, rngs=rngs
            )

        # One list, stem first, so that layer paths ("layers/0/norm", "layers/1/norm1", ...) sort
        # in the order the data flows.
        blocks: list[nnx.Module] = [
            Stem(input_shape[-1], widths[0], kernel=kernel, conv=conv, norm_layer=norm_layer)
        ]
        for previous, width in zip((widths[0], *widths), widths, strict=False):
            stride = 2 if width > previous else 1
            blocks.append(
                ResidualBlock(previous, width, kernel=kernel, stride=stride, conv=conv, norm_layer=norm_layer)
            )
        self.layers = nnx.List(blocks)
        self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for block in self.layers:
            x = block(x)
        x = x.mean(axis=tuple(range(1, x.ndim - 1)))
        return self.head(x).astype(jnp.float32)


class MLP(nnx.Module):
    """(N, C) features -> [dense -> norm -> relu] x len(widths) -> dense."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        widths: tuple[int, ...] = (64, 64),
        norm: str = "sn",
        dtype: Any = None,
        weights: str = "layer",
        rngs: nnx.Rngs,
    ):
        check_norm(norm, spatial=False)
        check_weights(norm, weights)
        self.dtype = dtype
        sizes = (math.prod(input_shape), *widths)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=norm == "none", dtype=dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.norms = nnx.List(
            [make_norm(norm, b, spatial=False, dtype=dtype, weights=weights, rngs=rngs) for b in widths]
        )
        self.head = nnx.Linear(sizes[-1], num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = jax.nn.relu(_apply(norm, layer(x)))
        return self.head(x).astype(jnp.float32)


resnet2d = functools.partial(ResNet, widths=(32, 64), kernel=3)
"""The image model: a residual CNN with widths (32, 64), 3x3 kernels."""
resnet1d = functools.partial(ResNet, widths=(32, 64, 128), kernel=5)
"""The sequence model: a residual 1-D CNN with widths (32, 64, 128), kernel 5."""
mlp = functools.partial(MLP, widths=(64, 64))
"""The feature model: an MLP with two hidden layers of 64."""

MODELS: dict[str, Callable[..., nnx.Module]] = {"resnet2d": resnet2d, "resnet1d": resnet1d, "mlp": mlp}
"""Model constructor by name: ``MODELS[name](input_shape, num_classes, norm=..., weights=..., rngs=...)``."""

INPUT_RANK = {"resnet2d": 3, "resnet1d": 2, "mlp": None}
"""The rank of one example each model expects (None: any, it flattens)."""


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    norm: str,
    dtype: Any = None,
    weights: str = "layer",
    seed: int = 0,
) -> nnx.Module:
    """``MODELS[name]`` for this input shape, parameters initialized from ``seed``;
    ``weights`` (sn and ssn only) how finely its layers blend, as :class:`switchnorm.SwitchNorm`'s.

    Example::

      >>> import jax.numpy as jnp
      >>> from switchnorm import train
      >>> model = train.build_model("mlp", (8,), 3, norm="sn")
      >>> model(jnp.ones((2, 8))).shape
      (2, 3)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    rank = INPUT_RANK[name]
    if rank is not None and len(input_shape) != rank:
        raise ValueError(
            f"model {name!r} expects examples of rank {rank}, but the dataset's are {input_shape}."
        )
    return MODELS[name](
        input_shape, num_classes, norm=norm, dtype=dtype, weights=weights, rngs=nnx.Rngs(seed)
    )


def collapsed_model(model: nnx.Module, choices: dict[str, dict[str, Any]]) -> nnx.Module:
    """``model`` with the layers a collapsed run names replaced as ``switchnorm.collapse`` did.

    ``choices`` is a run config's ``collapsed``: layer path -> ``{"mean", "var", "affine"}``.
    The collapsed layers take ``model``'s arrays; a run's checkpoint then supplies its own.
    """
    from switchnorm._collapse import LayerChoice, apply_choices

    return apply_choices(model, {path: LayerChoice(**choice) for path, choice in choices.items()})
