"""Flax NNX front end: ``switchnorm.SwitchNorm`` (also ``switchnorm.nnx.SwitchNorm``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from switchnorm import _arguments, _core, _mixing
from switchnorm._sparsestmax import _checked_radius

__all__ = ["MixingRadius", "SwitchNorm", "set_radius"]

Array = jax.Array


class MixingRadius(nnx.Variable):
    """Sparsestmax's radius in a ``mixing="sparsestmax"`` layer: state the training loop sets.

    Neither an ``nnx.Param`` (no optimizer trains or weight-decays it) nor an ``nnx.BatchStat``.
    ``nnx.split(model, nnx.Param, ...)`` puts it in the rest state (with the running averages);
    ``nnx.split(model, nnx.Param, nnx.BatchStat)`` fails as non-exhaustive for such a model: add
    ``...`` or ``MixingRadius``. ``nnx.state(model, switchnorm.MixingRadius)`` selects it alone.

    Example::

      >>> from flax import nnx
      >>> import switchnorm
      >>> norm = switchnorm.SwitchNorm(4, mixing="sparsestmax", rngs=nnx.Rngs(0))
      >>> type(norm.radius).__name__, float(norm.radius[...])
      ('MixingRadius', 0.0)
    """


def _feature_param(
    use: bool,
    init: Initializer,
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    param_dtype: Dtype,
    metadata: Mapping[str, Any],
) -> Any:
    """scale or bias: an ``nnx.Param`` carrying ``metadata`` as ``nnx.BatchNorm``'s do, or None unused."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, param_dtype), **metadata)


class SwitchNorm(nnx.Module):
    """Switchable Normalization: a learned softmax blend of bn, in, ln and gn.

    ::

        y = scale * (x - mu) / sqrt(var + epsilon) + bias
        mu  = sum_k softmax(mean_logits)_k * mu_k,  k in normalizers
        var = sum_k softmax(var_logits)_k  * var_k

    Luo et al., "Differentiable Learning-to-Normalize via Switchable
    Normalization", ICLR 2019. A drop-in replacement for ``nnx.BatchNorm`` on
    any input of rank >= 2 with the samples on axis 0 (channels last, or on
    ``axis``); ``model.train()`` / ``model.eval()`` switch it the same way. Only the bn term keeps running averages; in, ln and
    gn always use the statistics of each sample. As in Flax's BatchNorm, a NaN
    in a training batch makes that channel's running averages NaN for good
    (reinitialise them, or restore a checkpoint); empty input (N = 0 or a
    spatial size of 0) gives an empty output and leaves them as they are.

    The parameters' shapes are fixed at construction, before the input's rank
    is known: a layer with the default normalizers keeps logits for all four,
    and on (N, C) input, which has no spatial extent, blends only "bn" and
    "ln" (the softmax of their two logits, as the Linen layer, which creates
    only those two). It records the last input's rank, so that
    :attr:`blended_normalizers` and :func:`switchnorm.mixing_weights` report
    the normalizers it blends; the "in" and "gn" logits then get no gradient.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import switchnorm
      >>> norm = switchnorm.SwitchNorm(8, rngs=nnx.Rngs(0))
      >>> norm(jnp.ones((2, 4, 4, 8))).shape
      (2, 4, 4, 8)

    Arguments are ``nnx.BatchNorm``'s, in its order and with its meaning, then
    SwitchNorm's own (``normalizers``, ``num_groups``, ``group_size``, ``mixing``,
    ``weights``).

    Attributes:
      num_features: the number of channels C (the size of the feature axis).
      use_running_average: if True, the bn term uses the running averages.
      axis: the feature (channel) axis of the input, -1 by default (channels
        last); e.g. 1 for channels-first (N, C, H, W). Not 0, the batch axis.
        The layer moves it last, normalizes, and moves it back.
      momentum: decay rate of the running averages (Flax's EMA rule), in [0, 1].
      epsilon: a small float > 0 added to the mixed variance. ``None`` (default): 1e-5,
        BatchNorm's, for a blend; a layer of one normalizer is that Flax layer and takes its
        default (1e-6 for "in", "ln" and "gn").
      dtype: the dtype of the result (default: the input's dtype, after
        ``promote_dtype`` if one is given).
      param_dtype: the dtype of the parameters and logits (default: float32).
      use_bias: if True, bias (beta) is added.
      use_scale: if True, multiply by scale (gamma).
      bias_init: initializer for bias, by default zero.
      scale_init: initializer for scale, by default one.
      axis_name: the axis name over which bn statistics are combined
        (``shard_map``/``pmap``). Under plain ``jax.jit`` with a sharded batch
        none is needed. Without it, each device uses its own batch.
      axis_index_groups: groups of axis indices within that named axis.
      use_fast_variance: accepted for ``nnx.BatchNorm`` compatibility; True and
        False compute the same. Flax's fast path is ``E[x^2] - E[x]^2``; SwitchNorm
        always takes one pass of shifted sums, which is as fast and stable
        (docs/design.md, section 2).
      promote_dtype: ``None`` (default) casts nothing: statistics are computed in
        float32 or wider and the result has ``dtype`` or the input's dtype. A
        function, as ``nnx.BatchNorm``'s (e.g. ``flax.nnx.nn.dtypes.promote_dtype``,
        its default, which makes bfloat16 input with float32 parameters give
        float32), is called as ``promote_dtype((x, mean, var, scale, bias),
        dtype=dtype)`` and the layer computes on what it returns.
      rngs: rng key.
      bias_metadata: metadata for the bias ``nnx.Param`` (e.g. sharding
        annotations), passed as ``nnx.BatchNorm`` passes it.
      scale_metadata: metadata for the scale ``nnx.Param``, likewise.
      normalizers: names from ("bn", "in", "ln", "gn"); their order is the order
        of the logits. ``None`` (default) means all four, of which only "bn"
        and "ln" on (N, C) input (see above). Pass ``("bn", "ln")`` for a layer
        that only ever sees (N, C) features: it then holds only those logits.
      num_groups: gn group count; ``None`` picks the largest divisor of C that
        is at most ``min(32, C // 2)`` (see ``switchnorm.default_num_groups``), except
        in a layer of gn alone, which is Flax's GroupNorm and takes its 32 groups.
      group_size: gn channels per group; give this or ``num_groups``.
      mixing: "softmax" (default, Switchable Normalization) or "sparsestmax" (Sparse
        Switchable Normalization, Shao et al., CVPR 2019): the weights are then
        ``sparsestmax(logits, radius)``, one-hot from ``radius >= sqrt(1 - 1/K)`` on.
      weights: "layer" (default): one blend per layer, as Switchable Normalization.
        "channel": every channel blends its own way; the logits have shape (K, C).
        "sample": every sample's logits are the layer's plus ``sample_map`` times
        descriptors of its statistics (docs/design.md, "Finer weights: per channel and
        per sample"); ``sample_map``, of shape (2, 2K, K), starts at zero.
      radius: only with "sparsestmax": a :class:`MixingRadius` holding a float32 scalar,
        0 at construction; set it with :func:`set_radius` (``None`` with softmax).
      last_input_rank: the rank of the input at the last call (``None`` before
        the first), a static attribute.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        scale_init: Initializer = nnx.initializers.ones_init(),
        axis_name: str | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: PromoteDtypeFn | None = None,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        normalizers: Sequence[str] | None = None,
        num_groups: int | None = None,
        group_size: int | None = None,
        mixing: str = "softmax",
        weights: str = "layer",
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}.")
        self.uses_default_normalizers = normalizers is None
        self.normalizers = _arguments.validate_normalizers(
            _arguments.NORMALIZERS if normalizers is None else normalizers
        )
        self.num_groups = (
            _arguments.resolve_num_groups(num_features, num_groups, group_size, self.normalizers)
            if "gn" in self.normalizers
            else None
        )
        self.mixing = _arguments.check_mixing(mixing)
        self.weights = _arguments.check_weights(weights)
        momentum = _arguments.check_momentum(momentum)
        epsilon = _arguments.resolve_epsilon(epsilon, self.normalizers)
        axis = _arguments.check_axis(axis)
        use_fast_variance = _arguments.check_flag("use_fast_variance", use_fast_variance)
        promote_dtype = _arguments.check_promote_dtype(promote_dtype)
        feature_shape = (num_features,)
        logits_shape = _mixing.logits_shape(self.weights, len(self.normalizers), num_features)
        self.mean_logits = nnx.Param(jnp.zeros(logits_shape, param_dtype))
        self.var_logits = nnx.Param(jnp.zeros(logits_shape, param_dtype))
        map_shape = _mixing.sample_map_shape(len(self.normalizers))
        sample = self.weights == "sample"
        self.sample_map = nnx.Param(jnp.zeros(map_shape, param_dtype)) if sample else nnx.data(None)
        self.scale = _feature_param(use_scale, scale_init, rngs, feature_shape, param_dtype, scale_metadata)
        self.bias = _feature_param(use_bias, bias_init, rngs, feature_shape, param_dtype, bias_metadata)
        self.mean: nnx.BatchStat[Array] | None
        self.var: nnx.BatchStat[Array] | None
        if "bn" in self.normalizers:
            self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
            self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
        else:
            self.mean = nnx.data(None)
            self.var = nnx.data(None)
        sparse = self.mixing == "sparsestmax"
        self.radius = MixingRadius(jnp.zeros((), jnp.float32)) if sparse else nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.last_input_rank: int | None = None

    def set_view(self, use_running_average: bool | None = None):
        """Class method used by ``nnx.view``, as on ``nnx.BatchNorm``.

        Args:
          use_running_average: if True, the bn term uses the running averages.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    @property
    def blended_normalizers(self) -> tuple[str, ...]:
        """The normalizers the last call blended: ``normalizers`` before any call.

        A layer built with the default normalizers blends only ("bn", "ln") on
        (N, C) input; :func:`switchnorm.mixing_weights` reports those.
        """
        if self.last_input_rank is None:
            return self.normalizers
        return _core.blended(self._spec(False), self.last_input_rank)

    def _spec(self, use_running_average: bool) -> _core.LayerSpec:
        config = _core.Config(
            self.normalizers,
            self.num_groups or 1,
            self.epsilon,
            bool(use_running_average),
            self.axis_name,
            self.axis_index_groups,
            self.mixing,
            self.weights,
        )
        return _core.LayerSpec(
            config,
            self.uses_default_normalizers,
            (self.axis,),
            self.num_features,
            self.dtype,
            self.promote_dtype,
            self.momentum,
        )

    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (shape (N, ..., C, ...), C on ``axis``) with the learned blend.

        Args:
          x: the input, samples on axis 0 and features on ``axis`` (last by default).
          use_running_average: overrides the attribute of the same name.
          mask: optional booleans broadcastable to x, as for ``nnx.BatchNorm``: True where
            an element counts towards the statistics (e.g. not padding). Every element is
            normalized; bn's batch statistics, and so the running averages, read only these.

        Returns:
          The normalized input, same shape, dtype ``self.dtype`` or the input's.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("No use_running_average argument was given to SwitchNorm.")
        y, mean, var = _core.layer(self, self._spec(use_running_average), x, _arrays(self), mask)
        self._record_rank(len(getattr(x, "shape", ())))
        if mean is not None:  # bn's batch statistics: the layer holds running averages
            assert self.mean is not None and self.var is not None
            self.mean[...], self.var[...] = mean, var
        return y

    def _record_rank(self, rank: int) -> None:
        """Sets ``last_input_rank``, a static attribute, where it changes and NNX allows it.

        Under a plain JAX transform that closes over the layer (``nnx.eval_shape(lambda:
        model(x))``, ``jax.jit`` of a closure) NNX refuses any mutation; the
        call then goes on and the record stays as it was.
        """
        if self.last_input_rank == rank:
            return
        try:
            self.last_input_rank = rank
        except flax.errors.TraceContextError:
            pass


def _value(variable: Any) -> Any:
    """A variable's array, or None for an absent one (``nnx.data(None)``)."""
    return None if variable is None else variable[...]


def _arrays(layer: Any) -> _core.LayerArrays:
    """What the layer body reads of an NNX layer (or a collapsed one): its parameters and state."""
    return _core.LayerArrays(
        mean_logits=layer.mean_logits[...],
        var_logits=layer.var_logits[...],
        scale=_value(layer.scale),
        bias=_value(layer.bias),
        running_mean=_value(layer.mean),
        running_var=_value(layer.var),
        radius=_value(getattr(layer, "radius", None)) if getattr(layer, "radius", None) is not None else 0.0,
        sample_map=_value(getattr(layer, "sample_map", None)),
    )


def set_radius(model: nnx.Module, radius: Any) -> int:
    """Sets the sparsestmax radius of every ``mixing="sparsestmax"`` SwitchNorm in ``model``.

    Walks the whole graph (nested modules, lists of layers); softmax layers hold no radius and
    are skipped. ``radius`` is a scalar >= 0, a float or an array; a concrete one is checked.
    Under a transform, use it where NNX allows mutation: inside an ``nnx.jit`` function that
    takes the model (``radius`` may then be traced, e.g. ``radius_schedule(step, total)``), or on
    ``nnx.merge(graphdef, state)`` inside ``jax.jit``, returning ``nnx.state(model)``.

    Returns:
      The number of layers set.

    Example::

      >>> from flax import nnx
      >>> import switchnorm
      >>> model = switchnorm.SwitchNorm(8, mixing="sparsestmax", rngs=nnx.Rngs(0))
      >>> switchnorm.set_radius(model, 0.5)
      1
    """
    _arguments.check_shape("radius", radius, (), "(one radius for every layer)")
    _checked_radius(radius)
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SwitchNorm) and node.radius is not None:
            node.radius[...] = jnp.asarray(radius, node.radius[...].dtype)
            count += 1
    return count
