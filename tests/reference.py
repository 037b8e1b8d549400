"""Switchable Normalization in float64 NumPy, written straight from its definition (Luo et al., 2019).

Deliberately naive and independent of :mod:`switchnorm`: every normalizer's
statistics are taken with ``np.mean`` / ``np.var`` (biased) over that
normalizer's own axes of the raw input, then blended with softmax weights.
No cell statistics, no shifts, no parallel-variance merge: if the library's
tricks are wrong, this disagrees.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ALL = ("bn", "in", "ln", "gn")


def channel_input(rng: np.random.Generator, shape, offset: float = 0.0) -> np.ndarray:
    """Test input (float64) with a different mean and spread in every channel."""
    c = shape[-1]
    return rng.normal(size=shape) * rng.uniform(0.5, 2.0, c) + rng.normal(size=c) * 3 + offset


def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _masked_moments(x: np.ndarray, keep, axes):
    """Mean and biased variance over ``axes`` of the elements ``keep`` marks (all without one).

    A scope with no element kept has mean 0 and variance 0, as the layer defines it.
    """
    if keep is None:
        return x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    count = keep.sum(axis=axes, keepdims=True)
    safe = np.maximum(count, 1)
    mean = np.where(keep, x, 0.0).sum(axis=axes, keepdims=True) / safe
    var = np.where(keep, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / safe
    return mean, var


def scope_stats(x: np.ndarray, name: str, num_groups: int = 1, mask=None):
    """Mean and biased variance of one normalizer, broadcastable against x.

    x has shape (N, *S, C). Returned arrays have x's rank (keepdims) or, for gn,
    are already expanded back to x's shape. ``mask`` (booleans broadcastable to
    x) restricts both to the elements it marks.
    """
    rank = x.ndim
    keep = None if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    spatial = tuple(range(1, rank - 1))
    if name == "bn":  # batch and space, one value per channel
        axes = (0, *spatial)
    elif name == "in":  # space, one value per (sample, channel)
        axes = spatial
    elif name == "ln":  # space and channels, one value per sample
        axes = tuple(range(1, rank))
    elif name == "gn":  # space and a group of channels, one per (sample, group)
        c = x.shape[-1]
        grouped_shape = (*x.shape[:-1], num_groups, c // num_groups)
        grouped = x.reshape(grouped_shape)
        axes = (*spatial, rank)  # space and the channels within a group
        mean, var = _masked_moments(grouped, None if keep is None else keep.reshape(grouped_shape), axes)
        expand = lambda a: np.broadcast_to(a, grouped.shape).reshape(x.shape)  # noqa: E731
        return expand(mean), expand(var)
    else:
        raise ValueError(name)
    return _masked_moments(x, keep, axes)


def sample_weights(x, stats, logits, sample_map, epsilon: float, mask=None) -> np.ndarray:
    """(2, K, N) per-sample weights of ``weights="sample"``, from the definition.

    ``stats`` holds each normalizer's (mean, var) broadcast to x. A sample's
    descriptors against normalizer k, averaged over its channels c: the log of 1
    plus the squared distance of its channel mean from k's mean in k's standard
    deviations, and the log of its channel variance over k's (each plus epsilon).
    Its logits are the layer's plus the descriptors times ``sample_map``; softmax.
    A sample of one element per channel has no spread of its own: 0 there.
    With ``mask``, a channel's terms are 0 where the sample holds no kept
    element of it (the spread's where it holds at most one), and still
    averaged over all C channels.
    """
    spatial = tuple(range(1, x.ndim - 1))
    own_mean, own_var = (a.reshape(x.shape[0], x.shape[-1]) for a in scope_stats(x, "in", mask=mask))
    count = np.full(own_mean.shape, x[0, ..., 0].size)
    if mask is not None:
        count = np.broadcast_to(np.asarray(mask, bool), x.shape).sum(axis=spatial)
    columns = []
    for m, v in stats:
        m = np.broadcast_to(m, x.shape).mean(axis=spatial)  # constant over space: (N, C)
        v = np.broadcast_to(v, x.shape).mean(axis=spatial)
        offset = np.where(count > 0, (own_mean - m) ** 2 / (v + epsilon), 0.0)
        columns.append(np.log1p(np.mean(offset, axis=1)))
        spread = np.where(count > 1, np.log((own_var + epsilon) / (v + epsilon)), 0.0)
        columns.append(np.mean(spread, axis=1))
    descriptors = np.stack(columns, axis=1)  # (N, 2K)
    out = []
    for t in range(2):
        z = np.asarray(logits[t], np.float64)[None, :] + descriptors @ np.asarray(sample_map[t], np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out.append((e / e.sum(axis=1, keepdims=True)).T)  # (K, N)
    return np.stack(out)


def switch_norm(
    x,
    mean_logits,
    var_logits,
    *,
    scale=None,
    bias=None,
    normalizers=ALL,
    num_groups: int = 1,
    epsilon: float = 1e-5,
    running_mean=None,
    running_var=None,
    weights: str = "layer",
    sample_map=None,
    mask=None,
):
    """y = scale * (x - sum_k w_k mu_k) / sqrt(sum_k v_k var_k + eps) + bias.

    With ``running_mean``/``running_var`` given, the bn term uses them
    (inference); otherwise bn uses the batch. Returns (y, bn_mean, bn_var),
    the last two the per-channel batch statistics of the bn scope. The weights
    w_k, v_k are per layer (softmax of (K,) logits), per channel (softmax over
    the K rows of (K, C) logits) or per sample (:func:`sample_weights`). With
    ``mask`` every statistic reads only the elements it marks; all are normalized.
    """
    x = np.asarray(x, np.float64)
    mask = None if mask is None else np.asarray(mask, bool)
    stats = []
    for name in normalizers:
        if name == "bn" and running_mean is not None:
            stats.append((np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)))
        else:
            stats.append(scope_stats(x, name, num_groups, mask))
    logits = np.stack([np.asarray(mean_logits, np.float64), np.asarray(var_logits, np.float64)])
    if weights == "sample":
        per_sample = sample_weights(x, stats, logits, sample_map, epsilon, mask)  # (2, K, N)
        w_mean, w_var = per_sample.reshape(2, len(normalizers), -1, *(1,) * (x.ndim - 1))
    elif weights == "channel":  # (2, K, C): softmax down each channel's column
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        w_mean, w_var = e / e.sum(axis=1, keepdims=True)
    else:
        w_mean, w_var = softmax(logits[0]), softmax(logits[1])
    mu = np.zeros(x.shape)
    var = np.zeros(x.shape)
    for k, (m, v) in enumerate(stats):
        mu = mu + w_mean[k] * m
        var = var + w_var[k] * v
    y = (x - mu) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    bn_mean, bn_var = scope_stats(x, "bn", mask=mask)
    return y, bn_mean.reshape(-1), bn_var.reshape(-1)


# --------------------------------------------------------------------------
# Shared test material: shapes, data, parameters, and how close is close.
# --------------------------------------------------------------------------

C = 6
"""Channels of the small test inputs: 1, 2, 3 or 6 groups divide it."""

SHAPES = {2: (8, C), 3: (4, 5, C), 4: (3, 4, 3, C), 5: (2, 3, 2, 3, C)}
"""One small channels-last shape per rank."""

SINGLE_CASES = (
    [("bn", r) for r in (2, 3, 4, 5)]
    + [("ln", r) for r in (2, 3, 4, 5)]
    + [(n, r) for n in ("in", "gn") for r in (3, 4, 5)]
)
"""(normalizer, rank) pairs a single-normalizer layer is compared with Flax's layer on."""

NON_DEFAULT_EPSILONS = (0.1, 1.0)
"""Epsilons large enough that dropping epsilon, or moving it outside the square
root, changes y by far more than float32 round-off."""


TENSOR_ARGUMENTS = ("scale", "bias", "running_mean", "running_var", "sample_map", "mask")


def call(fn, args: dict, **options):
    """``fn(x, mean_logits, var_logits, ...)`` with every tensor taken from ``args``.

    ``fn`` is the core's ``switch_norm``, its autodiff twin or the float64 reference
    above (they share one signature); ``args`` holds x, both logits and any of
    ``TENSOR_ARGUMENTS``, so a gradient test differentiates the whole dict at once.
    """
    tensors = {k: args[k] for k in TENSOR_ARGUMENTS if k in args}
    return fn(args["x"], args["mean_logits"], args["var_logits"], **tensors, **options)


def data(rng: np.random.Generator, shape, offset: float = 0.0, dtype=np.float32):
    """:func:`channel_input` as a float32 (or ``dtype``) JAX array."""
    return jnp.asarray(channel_input(rng, shape, offset), dtype)


def near_epsilon_input(rng: np.random.Generator, shape, epsilon: float, dtype=np.float32):
    """Test input whose first channels have a spread comparable to ``epsilon``.

    Channel 0 has variance about epsilon / 4 and channel 1 about epsilon, so for
    every normalizer that sees those channels alone (bn, in, and gn with one
    channel per group) the variance and epsilon are of one size: any error in
    where epsilon enters the formula moves y by tens of percent there.
    """
    x = channel_input(rng, shape)
    x[..., 0] = 5.0 + np.sqrt(epsilon) / 2 * rng.normal(size=shape[:-1])
    x[..., 1] = -2.0 + np.sqrt(epsilon) * rng.normal(size=shape[:-1])
    return jnp.asarray(x, dtype)


def random_case(rng: np.random.Generator, shape, num_logits: int, dtype=np.float32) -> dict:
    """x with a different mean and spread per channel, random logits, scale, bias."""
    c = shape[-1]
    return dict(
        x=jnp.asarray(channel_input(rng, shape), dtype),
        mean_logits=jnp.asarray(rng.normal(size=num_logits), dtype),
        var_logits=jnp.asarray(rng.normal(size=num_logits), dtype),
        scale=jnp.asarray(rng.uniform(0.5, 1.5, c), dtype),
        bias=jnp.asarray(rng.normal(size=c), dtype),
    )


FLOAT32_ULPS = 64
"""Units of float32's last place a reference comparison allows, scaled by the
size of the values compared. The layer's float32 error is a few ulps per
reduction over a few dozen elements; 64 ulps (7.6e-6 relative) leaves room for
that and still fails an error the size of the default epsilon (1e-5) against a
unit variance."""


def float32_tolerance(want, ulps: int = FLOAT32_ULPS, dtype=np.float32) -> float:
    """``ulps`` units in the last place of ``dtype``, at the scale of ``want``."""
    scale = float(np.max(np.abs(np.asarray(want, np.float64)))) if np.size(want) else 1.0
    return ulps * float(jnp.finfo(dtype).eps) * max(scale, 1.0)


def assert_matches(got, want, ulps: int = FLOAT32_ULPS, dtype=np.float32, err_msg: str = "") -> None:
    """``got`` equals the float64 ``want`` up to float32 round-off at ``want``'s scale."""
    tol = float32_tolerance(want, ulps, dtype)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0, atol=tol, err_msg=err_msg
    )
