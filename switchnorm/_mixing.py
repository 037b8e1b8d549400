"""How a layer's logits become the blend's weights: one blend per layer, per channel or per sample.

``weights="layer"`` is Switchable Normalization's: one (K,) logit vector each
for the mean and the variance. ``"channel"`` gives every channel its own
logits, (K, C), as Batch-Instance Normalization gates bn against in per
channel. ``"sample"`` computes each sample's logits from what the cell
statistics already say about it, as Exemplar Normalization does
(docs/design.md, "Finer weights: per channel and per sample"):

    z_n = logits + D_n @ sample_map          D_n: 2K descriptors of sample n

For every normalizer k the two descriptors of sample n are, averaged over
the channels,

    offset_k = log(1 + mean_c (mean_nc - mu_k,nc)^2 / (var_k,nc + eps))
    spread_k = mean_c log((var_nc + eps) / (var_k,nc + eps))

with ``mean_nc``, ``var_nc`` the sample's own (cell) statistics and
``mu_k``, ``var_k`` normalizer k's: both are 0 where k's statistics are the
sample's own (in always; bn for a sample like the batch's others), and grow
as the sample departs from them. A cell of one element ((N, C) input, or a
spatial size of 1) has no spread of its own: there ``spread_k`` is 0 (it
would be ``log(eps)``, a constant that only conditions the map badly). ``sample_map`` has shape (2, 2K, K) (mean,
variance) and starts at zero, so training starts from the per-layer logits.

Important details:

* Every mode returns weights of shape (K, ...) whose trailing axes broadcast
  against the (N, C) statistics: (K,), (K, C) or (K, N, 1).
* The descriptors are differentiated like the rest of the cell graph: the
  gradient reaches x through them too.
* With sparsestmax, each channel's or each sample's logits are projected at
  the layer's one radius.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from switchnorm._sparsestmax import sparsestmax
from switchnorm._stats import CellStats, ScopeStats, unstack

Array = jax.Array


SMALL_SOFTMAX_MAX_K = 8
"""Up to this many normalizers the softmax is taken by :func:`_small_softmax`, with no reduction."""


def _unrolled(op: Any, v: Array) -> Array:
    """``op`` folded over the last axis's slices: K - 1 elementwise operations, no reduction kernel."""
    return functools.reduce(op, unstack(v, -1))


def _across(v: Array, k: int) -> Array:
    """``v`` repeated along a new last axis of length k, stacked rather than broadcast.

    The transpose of a broadcast is a reduction; of a stack, K slices: reverse
    mode then needs no reduction kernel either.
    """
    return jnp.stack([v] * k, axis=-1)


@jax.custom_jvp
def _small_softmax(logits: Array) -> Array:
    """``jax.nn.softmax`` over a short last axis, as ``w_k = 1 / sum_j exp(l_j - l_k)`` unrolled over j.

    A reduction is a kernel of its own on XLA:CPU (a few microseconds to run,
    tens of milliseconds to compile), and ``jax.nn.softmax`` takes two, the
    maximum and the sum; written per weight, with the K-term sum unrolled, the
    whole softmax is one elementwise fusion. The ``j = k`` term is 1, so no
    sum is below 1. A logit of -inf gets a weight of exactly 0, as there:
    equal logits (two -inf among them) have a gap of 0, not NaN, and an
    infinite gap sends the weight to 1 / inf = 0. A finite gap above about
    88 does too, where ``jax.nn.softmax`` gives a weight below 1e-38.
    """
    other, own = logits[..., None, :], logits[..., :, None]  # [..., k, j]: l_j and l_k
    gaps = jnp.where(other == own, 0.0, other - own)
    return 1.0 / _unrolled(jnp.add, jnp.exp(gaps))


@_small_softmax.defjvp
def _small_softmax_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    """``dw = w * (dl - sum_k w_k dl_k)``, the softmax's own, its sum unrolled as the forward's."""
    w = _small_softmax(primals[0])
    dl = tangents[0]
    return w, w * (dl - _across(_unrolled(jnp.add, w * dl), dl.shape[-1]))


def mixing_weights_from_logits(logits: Array, mixing: str = "softmax", radius: Any = 0.0) -> Array:
    """The weight of each normalizer from a layer's logits (last axis).

    ``mixing="softmax"``: softmax, as Switchable Normalization. ``"sparsestmax"``: the
    projection :func:`switchnorm.sparsestmax` at ``radius`` (Sparse Switchable Normalization,
    docs/design.md section 10): sparsemax at radius 0, one-hot from ``sqrt(1 - 1/K)`` on.
    """
    logits = jnp.asarray(logits, jnp.promote_types(logits.dtype, jnp.float32))
    if mixing == "sparsestmax":
        return sparsestmax(logits, jnp.asarray(radius, logits.dtype))
    if logits.shape[-1] <= SMALL_SOFTMAX_MAX_K:
        return _small_softmax(logits)
    return jax.nn.softmax(logits)


def num_descriptors(num_normalizers: int) -> int:
    """How many descriptors of each sample ``weights="sample"`` maps to logits: two per normalizer."""
    return 2 * num_normalizers


def logits_shape(weights: str, num_normalizers: int, num_channels: int) -> tuple[int, ...]:
    """The shape of each of the mean and variance logits: (K, C) per channel, else (K,)."""
    return (num_normalizers, num_channels) if weights == "channel" else (num_normalizers,)


def sample_map_shape(num_normalizers: int) -> tuple[int, int, int]:
    """(2, 2K, K): descriptors to the mean's and the variance's logits, ``weights="sample"`` only."""
    return (2, num_descriptors(num_normalizers), num_normalizers)


def select_normalizers(sample_map: Array, index: Sequence[int]) -> Array:
    """The sample map of a layer restricted to the normalizers at ``index`` (their rows and columns)."""
    rows = [2 * i + j for i in index for j in (0, 1)]  # each normalizer's offset and spread
    return sample_map[:, jnp.array(rows)][:, :, jnp.array(list(index))]


def sample_descriptors(
    cells: CellStats, stats: Sequence[ScopeStats], epsilon: float, cell_size: Array | int
) -> Array:
    """(N, 2K): each sample's offset and spread against every normalizer (module docstring).

    ``cells`` and ``stats`` are as the cell graph holds them: means relative to
    each cell's shift, every array broadcasting to (N, C); ``cell_size`` is the
    number of elements of a cell (spreads are 0 for one), or under a call-time
    mask the (N, C) counts of masked-in elements: a cell's spread term is then
    0 where it holds at most one, and its offset term 0 where it holds none.
    """
    shape = jnp.broadcast_shapes(cells.mean.shape, *(jnp.shape(s.mean) for s in stats))
    uniform = isinstance(cell_size, int)  # every cell holds cell_size elements
    columns = []
    for s in stats:
        denominator = s.var + epsilon
        offset = jnp.broadcast_to((cells.mean - s.mean) ** 2 / denominator, shape)
        spread = jnp.broadcast_to(jnp.log((cells.var + epsilon) / denominator), shape)
        if not uniform:
            offset, spread = jnp.where(cell_size > 0, offset, 0.0), jnp.where(cell_size > 1, spread, 0.0)
        offset, spread = jnp.mean(offset, axis=1), jnp.mean(spread, axis=1)
        columns += [jnp.log1p(offset), spread if not uniform or cell_size > 1 else jnp.zeros_like(spread)]
    return jnp.stack(columns, axis=1)


def sample_logits(logits: Array, descriptors: Array, sample_map: Array) -> Array:
    """(2, N, K): the per-layer logits ``(2, K)`` plus each sample's descriptors times the map."""
    return logits[:, None, :] + jnp.einsum("nd,tdk->tnk", descriptors, sample_map.astype(descriptors.dtype))


def blend_weights(
    weights: str,
    mixing: str,
    logits: Array,
    radius: Any,
    sample_map: Array | None = None,
    descriptors: Array | None = None,
) -> Array:
    """(2, K, ...): the mean and variance weights, each broadcasting against (N, C) statistics.

    ``logits`` is the (2, K) or, with ``weights="channel"``, (2, K, C) stack of
    the mean and variance logits; ``"sample"`` also needs ``sample_map`` and the
    (N, 2K) ``descriptors``.
    """
    if weights == "channel":  # project each channel's column: the normalizers on the last axis
        return jnp.swapaxes(mixing_weights_from_logits(jnp.swapaxes(logits, 1, 2), mixing, radius), 1, 2)
    if weights == "sample":
        assert sample_map is not None and descriptors is not None
        per_sample = mixing_weights_from_logits(
            sample_logits(logits.astype(descriptors.dtype), descriptors, sample_map), mixing, radius
        )
        return jnp.swapaxes(per_sample, 1, 2)[..., None]  # (2, K, N, 1)
    return mixing_weights_from_logits(logits, mixing, radius)
