"""(N, C) input: each normalizer's statistics straight from sums of x, no cell graph.

With one element per (n, c) cell the cell graph of :mod:`switchnorm._cell_graph`
works on x-sized arrays and only repeats what a scope's sums say directly: bn
reduces x over the batch, ln over the channels (in and gn need a spatial
extent). Here each is two reductions of x (``sum x``, ``sum x^2``, read by
XLA:CPU straight from x), the blend is broadcast from (1, C) and (N, 1)
statistics, and the normalize pass is one elementwise pass; JAX autodiff
differentiates it, as Flax's BatchNorm.

Important details:

* Raw sums are kept only where every scope's mean square is at most
  :data:`switchnorm._passes.RAW_SUMS_BOUND` times its variance (the bound
  the statistics pass uses for cells, docs/design.md, "One pass: shifted
  sums per cell"); otherwise a ``lax.cond`` takes the general path, whose
  shifted sums and parallel-variance merges keep float32's digits at any
  mean.
* Under ``axis_name`` the bn statistics cross devices; the core then uses
  the general path, whose merge already does that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm._cell_graph import (
    GraphConfig,
    GraphInputs,
    batch_stats_of,
    mixed_mean_and_factor,
    running_scope,
)
from switchnorm._passes import normalize_pass, raw_sums_suffice, raw_sums_within_bound
from switchnorm._stats import BatchStats, CellStats, ScopeStats, cell_stats

Array = jax.Array

Normalize = Callable[[Array, GraphInputs, Array | None, Array | None], tuple[Array, BatchStats | None]]
"""The general path on the same input: ``normalize(x, inputs, bias, mask) -> (y, batch_stats)``."""


def _scope_sums(x: Array, name: str) -> tuple[Array, Array]:
    """``(sum x, sum x^2)`` over bn's scope (the batch, (1, C)) or ln's (the channels, (N, 1))."""
    axis = 0 if name == "bn" else 1
    return jnp.sum(x, axis, keepdims=True), jnp.sum(x * x, axis, keepdims=True)


def _scope(s1: Array, s2: Array, shape: tuple[int, int]) -> ScopeStats:
    """Mean (absolute) and biased variance of one scope, (1, C) or (N, 1)."""
    stats = cell_stats(
        jnp.zeros((), s1.dtype), jnp.ones((), s1.dtype), s1, s2, shape[0] * shape[1] // s1.size
    )
    return ScopeStats(mean=stats.mean, var=stats.var)


def normalize_dense(
    config: GraphConfig,
    compute_dtype: Any,
    out_dtype: Any,
    x: Array,
    inputs: GraphInputs,
    bias: Array | None,
    general: Normalize,
    use_custom_vjp: bool = True,
) -> tuple[Array, BatchStats | None]:
    """``switch_norm`` of (N, C) input: scope sums, blend, one elementwise pass (or ``general``)."""
    values = x.astype(compute_dtype)
    names = [k for k in config.normalizers if not (k == "bn" and config.use_running_average)]
    sums = {k: _scope_sums(values, k) for k in names}
    suffice = jnp.asarray(True)
    if names:  # one check for all scopes: each small reduction is a kernel of its own
        within = [raw_sums_within_bound(*sums[k], values.size // sums[k][0].size).ravel() for k in names]
        suffice = raw_sums_suffice(
            jnp.concatenate(within), jnp.concatenate([sums[k][1].ravel() for k in names])
        )

    def direct(operands):
        x, inputs, bias, sums = operands
        zero = jnp.zeros((1, x.shape[1]), compute_dtype)
        stats, batch_stats = [], None
        for name in config.normalizers:
            if name == "bn" and config.use_running_average:
                stats.append(running_scope(inputs, zero, compute_dtype))
            else:
                s1, s2 = sums[name]
                stats.append(_scope(s1, s2, x.shape))
                if name == "bn":
                    batch_stats = batch_stats_of(stats[-1], zero, config)
        # One element per cell: each sample's own statistics are x itself, with no spread.
        values = x.astype(compute_dtype)
        cells = CellStats(zero, values, jnp.zeros_like(values)) if config.weights == "sample" else None
        mix_mean, a = mixed_mean_and_factor(config, compute_dtype, stats, inputs, cells, cell_size=1)
        shape = x.shape
        y = normalize_pass(
            x,
            zero,
            jnp.broadcast_to(mix_mean, shape),
            jnp.broadcast_to(a, shape),
            bias,
            compute_dtype,
            out_dtype,
        )
        return y, batch_stats

    def fallback(operands):
        x, inputs, bias, _ = operands
        return general(x, inputs, bias, None)

    # The sums travel as operands (a custom VJP's functions may close over no tracer).
    operands = (x, inputs, bias, sums)
    if use_custom_vjp:
        return _chosen(direct, fallback, suffice, operands)
    return lax.cond(suffice, direct, fallback, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chosen(direct: Callable, fallback: Callable, choice: Array, operands: Any) -> Any:
    """``lax.cond(choice, direct, fallback, operands)``, differentiated through the branch taken only.

    Autodiff of a ``lax.cond`` keeps the residuals of both branches, zeros for
    the branch not taken: here x-sized arrays written on every step (the
    fwd+bwd of 1024x512 took 17x BatchNorm's). This VJP saves only the
    operands and, in its backward pass, differentiates the branch taken.
    """
    return lax.cond(choice, direct, fallback, operands)


def _chosen_forward(direct, fallback, choice, operands):
    return lax.cond(choice, direct, fallback, operands), (choice, operands)


def _chosen_backward(direct, fallback, residuals, cotangent):
    choice, operands = residuals
    vjp_of = lambda branch: lambda ops: jax.vjp(branch, ops)[1](cotangent)[0]  # noqa: E731
    return None, lax.cond(choice, vjp_of(direct), vjp_of(fallback), operands)


_chosen.defvjp(_chosen_forward, _chosen_backward)
