"""What each part of SwitchNorm costs XLA to compile: ablations of one training step.

    python -m benchmarks.compile_ablation                 # 5 interleaved repeats
    python -m benchmarks.compile_ablation --repeats 9

The step is :mod:`benchmarks.compile_time`'s (``resnet2d`` with SwitchNorm's four
default normalizers, batch 8 of 8x8x1), traced and compiled afresh with parts of the
layer replaced. The replacements compute wrong values: they exist only to say what
a part costs to compile, so that the aim of 1.5x Flax BatchNorm's compile time can
be weighed against what the layer must compute.

* ``sn``: the layer as it is.
* ``no_cond``: the plain statistics and backward passes, without the raw-sum
  check and its ``lax.cond`` (as off the CPU: the ``raw_sums`` workaround of
  ``switchnorm._xla_cpu`` switched off).
* ``trivial_graph``: the (N, C) graph between the passes replaced by one mean and
  variance per cell, no scopes and no blend (its VJP is then that of a few
  elementwise operations).
* ``trivial_graph_no_cond``: both.
* ``no_graph_vjp``: the cell graph kept in the forward, its VJP in the backward
  replaced by elementwise products; the backward's passes over x are kept.
* ``flax_four``: no SwitchNorm: Flax's own ``BatchNorm``, ``GroupNorm`` with one
  channel per group (in), ``LayerNorm`` over every axis but the batch (ln) and
  ``GroupNorm`` (gn) in its places, their outputs blended by a softmax, as a
  user without this library would write it (plain autodiff).
* ``flax_bn``: ``nnx.BatchNorm`` in the same places, the baseline of the ratios.

Repeats interleave the variants (each first clears JAX's caches); medians are printed.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from benchmarks.compile_time import _commit, step_arguments, time_compile
from switchnorm import _core, _xla_cpu, default_num_groups
from switchnorm._stats import BatchStats
from switchnorm.train import models


def _trivial_graph(config, sums, count, arrays):
    """An (N, C) graph that reads every input once: each cell's own mean and variance, no blend."""
    del config
    mean = sums.s1 * sums.inverse_unit / count
    var = sums.s2 * sums.inverse_unit * sums.inverse_unit / count - mean * mean
    weight = jnp.sum(arrays.mean_logits) + jnp.sum(arrays.var_logits)
    a = lax.rsqrt(var + 1e-5)
    if arrays.scale is not None:
        a = a * arrays.scale
    return mean * weight, a, BatchStats(mean[0], var[0])


_real_vjp = jax.vjp


def _vjp_without_graph(fun: Callable, *primals):
    """``jax.vjp``, except for the (N, C) graph's in ``_core._backward``: elementwise products instead."""
    if "_backward" not in getattr(fun, "__qualname__", ""):
        return _real_vjp(fun, *primals)
    out = fun(*primals)
    mix_mean, a, _ = out
    arrays = primals[2]

    def backward(cotangents):
        mean_bar, a_bar, _ = cotangents
        arrays_bar = jax.tree.map(lambda v: jnp.zeros_like(v) + 1e-9 * jnp.sum(mean_bar), arrays)
        return mean_bar * mix_mean, a_bar * a, arrays_bar

    return out, backward


class FlaxFour(nnx.Module):
    """Flax's bn, in, ln and gn layers on the same input, outputs blended by a softmax, then scale and bias."""

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        plain = dict(use_scale=False, use_bias=False, epsilon=1e-5, rngs=rngs)
        self.layers = nnx.List(
            [
                nnx.BatchNorm(features, **plain),
                nnx.GroupNorm(features, num_groups=features, **plain),
                nnx.LayerNorm(features, reduction_axes=(-3, -2, -1), **plain),
                nnx.GroupNorm(features, num_groups=default_num_groups(features), **plain),
            ]
        )
        self.logits = nnx.Param(jnp.zeros(len(self.layers)))
        self.scale = nnx.Param(jnp.ones(features))
        self.bias = nnx.Param(jnp.zeros(features))

    def __call__(self, x: jax.Array) -> jax.Array:
        weights = jax.nn.softmax(self.logits[...])
        y = sum(weights[i] * layer(x) for i, layer in enumerate(self.layers))
        return y * self.scale[...] + self.bias[...]


def _flax_four(norm, features, *, spatial, dtype=None, weights="layer", rngs):
    """``models.make_norm`` with :class:`FlaxFour` in every place (the resnet's norms are all spatial)."""
    del norm, spatial, dtype, weights
    return FlaxFour(features, rngs=rngs)


@contextlib.contextmanager
def ablation(name: str) -> Iterator[None]:
    """The layer with the parts ``name`` replaces (module docstring) replaced, for one trace."""
    patches = []
    if name in ("no_cond", "trivial_graph_no_cond"):
        patches.append(mock.patch.object(_xla_cpu, "DISABLED", frozenset({"raw_sums"})))
    if name in ("trivial_graph", "trivial_graph_no_cond"):
        patches.append(mock.patch.object(_core, "_graph_of_sums", _trivial_graph))
    if name == "no_graph_vjp":
        patches.append(mock.patch.object(_core.jax, "vjp", _vjp_without_graph))
    if name == "flax_four":
        patches.append(mock.patch.object(models, "make_norm", _flax_four))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        jax.clear_caches()  # the layer's jitted program was traced without the patches
        yield
    jax.clear_caches()


VARIANTS = ("sn", "no_cond", "trivial_graph", "trivial_graph_no_cond", "no_graph_vjp", "flax_four", "flax_bn")


def compile_seconds(name: str, batch: int, size: int) -> float:
    """Seconds to trace, lower and compile a fresh step of the variant."""
    with ablation(name):
        lower_s, compile_s = time_compile("flax_bn" if name == "flax_bn" else "sn", batch, size)
    return lower_s + compile_s


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = step_arguments(argv, __doc__)
    compile_seconds("sn", args.batch, args.size)  # warm JAX's own imports and caches once, untimed
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            samples[name].append(compile_seconds(name, args.batch, args.size))
    medians = {name: statistics.median(s) for name, s in samples.items()}
    print(
        f"trace + lower + compile of one resnet2d train step, batch {args.batch} of {args.size}x{args.size}x1, "
        f"median of {args.repeats}; jax {jax.__version__}, {jax.devices()[0].device_kind}, commit {_commit()}"
    )
    print(f"{'variant':<22} {'total s':>8} {'/ flax_bn':>10}")
    for name, seconds in medians.items():
        print(f"{name:<22} {seconds:>8.3f} {seconds / medians['flax_bn']:>10.2f}")
    return medians


if __name__ == "__main__":
    main()
