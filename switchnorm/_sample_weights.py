"""Reading a ``weights="sample"`` layer's per-sample weights: from its input, while inspecting.

Per-sample weights depend on the layer's input, so they exist only during a
forward pass. :func:`switchnorm.mixing_weights` runs one inside
:func:`capturing`, which opens a context-local list; each front end's call
hands its (channels-last, promoted) input to :func:`record`, which, only while
such a list is open and only for a ``"sample"`` layer, appends the weights that
input gets. Outside :func:`capturing`, :func:`record` returns at once: the
layer pays one context-variable lookup per call (at trace time under ``jit``),
and no module state changes either way.

Important details:

* The weights are the core's own: the same statistics pass, the same
  normalizer statistics (bn's running averages with ``use_running_average``,
  the batch's otherwise), :func:`switchnorm._mixing.sample_descriptors` and
  :func:`switchnorm._mixing.blend_weights`, so the figures are the ones the
  layer blends with (docs/design.md, "Finer weights: per channel and per
  sample").
* Reading needs concrete values: a layer called under a JAX transform
  (``jit``, ``vmap``, ``scan``) while capturing raises a ValueError rather
  than leak a tracer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from switchnorm import _core
from switchnorm._cell_graph import GraphConfig, blend_weights_of, normalizer_stats
from switchnorm._passes import mask_cells, shifted_sums
from switchnorm._stats import cell_stats

Array = jax.Array


class CapturedWeights(NamedTuple):
    """One call of one ``weights="sample"`` layer: who it was, its normalizers, its weights.

    Attributes:
      layer: the NNX layer object, or a Linen module's path (``"block/norm"``).
      names: the normalizers the call blended, in the order of the last axis.
      weights: (2, N, K) float array: the mean's and the variance's weights of each sample.
    """

    layer: Any
    names: tuple[str, ...]
    weights: np.ndarray


_RECORDS: contextvars.ContextVar[list[CapturedWeights] | None] = contextvars.ContextVar(
    "switchnorm_sample_weights", default=None
)


@contextlib.contextmanager
def capturing() -> Iterator[list[CapturedWeights]]:
    """Collects the per-sample weights of every ``"sample"`` layer called inside, in call order."""
    records: list[CapturedWeights] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


def sample_weights(config: GraphConfig, x: Array, arrays: Any, mask: Array | None = None) -> Array:
    """(2, N, K): the weights a ``weights="sample"`` layer gives each sample of channels-last ``x``.

    ``arrays`` is the layer's :class:`switchnorm._core.LayerArrays` of the ``config``'s
    normalizers, ``mask`` the call's (broadcast to x). The statistics and the weights are the cell graph's own
    (:func:`switchnorm._cell_graph.normalizer_stats`, ``blend_weights_of``); for (N, C)
    input they equal the direct sums the core takes there, up to rounding.
    """
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    inputs = _core.graph_inputs(config, arrays, compute_dtype)
    shift, _, inverse_unit, s1, s2, _, cell_size = shifted_sums(x, compute_dtype, mask_cells(mask, x))
    cells = cell_stats(shift, inverse_unit, s1, s2, cell_size)
    stats = normalizer_stats(config, compute_dtype, cells, inputs)
    weights = blend_weights_of(config, compute_dtype, stats, inputs, cells, cell_size)
    return jnp.swapaxes(weights[..., 0], 1, 2)  # (2, K, N, 1) -> (2, N, K)


def record(layer: Any, config: GraphConfig, x: Array, arrays: Any, mask: Array | None = None) -> None:
    """Appends ``layer``'s per-sample weights on ``x`` while :func:`capturing`; else nothing.

    Called by the front ends with the channels-last input and the arrays they
    hand the core. Layers other than ``weights="sample"`` and empty input add nothing.
    """
    records = _RECORDS.get()
    if records is None or config.weights != "sample" or x.size == 0:
        return
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            "mixing_weights reads per-sample weights from an eager forward pass, but a "
            "weights='sample' layer was called under a JAX transform (jit, vmap, scan); pass "
            "forward=... that calls the model without transforms."
        )
    weights = np.asarray(sample_weights(config, x, arrays, mask), np.float64)
    records.append(CapturedWeights(layer, tuple(config.normalizers), weights))
