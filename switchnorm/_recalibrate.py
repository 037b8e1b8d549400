"""Population statistics for the bn term: recomputing the running averages after training.

Running averages are an exponential moving average of batch statistics taken while the
parameters moved, so at the end of training they lag the final network, and at small batch
sizes each batch's statistics are noisy. :func:`recalibrate` replaces them with statistics of
the final network over many batches (the "precise BN" of Wu and Johnson, "Rethinking 'Batch'
in BatchNorm", 2021), pooled as if the batches were one:

::

    mean = mean_b(batch_mean_b)
    var  = mean_b(batch_var_b) + var_b(batch_mean_b)        (population variance, ddof 0)

which is the mean and the biased variance of the union of equal-sized batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from switchnorm import linen
from switchnorm.nnx import SwitchNorm

__all__ = ["recalibrate", "recalibrate_variables"]

Forward = Callable[[nnx.Module, Any], Any]


def _call(model: nnx.Module, batch: Any) -> Any:
    """The default forward: the model applied to the batch."""
    return model(batch)


def _bn_layers(model: nnx.Module) -> dict[tuple, SwitchNorm]:
    """Every SwitchNorm layer of ``model`` that keeps bn running averages, by graph path."""
    return {
        tuple(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, SwitchNorm) and node.mean is not None
    }


def _batch_statistics(
    model: nnx.Module, batches: Iterable[Any], forward: Forward
) -> dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Each bn layer's batch mean and variance on every batch, from a training-mode copy.

    The copy's layers get momentum 0 and running averages reset to zero before each batch, so
    after one forward pass they hold that batch's statistics exactly; ``model`` is untouched.
    """
    work = nnx.clone(model)
    work.train()
    layers = _bn_layers(work)
    for layer in layers.values():
        layer.momentum = 0.0
    step = nnx.jit(forward)
    stats: dict[tuple, tuple[list[np.ndarray], list[np.ndarray]]] = {path: ([], []) for path in layers}
    for batch in batches:
        for layer in layers.values():
            assert layer.mean is not None and layer.var is not None  # _bn_layers keeps only these
            layer.mean[...] = jnp.zeros_like(layer.mean[...])
            layer.var[...] = jnp.zeros_like(layer.var[...])
        step(work, batch)
        for path, layer in layers.items():
            assert layer.mean is not None and layer.var is not None
            stats[path][0].append(np.asarray(layer.mean[...], np.float64))
            stats[path][1].append(np.asarray(layer.var[...], np.float64))
    return stats


def _pooled(means: list[np.ndarray], variances: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance of the union of equal-sized batches, from each batch's."""
    batch_means = np.stack(means)
    return batch_means.mean(axis=0), np.stack(variances).mean(axis=0) + batch_means.var(axis=0)


def recalibrate(model: nnx.Module, batches: Iterable[Any], forward: Forward | None = None) -> int:
    """Sets every SwitchNorm layer's bn running mean and variance to population statistics.

    Runs ``model`` forward in training mode on each batch (on a copy: no parameter, no other
    state and not the train/eval mode of ``model`` changes), takes each layer's bn batch mean
    and variance, and pools them: the mean of the batch means, and the mean of the batch
    variances plus the variance of the batch means. For equal-sized batches that is the mean
    and (biased) variance over all of them at once, as one batch of their union would give if
    it fit. Use it after training, before evaluating, to replace the moving averages, which
    lag the final weights and, at small batch sizes, average noisy batches.

    Layers run on their batch statistics while the statistics are taken, as in training; each
    layer's statistics are those of its last call per batch. A stack of layers (``nnx.vmap``)
    gets one set per copy. Other layers (``nnx.BatchNorm``) are left alone.

    Args:
      model: an NNX module (or graph) holding SwitchNorm layers; changed in place.
      batches: an iterable of inputs, each passed as ``forward(model, batch)``; at least one.
      forward: how to run the model on one batch (jitted with ``nnx.jit``); by default
        ``model(batch)``. Pass e.g. ``lambda m, b: m(b[0])`` for ``(x, y)`` batches, or one
        that passes ``use_running_average=False`` if the model's call fixes the mode. A
        forward that passes a ``mask=`` gives each batch's statistics of its masked-in
        elements; the batches still weigh equally in the pool, whatever their counts.

    Returns:
      The number of SwitchNorm layers (stacks counting once) whose averages were set.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> layer = switchnorm.SwitchNorm(3, rngs=nnx.Rngs(0))
      >>> switchnorm.recalibrate(layer, [jnp.ones((4, 2, 3)), 3 * jnp.ones((4, 2, 3))])
      1
      >>> layer.mean[...].tolist(), layer.var[...].tolist()
      ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    """
    stats = _batch_statistics(model, batches, _call if forward is None else forward)
    layers = _bn_layers(model)
    for path, (means, variances) in stats.items():
        if not means:
            raise ValueError("recalibrate needs at least one batch; batches was empty.")
        mean, var = _pooled(means, variances)
        layer = layers[path]
        assert layer.mean is not None and layer.var is not None
        layer.mean[...] = jnp.asarray(mean, layer.mean[...].dtype)
        layer.var[...] = jnp.asarray(var, layer.var[...].dtype)
    return len(stats)


def _linen_batch_statistics(
    module: nn.Module, variables: Any, batches: Iterable[Any], call_kwargs: dict[str, Any]
) -> tuple[dict[tuple[str, ...], float], list[Any]]:
    """Each Linen SwitchNorm's momentum by module path, and the batch_stats after each batch.

    The running averages are zero before every batch, so each layer's update is
    ``(1 - momentum) * batch statistic``; the momenta are read while tracing.
    """
    momenta: dict[tuple[str, ...], float] = {}

    def interceptor(next_fun, args, kwargs, context):
        layer = context.module
        if isinstance(layer, linen.SwitchNorm) and context.method_name == "__call__" and layer.scope:
            momenta[tuple(layer.scope.path)] = float(layer.momentum)
        return next_fun(*args, **kwargs)

    @jax.jit
    def step(variables: Any, batch: Any) -> Any:
        with nn.intercept_methods(interceptor):
            _, updates = module.apply(variables, batch, mutable=["batch_stats"], **call_kwargs)
        return updates["batch_stats"]

    zeroed = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
    updates = [jax.tree.map(lambda a: np.asarray(a, np.float64), step(zeroed, batch)) for batch in batches]
    return momenta, updates


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    """The subtree of nested dicts ``tree`` at ``path``."""
    for key in path:
        tree = tree[key]
    return tree


def _undo_momentum(
    path: tuple[str, ...], update: np.ndarray, momenta: dict[tuple[str, ...], float]
) -> np.ndarray:
    """The batch statistic of a layer whose running average, from zero, became ``update``."""
    momentum = momenta[path]
    if momentum >= 1.0:
        raise ValueError(
            f"layer {'/'.join(path)!r} has momentum={momentum}: its running averages never move, "
            "so recalibrate_variables cannot read its batch statistics; use a momentum below 1."
        )
    return update / np.float64(np.float32(1.0 - momentum))  # the factor the float32 update used


def recalibrate_variables(
    module: nn.Module, variables: Any, batches: Iterable[Any], **call_kwargs: Any
) -> Any:
    """:func:`recalibrate` for Linen: ``variables`` with every SwitchNorm's bn averages pooled.

    Applies ``module`` to each batch with ``mutable=["batch_stats"]`` and ``call_kwargs`` (pass
    what puts the model in training mode, e.g. ``use_running_average=False`` or ``train=True``),
    and returns a copy of ``variables`` whose SwitchNorm running means and variances are the
    pooled batch statistics (mean of the batch means; mean of the batch variances plus the
    variance of the batch means). Nothing else changes; other layers' ``batch_stats`` (e.g.
    ``flax.linen.BatchNorm``'s) are returned as they were. Each batch statistic is read back from
    the layer's update of a zero running average, ``(1 - momentum) * statistic``, to within one
    rounding of the running averages' dtype (float32 unless ``force_float32_reductions=False``).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> import switchnorm
      >>> from switchnorm import linen as snn
      >>> module = snn.SwitchNorm(use_running_average=False)
      >>> variables = module.init(jax.random.key(0), jnp.ones((4, 3)))
      >>> batches = [jnp.ones((4, 3)), 3 * jnp.ones((4, 3))]
      >>> new = switchnorm.recalibrate_variables(module, variables, batches)
      >>> new["batch_stats"]["mean"].round(4).tolist(), new["batch_stats"]["var"].round(4).tolist()
      ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    """
    if "batch_stats" not in variables:
        return variables
    momenta, updates = _linen_batch_statistics(module, variables, batches, call_kwargs)
    if not updates:
        raise ValueError("recalibrate_variables needs at least one batch; batches was empty.")

    def pooled(key_path: Any, leaf: Any) -> Any:
        names = tuple(str(getattr(key, "key", key)) for key in key_path)
        layer, stat = names[:-1], names[-1]
        if layer not in momenta or stat not in ("mean", "var"):
            return leaf
        means = [_undo_momentum(layer, _at(update, (*layer, "mean")), momenta) for update in updates]
        variances = [_undo_momentum(layer, _at(update, (*layer, "var")), momenta) for update in updates]
        mean, var = _pooled(means, variances)
        return jnp.asarray(mean if stat == "mean" else var, jnp.asarray(leaf).dtype)

    batch_stats = jax.tree_util.tree_map_with_path(pooled, variables["batch_stats"])
    return {**variables, "batch_stats": batch_stats}
