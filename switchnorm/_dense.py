"""(N, C) input: each normalizer's statistics straight from sums of x, no cell graph.

With one element per (n, c) cell the cell graph of :mod:`switchnorm._cell_graph`
works on x-sized arrays and only repeats what a scope's sums say directly: bn
reduces x over the batch, ln over the channels (in and gn need a spatial
extent). Here each scope's statistics are a few reductions of x, the blend is
broadcast from (1, C) and (N, 1) statistics, and the normalize pass is one
elementwise pass. JAX autodiff differentiates the raw-sum branch, as Flax's
BatchNorm; the two-pass branch has the backward pass of
:mod:`switchnorm._dense_vjp`, which holds no x-sized temporary.

Important details:

* Raw sums (``sum x``, ``sum x^2``, read by XLA:CPU straight from x) are kept
  only where every scope's mean square is at most
  :data:`switchnorm._passes.RAW_SUMS_BOUND` times its variance (the bound the
  statistics pass uses for cells, docs/design.md, "One pass: shifted sums per
  cell"). Otherwise a ``lax.cond`` takes each scope's statistics in two
  passes, relative to the scope's first element K: ``mean(x - K)``, then
  ``mean((x - K - that)^2)``, float32's digits kept at any mean. Off the CPU
  the two passes are taken at once, with no check and no ``lax.cond``
  (:func:`switchnorm._passes.raw_sums_pay_off`).
* Each scope's statistics are (1, C) or (N, 1) arrays: K, the mean relative
  to K and the variance. The two-pass branch blends in each element's own
  frame, ``y = -(sum_k w_k ((K_k - x) + mean_k)) * a + bias``, so no absolute
  mean near 1e4 is subtracted from x in float32; the raw branch (K = 0, every
  |mean| within a few standard deviations) blends in absolute terms.
* Under ``axis_name`` or a mask the core uses the general path, whose merges
  already cross devices and weigh cells by their counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from switchnorm import _dense_vjp, _passes
from switchnorm._cell_graph import (
    GraphConfig,
    GraphInputs,
    batch_stats_of,
    mixed_mean_and_factor,
    running_scope,
)
from switchnorm._passes import raw_sums_suffice, raw_sums_within_bound
from switchnorm._stats import BatchStats, CellStats, ScopeStats, cell_stats

Array = jax.Array


class Scope(NamedTuple):
    """One scope's statistics: its shift K, its mean relative to K and its biased variance."""

    shift: Array
    mean: Array
    var: Array


def _axis(name: str) -> int:
    """The axis a scope reduces: the batch for bn ((1, C) statistics), the channels for ln ((N, 1))."""
    return 0 if name == "bn" else 1


_SITES = {"bn": 0, "ln": 2}
"""Each scope's convert sites of x (:func:`switchnorm._passes.converted`): its sum, then its squares'."""
_DX_SITE = 4
"""The backward's convert site of x (:func:`_sums_of_scopes`)."""


def _scope_sums(x: Array, name: str, compute_dtype: Any) -> tuple[Array, Array]:
    """``(sum x, sum x^2)`` over bn's scope or ln's (:func:`_axis`), in ``compute_dtype``.

    Each of the four reductions converts half-precision x at a site of its own
    (:func:`switchnorm._passes.converted`), so none shares a float32 copy of x.
    """
    site = _SITES[name]
    wide, apart = _passes.converted(x, compute_dtype, site), _passes.converted(x, compute_dtype, site + 1)
    # bn squares x as x * x, ln as |x| * |x| (the same numbers): one shared square would be
    # written out for XLA:CPU's two reductions to read; two different ones fuse into each.
    square = apart * apart if name == "bn" else jnp.abs(apart) * jnp.abs(apart)
    return jnp.sum(wide, _axis(name), keepdims=True), jnp.sum(square, _axis(name), keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sums_of_scopes(x: Array, names: tuple[str, ...], compute_dtype: Any) -> tuple[tuple[Array, Array], ...]:
    """:func:`_scope_sums` of every scope in ``names``, with a backward pass of one elementwise kernel.

    ``dx = sum_k g1_k + 2 x sum_k g2_k``, from x converted at a site of its own
    (:data:`_DX_SITE`). Under autodiff each square's derivative reads the forward's convert
    of x (a float32 copy written out for half-precision x) and ln's reads
    ``|x|``, which XLA then also writes out.
    """
    return tuple(_scope_sums(x, name, compute_dtype) for name in names)


def _sums_forward(x, names, compute_dtype):
    return _sums_of_scopes(x, names, compute_dtype), x


def _sums_backward(names, compute_dtype, x, cotangents):
    del names
    g1 = functools.reduce(jnp.add, [c1 for c1, _ in cotangents])
    g2 = functools.reduce(jnp.add, [c2 for _, c2 in cotangents])
    return ((g1 + 2.0 * g2 * _passes.converted(x, compute_dtype, _DX_SITE)).astype(x.dtype),)


_sums_of_scopes.defvjp(_sums_forward, _sums_backward)


def _raw_scope(s1: Array, s2: Array, count: int) -> Scope:
    """A scope from its raw sums: K = 0."""
    stats = cell_stats(jnp.zeros_like(s1), jnp.ones((), s1.dtype), s1, s2, count)
    return Scope(stats.shift, stats.mean, stats.var)


_TWO_PASS_SITES = {"bn": 1, "ln": 3}
"""Each scope's sites (:func:`switchnorm._passes.apart`) in the two-pass branch: its mean's pass, then its variance's."""


def _two_pass_scope(x: Array, name: str, compute_dtype: Any) -> Scope:
    """A scope in two passes relative to its first element K: exact frames, no cancellation.

    Each pass reads x, K (and the mean) :func:`switchnorm._passes.apart` at a site of its own:
    sharing ``x - K``, XLA:CPU would write it out as an x-sized temporary for both passes (and
    for the other scope's), memory the branch holds on every call though it rarely runs.
    """
    axis, site = _axis(name), _TWO_PASS_SITES[name]
    shift = lax.stop_gradient(lax.slice_in_dim(x, 0, 1, axis=axis).astype(compute_dtype))
    x1, shift1 = _passes.apart((x, shift), site)
    mean = jnp.mean(x1.astype(compute_dtype) - shift1, axis, keepdims=True)
    x2, shift2, mean2 = _passes.apart((x, shift, mean), site + 1)
    return Scope(
        shift, mean, jnp.mean(jnp.square(x2.astype(compute_dtype) - shift2 - mean2), axis, keepdims=True)
    )


def _check(sums: dict[str, tuple[Array, Array]], size: int) -> Array:
    """Whether raw sums suffice for every scope: one check for all (each small reduction is a kernel)."""
    if not sums:
        return jnp.asarray(True)
    within = [raw_sums_within_bound(s1, s2, size // s1.size).ravel() for s1, s2 in sums.values()]
    return raw_sums_suffice(jnp.concatenate(within), jnp.concatenate([s2.ravel() for _, s2 in sums.values()]))


def _blend_and_normalize(
    config: GraphConfig,
    compute_dtype: Any,
    out_dtype: Any,
    values: Array,
    scopes: dict[str, Scope],
    inputs: GraphInputs,
    bias: Array | None,
    element_frame: bool,
) -> tuple[Array, BatchStats | None]:
    """``y = (x - mix) * a + bias``, the blend taken in absolute terms or relative to each element.

    Relative to each element (``element_frame``), ``x - mix`` is
    ``-sum_k w_k ((K_k - x) + mean_k)``: no absolute mean near 1e4 is
    subtracted from x in float32. On the raw-sum branch K = 0 and every
    |mean| is within a few standard deviations, so the absolute form loses
    nothing, and its gradient needs fewer passes over x.
    """
    zero = jnp.zeros((1, values.shape[1]), compute_dtype)
    frame = values if element_frame else jnp.zeros((), compute_dtype)
    stats, batch_stats = [], None
    for name in config.normalizers:
        if name == "bn" and config.use_running_average:
            running = running_scope(inputs, zero, compute_dtype)
            scope = Scope(zero, running.mean, running.var)
        else:
            scope = scopes[name]
            if name == "bn":
                batch_stats = batch_stats_of(ScopeStats(scope.mean, scope.var), scope.shift, config)
        stats.append(ScopeStats(mean=(scope.shift - frame) + scope.mean, var=scope.var))
    # One element per cell: each sample's own statistics are x itself, with no spread.
    cells = None
    if config.weights == "sample":
        cells = CellStats(zero, values - frame, jnp.zeros_like(values))
    mix, a = mixed_mean_and_factor(config, compute_dtype, stats, inputs, cells, cell_size=1)
    y = ((values - frame) - mix) * a
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y.astype(out_dtype), batch_stats


def _two_pass(
    config: GraphConfig, compute_dtype: Any, out_dtype: Any, names: tuple[str, ...], operands: Any
) -> tuple[tuple[Array, BatchStats | None], dict[str, Scope]]:
    """The two-pass branch: each scope in two passes, the blend in each element's frame; and the scopes."""
    x, inputs, bias, _ = operands
    scopes = {k: _two_pass_scope(x, k, compute_dtype) for k in names}
    out = _blend_and_normalize(
        config, compute_dtype, out_dtype, x.astype(compute_dtype), scopes, inputs, bias, element_frame=True
    )
    return out, scopes


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _two_pass_lean(
    config: GraphConfig, compute_dtype: Any, out_dtype: Any, names: tuple[str, ...], operands: Any
) -> tuple[Array, BatchStats | None]:
    """:func:`_two_pass`'s output, with the backward pass of :mod:`switchnorm._dense_vjp`.

    Autodiff of the branch held six x-sized temporaries in float32 (fourteen times
    bfloat16 x's bytes) on every call, though the branch rarely runs.
    """
    return _two_pass(config, compute_dtype, out_dtype, names, operands)[0]


def _two_pass_lean_forward(config, compute_dtype, out_dtype, names, operands):
    out, scopes = _two_pass(config, compute_dtype, out_dtype, names, operands)
    return out, (operands, scopes)


def _two_pass_lean_backward(config, compute_dtype, out_dtype, names, residuals, cotangent):
    del out_dtype, names
    (x, inputs, bias, sums), scopes = residuals
    with_counts = {k: (*scope, x.shape[_axis(k)]) for k, scope in scopes.items()}
    dx, inputs_bar, bias_bar = _dense_vjp.backward(
        config, compute_dtype, x, inputs, bias, with_counts, *cotangent
    )
    return ((dx, inputs_bar, bias_bar, jax.tree.map(jnp.zeros_like, sums)),)


_two_pass_lean.defvjp(_two_pass_lean_forward, _two_pass_lean_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chosen(direct: Callable, fallback: Callable, choice: Array, operands: Any) -> Any:
    """``lax.cond(choice, direct, fallback, operands)``, differentiated through the branch taken only.

    Autodiff of a ``lax.cond`` keeps the residuals of both branches, zeros for
    the branch not taken: x-sized arrays written on every step. This VJP saves
    only the operands and, in its backward pass, differentiates the branch taken.
    """
    return lax.cond(choice, direct, fallback, operands)


def _chosen_forward(direct, fallback, choice, operands):
    return lax.cond(choice, direct, fallback, operands), (choice, operands)


def _chosen_backward(direct, fallback, residuals, cotangent):
    choice, operands = residuals
    vjp_of = lambda branch: lambda ops: jax.vjp(branch, ops)[1](cotangent)[0]  # noqa: E731
    return None, lax.cond(choice, vjp_of(direct), vjp_of(fallback), operands)


_chosen.defvjp(_chosen_forward, _chosen_backward)


def normalize_dense(
    config: GraphConfig,
    compute_dtype: Any,
    out_dtype: Any,
    x: Array,
    inputs: GraphInputs,
    bias: Array | None,
    use_custom_vjp: bool = True,
) -> tuple[Array, BatchStats | None]:
    """``switch_norm`` of (N, C) input: scope statistics (raw or two-pass), blend, one elementwise pass."""
    names = [k for k in config.normalizers if not (k == "bn" and config.use_running_average)]
    blend = functools.partial(_blend_and_normalize, config, compute_dtype, out_dtype)

    def raw(operands):
        x, inputs, bias, sums = operands
        scopes = {k: _raw_scope(s1, s2, x.size // s1.size) for k, (s1, s2) in sums.items()}
        return blend(x.astype(compute_dtype), scopes, inputs, bias, element_frame=False)

    def two_pass(operands):
        return _two_pass(config, compute_dtype, out_dtype, tuple(names), operands)[0]

    if not _passes.raw_sums_pay_off():  # off the CPU: two passes cost about what raw sums do, a cond more
        return two_pass((x, inputs, bias, None))
    if use_custom_vjp:
        sums = dict(zip(names, _sums_of_scopes(x, tuple(names), compute_dtype), strict=True))
    else:  # plain autodiff, forward mode included
        sums = {k: _scope_sums(x, k, compute_dtype) for k in names}
    # Everything travels as operands (a custom VJP's functions may close over no tracer).
    operands, suffice = (x, inputs, bias, sums), _check(sums, x.size)
    if use_custom_vjp:
        # Per-sample weights read x itself (each element is its own cell): their branch keeps autodiff.
        fallback = two_pass
        if config.weights != "sample":
            fallback = functools.partial(_two_pass_lean, config, compute_dtype, out_dtype, tuple(names))
        return _chosen(raw, fallback, suffice, operands)
    return lax.cond(suffice, raw, two_pass, operands)
