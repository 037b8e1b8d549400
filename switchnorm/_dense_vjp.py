"""(N, C) input, two-pass branch: a backward pass that holds no x-sized temporary.

Autodiff of :func:`switchnorm._dense.normalize_dense`'s two-pass branch (two
passes per scope, the blend in each element's frame) shares x-sized products
between its reductions, and XLA:CPU writes each shared one out: six arrays of
x's size in float32, fourteen times x's bytes in bfloat16, which a program
holds on every call, though the branch rarely runs (a three-layer MLP's
training step took 1.5x the memory of BatchNorm's; 1.3x with this). Here each
reduction computes its own product from x, dy and the (1, C) and (N, 1)
statistics, kept apart from the others (:func:`switchnorm._passes.apart`),
and one elementwise pass gives dx. The price, when the branch runs: about
1.5x autodiff's time for its float32 gradient (the same in bfloat16).

With each normalizer k's shift K_k, mean m_k (relative to K_k) and variance
v_k (bn over the batch, ln over the channels, or bn's running averages in
inference) and its weights wm_k, wv_k (per layer or per channel):

    D = x - mix = -sum_k wm_k ((K_k - x) + m_k)     (each element's frame, as the forward)
    r = 1 / sqrt(sum_k wv_k v_k + eps),   a = scale r,   y = D a + bias

so that, with dD = dy a and dV = -dy D a r^2 / 2,

    d wm_k = sum dD (x - K_k - m_k),   d m_k = -sum wm_k dD,
    d wv_k = sum dV v_k,               d v_k = sum wv_k dV,
    d scale = sum dy D r,              d bias = sum dy,
    dx = dD sum_k wm_k + sum_k (d m_k + 2 d v_k (x - K_k - m_k)) / n_k,

each sum over the axes its left side is broadcast along. K is a constant for
differentiation, and the last sum runs over the normalizers whose statistics
come from x (n_k elements each). The weights' and the running averages' own
derivatives are autodiff's, on their small arrays. Per-sample weights read x
itself (each element is its own cell), and keep autodiff.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm import _passes
from switchnorm._cell_graph import GraphConfig, GraphInputs, batch_stats_of, blend_weights_of, running_scope
from switchnorm._stats import BatchStats, ScopeStats

Array = jax.Array


class Term(NamedTuple):
    """One normalizer's statistics in the blend: shift K, mean relative to K, variance, and scope size.

    ``size`` is the number of elements of x each statistic reads, or None for
    bn's running averages, which do not depend on x.
    """

    shift: Array
    mean: Array
    var: Array
    size: int | None


def summed_to(value: Array, shape: tuple[int, ...]) -> Array:
    """``value`` summed over the axes along which ``shape`` broadcasts to it: the transpose of a broadcast."""
    lead = value.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and value.shape[lead + i] != 1
    )
    return jnp.sum(value, axes).reshape(shape)


def _constant_along(weight: Array, shape: tuple[int, ...]) -> bool:
    """Whether ``weight`` (per layer or per channel) is constant along every axis an array of ``shape`` is broadcast along."""
    padded = (1,) * (len(shape) - weight.ndim) + weight.shape
    return all(w == 1 for w, n in zip(padded, shape, strict=True) if n == 1)


def _small(config: GraphConfig, compute_dtype: Any, inputs: GraphInputs) -> tuple[Array, Any, Any]:
    """What the blend reads of the small inputs: the (2, K, ...) weights, bn's running averages, scale."""
    weights = blend_weights_of(config, compute_dtype, [], inputs)
    running = None
    if "bn" in config.normalizers and config.use_running_average:
        running = running_scope(inputs, jnp.zeros((1, 1), compute_dtype), compute_dtype)
    scale = None if inputs.scale is None else inputs.scale.astype(compute_dtype)
    return weights, running, scale


def _values(config: GraphConfig, x: Array, dy: Array, terms: list[Term], weights: Array, scale: Any) -> tuple:
    """What :func:`_elementwise` reads, with every constant folded into a small array.

    XLA:CPU's fused reductions take a scalar constant (epsilon, -1/2) as an
    x-sized broadcast, written out by a kernel of its own; a (1, C) or (N, 1)
    operand they broadcast themselves. So epsilon joins the first variance
    term, -1/2 the scale (``-scale / 2``, the factor of dV), and Python ints
    stay out of the barriers.
    """
    var_terms = [wv * t.var for wv, t in zip(weights[1], terms, strict=True)]
    var_terms[0] = var_terms[0] + config.epsilon
    channels = x.shape[-1]
    half_scale = jnp.full((channels,), -0.5, weights.dtype) if scale is None else -0.5 * scale
    return (x, dy, [t._replace(size=None) for t in terms], weights, var_terms, scale, half_scale)


class _Elementwise(NamedTuple):
    """What each reduction and the dx pass compute per element: x, dy, D, r, dD, dV and the small arrays."""

    x: Array
    dy: Array
    d: Array
    r: Array
    dd: Array
    dv: Array
    terms: list[Term]
    weights: Array


def _elementwise(compute_dtype: Any, values: tuple, site: int) -> _Elementwise:
    """:class:`_Elementwise` from ``values`` (:func:`_values`), taken :func:`switchnorm._passes.apart` at ``site``."""
    x, dy, terms, weights, var_terms, scale, half_scale = _passes.apart(values, site)
    x, dy = x.astype(compute_dtype), dy.astype(compute_dtype)
    d = -sum(wm * ((t.shift - x) + t.mean) for wm, t in zip(weights[0], terms, strict=True))
    r = lax.rsqrt(sum(var_terms))
    a = r if scale is None else r * scale
    return _Elementwise(x, dy, d, r, dy * a, dy * d * (r * r) * (r * half_scale), terms, weights)


def terms_of(config: GraphConfig, scopes: dict[str, Any], running: ScopeStats | None) -> list[Term]:
    """Each normalizer's :class:`Term`, in the configuration's order, from the branch's scopes.

    ``scopes`` maps bn and ln to (K, mean, var) of x and the elements each reads.
    """
    terms = []
    for name in config.normalizers:
        if name == "bn" and config.use_running_average:
            assert running is not None
            terms.append(Term(jnp.zeros((), running.mean.dtype), running.mean, running.var, None))
        else:
            terms.append(Term(*scopes[name]))
    return terms


def _deviation_part(e: _Elementwise, k: int) -> Array:
    """d wm_k's summand: dD (x - K_k - m_k)."""
    return e.dd * ((e.x - e.terms[k].shift) - e.terms[k].mean)


def _mean_part(e: _Elementwise, k: int) -> Array:
    """d m_k's summand: -wm_k dD."""
    return -e.weights[0][k] * e.dd


def _var_part(e: _Elementwise, k: int) -> Array:
    """d v_k's summand: wv_k dV."""
    return e.weights[1][k] * e.dv


def _var_weight_part(e: _Elementwise, k: int) -> Array:
    """d wv_k's summand: dV v_k."""
    return e.dv * e.terms[k].var


def backward(
    config: GraphConfig,
    compute_dtype: Any,
    x: Array,
    inputs: GraphInputs,
    bias: Array | None,
    scopes: dict[str, Any],
    dy: Array,
    batch_stats_bar: BatchStats | None,
) -> tuple[Array, GraphInputs, Array | None]:
    """``(dx, d inputs, d bias)`` of the two-pass branch, each reduction's operands apart from the others'."""
    (weights, running, scale), small_vjp = jax.vjp(lambda i: _small(config, compute_dtype, i), inputs)
    terms = terms_of(config, scopes, running)
    values, sites = _values(config, x, dy, terms, weights, scale), itertools.count(1)

    def reduced(fn: Callable[[_Elementwise], Array], shape: tuple[int, ...]) -> Array:
        """``fn`` of the elementwise parts, summed to ``shape``, at a site of its own."""
        return summed_to(fn(_elementwise(compute_dtype, values, next(sites))), shape)

    d_wm, d_wv, d_mean, d_var = [], [], [], []
    for k, t in enumerate(terms):
        wm, wv = weights[0][k], weights[1][k]
        d_wm.append(reduced(functools.partial(_deviation_part, k=k), wm.shape))
        # A weight constant along the statistic's scope factors out of its sum, and that one sum
        # gives the weight's own cotangent too: a reduction over x fewer.
        if _constant_along(wm, t.mean.shape):
            d_mean.append(-wm * reduced(lambda e: e.dd, t.mean.shape))
        else:
            d_mean.append(reduced(functools.partial(_mean_part, k=k), t.mean.shape))
        if _constant_along(wv, t.var.shape):
            u = reduced(lambda e: e.dv, t.var.shape)
            d_var.append(wv * u)
            d_wv.append(summed_to(u * t.var, wv.shape))
        else:
            d_var.append(reduced(functools.partial(_var_part, k=k), t.var.shape))
            d_wv.append(reduced(functools.partial(_var_weight_part, k=k), wv.shape))
    d_scale = None if scale is None else reduced(lambda e: e.dy * e.d * e.r, scale.shape)
    d_bias = None if bias is None else reduced(lambda e: e.dy, bias.shape).astype(bias.dtype)

    if batch_stats_bar is not None and "bn" in scopes:  # the running averages' batch statistics
        bn = config.normalizers.index("bn")
        _, stats_vjp = jax.vjp(
            lambda m, v: batch_stats_of(ScopeStats(m, v), terms[bn].shift, config),
            terms[bn].mean,
            terms[bn].var,
        )
        extra_mean, extra_var = stats_vjp(batch_stats_bar)
        d_mean[bn], d_var[bn] = d_mean[bn] + extra_mean, d_var[bn] + extra_var

    # dx's terms through each scope of x: its mean's and variance's (1, C) or (N, 1) factors.
    factors = [
        (dm / t.size, 2.0 * dv / t.size) if t.size else None
        for dm, dv, t in zip(d_mean, d_var, terms, strict=True)
    ]
    site = next(sites)
    e = _elementwise(compute_dtype, values, site)
    dx = e.dd * sum(e.weights[0])
    for factor, t in zip(_passes.apart(factors, site), e.terms, strict=True):
        if factor is not None:
            dx = dx + (factor[0] + factor[1] * ((e.x - t.shift) - t.mean))

    running_bar = None
    if running is not None:
        bn = config.normalizers.index("bn")
        running_bar = ScopeStats(d_mean[bn], d_var[bn])
    (d_inputs,) = small_vjp((jnp.stack([jnp.stack(d_wm), jnp.stack(d_wv)]), running_bar, d_scale))
    return dx.astype(x.dtype), d_inputs, d_bias
