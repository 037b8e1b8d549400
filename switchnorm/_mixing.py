"""How a layer's logits become the blend's weights: one blend per layer, per channel or per sample.

``weights="layer"`` is Switchable Normalization's: one (K,) logit vector each for
the mean and the variance. ``"channel"`` gives every channel its own logits,
(K, C), as Batch-Instance Normalization gates bn against in per channel.
``"sample"`` computes each sample's logits from what the cell statistics
already say about it, as Exemplar Normalization does (docs/design.md, "Finer
weights: per channel and per sample")::

    z_n = logits + D_n @ sample_map          D_n: the 2K descriptors of sample n

For every normalizer k the two descriptors of sample n, averaged over the channels, are

    offset_k = log(1 + mean_c (mean_nc - mu_k,nc)^2 / (var_k,nc + eps))
    spread_k = mean_c log((var_nc + eps) / (var_k,nc + eps))

with ``mean_nc``, ``var_nc`` the sample's own cell statistics and ``mu_k``,
``var_k`` normalizer k's: both are 0 where k's statistics are the sample's own
and grow as the sample departs from them. A cell of one element has no spread
of its own: its ``spread_k`` is 0. ``sample_map`` has shape (2, 2K, K) (mean,
variance) and starts at zero, so training starts from the per-layer logits.
With sparsestmax, each channel's or each sample's logits are projected at the
layer's one radius.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from switchnorm._sparsestmax import sparsestmax

Array = jax.Array


def mixing_weights_from_logits(logits: Array, mixing: str = "softmax", radius: Any = 0.0) -> Array:
    """The weight of each normalizer from logits on the last axis, in float32 or wider.

    ``"softmax"`` as Switchable Normalization; ``"sparsestmax"`` the projection
    :func:`switchnorm.sparsestmax` at ``radius`` (Sparse Switchable Normalization).
    """
    logits = jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))
    if mixing == "sparsestmax":
        return sparsestmax(logits, jnp.asarray(radius, logits.dtype))
    return jax.nn.softmax(logits)


def logits_shape(weights: str, num_normalizers: int, num_channels: int) -> tuple[int, ...]:
    """The shape of each of the mean and variance logits: (K, C) per channel, else (K,)."""
    return (num_normalizers, num_channels) if weights == "channel" else (num_normalizers,)


def sample_map_shape(num_normalizers: int) -> tuple[int, int, int]:
    """(2, 2K, K): descriptors to the mean's and the variance's logits, ``weights="sample"`` only."""
    return (2, 2 * num_normalizers, num_normalizers)


def select_normalizers(sample_map: Array, index: Sequence[int]) -> Array:
    """The sample map of a layer restricted to the normalizers at ``index`` (their rows and columns)."""
    rows = [2 * i + j for i in index for j in (0, 1)]  # each normalizer's offset and spread
    return sample_map[:, jnp.array(rows)][:, :, jnp.array(list(index))]


def sample_descriptors(cells: Any, stats: Sequence[tuple[Array, Array]], epsilon: float) -> Array:
    """(N, 2K): each sample's offset and spread against every normalizer (module docstring).

    ``cells`` (:class:`switchnorm._stats.Cells`) holds each cell's mean relative to its
    shift; ``stats`` each normalizer's ``(mean, var)``, the mean relative to the same
    shifts, every array broadcasting to (N, C). Under a mask (``cells.size`` an array) a
    cell's spread term is 0 where it holds at most one element, its offset term 0 where it
    holds none.
    """
    count = cells.size
    shift_shape = () if cells.shift is None else jnp.shape(cells.shift)
    shape = jnp.broadcast_shapes(jnp.shape(cells.mean), shift_shape, *(jnp.shape(m) for m, _ in stats))
    columns = []
    for mean, var in stats:
        denominator = var + epsilon
        offset = jnp.broadcast_to((cells.mean - mean) ** 2 / denominator, shape)
        spread = jnp.broadcast_to(jnp.log((cells.var + epsilon) / denominator), shape)
        if isinstance(count, int):
            spread = spread if count > 1 else jnp.zeros_like(spread)
        else:
            offset, spread = jnp.where(count > 0, offset, 0.0), jnp.where(count > 1, spread, 0.0)
        columns += [jnp.log1p(jnp.mean(offset, axis=1)), jnp.mean(spread, axis=1)]
    return jnp.stack(columns, axis=1)


def blend_weights(
    weights: str,
    mixing: str,
    logits: Array,
    radius: Any,
    sample_map: Array | None = None,
    descriptors: Array | None = None,
) -> Array:
    """(2, K, ...): the mean's and the variance's weights, broadcasting against (N, C) statistics.

    ``logits`` stacks the mean's and the variance's: (2, K), or (2, K, C) with
    ``weights="channel"``. ``"sample"`` also takes ``sample_map`` and the (N, 2K)
    ``descriptors``, and gives (2, K, N, 1).
    """
    if weights == "channel":  # each channel's column projected: the normalizers on the last axis
        return jnp.swapaxes(mixing_weights_from_logits(jnp.swapaxes(logits, 1, 2), mixing, radius), 1, 2)
    if weights == "sample":
        assert sample_map is not None and descriptors is not None
        logits = logits.astype(descriptors.dtype)[:, None, :]
        per_sample = logits + jnp.einsum("nd,tdk->tnk", descriptors, sample_map.astype(descriptors.dtype))
        return jnp.swapaxes(mixing_weights_from_logits(per_sample, mixing, radius), 1, 2)[..., None]
    return mixing_weights_from_logits(logits, mixing, radius)
