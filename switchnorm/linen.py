"""Flax Linen front end: ``switchnorm.linen.SwitchNorm``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.typing import Dtype, Initializer

from switchnorm import _arguments, _core, _mixing
from switchnorm._linen_convert import collapse_variables, convert_variables

__all__ = ["SwitchNorm", "collapse_variables", "convert_variables"]

Array = jax.Array


class SwitchNorm(nn.Module):
    """Switchable Normalization: a learned softmax blend of bn, in, ln and gn.

    ::

        y = scale * (x - mu) / sqrt(var + epsilon) + bias
        mu  = sum_k softmax(mean_logits)_k * mu_k,  k in normalizers
        var = sum_k softmax(var_logits)_k  * var_k

    Luo et al., ICLR 2019. A drop-in replacement for ``flax.linen.BatchNorm`` on
    any input of rank >= 2 with the samples on axis 0 (channels last, or on
    ``axis``). Parameters ``scale``, ``bias``,
    ``mean_logits``, ``var_logits`` (collection ``params``); running averages
    ``mean`` and ``var`` of the bn term (collection ``batch_stats``, only when
    "bn" is used). As in ``BatchNorm``, running averages are not updated while
    initializing, and a NaN in a training batch makes that channel's running
    averages NaN for good; empty input (N = 0 or a spatial size of 0) gives an
    empty output and leaves them as they are. Arguments are checked at trace
    time.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from switchnorm import linen as snn
      >>> x = jnp.ones((2, 4, 4, 8))
      >>> variables = snn.SwitchNorm().init(jax.random.key(0), x, use_running_average=False)
      >>> y, updates = snn.SwitchNorm().apply(
      ...     variables, x, use_running_average=False, mutable=["batch_stats"])

    Attributes are ``flax.linen.BatchNorm``'s, in its order and with its meaning
    (so positional arguments mean the same), then SwitchNorm's own
    (``normalizers``, ``num_groups``, ``group_size``, ``mixing``).

    Attributes:
      use_running_average: if True, the bn term uses the running averages. Given here or
        at the call, as ``BatchNorm``'s; a layer whose ``normalizers`` leave out "bn" needs it
        in neither place.
      axis: the feature (channel) axis of the input, -1 by default (channels
        last); e.g. 1 for channels-first (N, C, H, W). Not 0, the batch axis.
        The layer moves it last, normalizes, and moves it back. A tuple of axes,
        as ``nn.BatchNorm`` takes, makes their product the channels: scale, bias
        and the running averages get the axes' shape, the logits of
        ``weights="channel"`` one column per flattened channel, and gn groups
        consecutive flattened channels (row-major, the axes in increasing order,
        as Flax orders the parameters' shape).
      momentum: decay rate of the running averages (Flax's EMA rule), in [0, 1].
      epsilon: a small float > 0 added to the mixed variance. ``None`` (default): 1e-5,
        BatchNorm's, for a blend; a layer of one normalizer is that Flax layer and takes its
        default (1e-6 for "in", "ln" and "gn").
      dtype: the dtype of the result (default: the input's dtype).
      param_dtype: the dtype of the parameters and logits (default: float32).
      use_bias: if True, bias (beta) is added.
      use_scale: if True, multiply by scale (gamma).
      bias_init: initializer for bias, by default zero.
      scale_init: initializer for scale, by default one.
      axis_name: the axis name over which bn statistics are combined
        (``shard_map``/``pmap``). Without it each device uses its own batch.
      axis_index_groups: groups of axis indices within that named axis.
      use_fast_variance: accepted for ``BatchNorm`` compatibility; True and False
        compute the same. Flax's fast path is ``E[x^2] - E[x]^2``; SwitchNorm always
        takes one pass of shifted sums, which is as fast and stable (docs/design.md,
        section 2).
      force_float32_reductions: True (default, as Flax): the running averages are
        float32. False: they are kept in ``param_dtype``, as in Flax; the statistics
        are still reduced in float32 (or wider), where Flax's ``False`` reduces in the
        input's dtype, so half-precision results differ from Flax's by that rounding.
      normalizers: names from ("bn", "in", "ln", "gn"); their order is the order
        of the logits. ``None`` (default): all four for inputs of rank >= 3,
        ("bn", "ln") for (N, C) features.
      num_groups: gn group count; ``None`` picks the largest divisor of C that
        is at most ``min(32, C // 2)`` (see ``switchnorm.default_num_groups``), except
        in a layer of gn alone, which is Flax's GroupNorm and takes its 32 groups.
      group_size: gn channels per group; give this or ``num_groups``.
      mixing: "softmax" (default, Switchable Normalization) or "sparsestmax" (Sparse
        Switchable Normalization, Shao et al., CVPR 2019): the weights are then
        ``sparsestmax(logits, radius)``. The radius, a float32 scalar (0 at init), lives in
        the collection ``"mixing_radius"`` (variable ``radius``), which ``apply`` needs with
        the params; no optimizer should touch it. Set it in every layer with a tree map::

          >>> import jax, jax.numpy as jnp
          >>> from switchnorm import linen as snn
          >>> x = jnp.ones((2, 4, 4, 8))
          >>> layer = snn.SwitchNorm(mixing="sparsestmax")
          >>> variables = layer.init(jax.random.key(0), x, use_running_average=False)
          >>> variables = {**variables, "mixing_radius": jax.tree.map(
          ...     lambda r: jnp.full_like(r, 0.5), variables["mixing_radius"])}
          >>> y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

      weights: "layer" (default): one blend per layer, as Switchable Normalization.
        "channel": every channel blends its own way; the logits have shape (K, C).
        "sample": every sample's logits are the layer's plus the param ``sample_map``
        (shape (2, 2K, K), zeros at init) times descriptors of its statistics
        (docs/design.md, "Finer weights: per channel and per sample").
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = initializers.zeros
    scale_init: Initializer = initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    normalizers: Sequence[str] | None = None
    num_groups: int | None = None
    group_size: int | None = None
    mixing: str = "softmax"
    weights: str = "layer"

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        """Normalizes ``x`` (shape (N, ..., C, ...), C on ``axis``) with the learned blend.

        Args:
          x: the input, samples on axis 0 and features on ``axis`` (last by default).
          use_running_average: overrides the attribute of the same name.
          mask: optional booleans broadcastable to x, as for ``nn.BatchNorm``: True where an
            element counts towards the statistics (e.g. not padding). Every element is
            normalized; bn's batch statistics, and so the running averages, read only these.

        Returns:
          The normalized input, same shape, dtype ``self.dtype`` or the input's.
        """
        if self.normalizers is not None and "bn" not in self.normalizers:
            # no bn term, so nothing to choose: as nn.LayerNorm and nn.GroupNorm, which take no flag
            use_running_average = bool(use_running_average or self.use_running_average)
        else:
            use_running_average = nn.merge_param(
                "use_running_average", self.use_running_average, use_running_average
            )
        spec, feature_shape = self._spec(x, use_running_average)
        config = spec.config
        num_channels = math.prod(feature_shape)
        logits_shape = _mixing.logits_shape(config.weights, len(config.normalizers), num_channels)
        self._refuse_logits_of_two(spec, logits_shape)
        param = self.param
        mean_logits = param("mean_logits", initializers.zeros, logits_shape, self.param_dtype)
        var_logits = param("var_logits", initializers.zeros, logits_shape, self.param_dtype)
        sample_map = None
        if config.weights == "sample":
            map_shape = _mixing.sample_map_shape(len(config.normalizers))
            sample_map = param("sample_map", initializers.zeros, map_shape, self.param_dtype)
        scale = param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
        bias = param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None
        ra_mean = ra_var = None
        if "bn" in config.normalizers:
            stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
            ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, stats_dtype)
            ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, stats_dtype)
        radius: float | Array = 0.0
        if config.mixing == "sparsestmax":
            radius = self.variable("mixing_radius", "radius", jnp.zeros, (), jnp.float32).value

        def flat(v: Any) -> Any:
            return None if v is None else jnp.reshape(v, (num_channels,))

        arrays = _core.LayerArrays(
            mean_logits,
            var_logits,
            flat(scale),
            flat(bias),
            flat(ra_mean.value if ra_mean is not None else None),
            flat(ra_var.value if ra_var is not None else None),
            radius,
            sample_map,
        )
        y, mean, var = _core.layer("/".join(self.path), spec, x, arrays, mask)
        if mean is not None and not self.is_initializing():
            assert ra_mean is not None and ra_var is not None  # made above: bn is among the normalizers
            ra_mean.value, ra_var.value = mean.reshape(feature_shape), var.reshape(feature_shape)
        return y

    def _spec(self, x: Array, use_running_average: bool) -> tuple[_core.LayerSpec, tuple[int, ...]]:
        """The checked static description of this call, and the shape of the feature axes."""
        shape = tuple(getattr(x, "shape", ()))
        axes = _arguments.check_axes(self.axis)
        features = _arguments.feature_axes(axes, len(shape)) if len(shape) >= 2 else ()
        feature_shape = tuple(shape[a] for a in features)
        num_channels = math.prod(feature_shape) if feature_shape else 1
        normalizers = _arguments.validate_normalizers(
            _arguments.NORMALIZERS if self.normalizers is None else self.normalizers
        )
        groups = 1
        if "gn" in normalizers:
            groups = _arguments.resolve_num_groups(
                num_channels, self.num_groups, self.group_size, normalizers
            )
        config = _core.Config(
            normalizers,
            groups,
            _arguments.resolve_epsilon(self.epsilon, normalizers),
            bool(use_running_average),
            None if self.is_initializing() else self.axis_name,
            self.axis_index_groups,
            _arguments.check_mixing(self.mixing),
            _arguments.check_weights(self.weights),
        )
        _arguments.check_flag("use_fast_variance", self.use_fast_variance)
        _arguments.check_flag("force_float32_reductions", self.force_float32_reductions)
        momentum = _arguments.check_momentum(self.momentum)
        spec = _core.LayerSpec(
            config, self.normalizers is None, axes, self._built_for(), self.dtype, None, momentum
        )
        if (
            len(shape) >= 2
        ):  # before variables of another channel count are asked for (the core checks the rest)
            rest = tuple(n for i, n in enumerate(shape) if i not in features)
            _arguments.check_channels((*rest, num_channels), spec.num_features)
        return spec, feature_shape

    def _refuse_logits_of_two(self, spec: _core.LayerSpec, logits_shape: tuple[int, ...]) -> None:
        """A clear error for the logits of a default layer on (N, C) input saved by an earlier version.

        Such a layer now holds logits for all four normalizers (and blends bn and ln), as
        the NNX layer does; it used to hold bn's and ln's only.
        """
        if not spec.default_normalizers or not self.has_variable("params", "mean_logits"):
            return
        held: tuple[int, ...] = self.get_variable("params", "mean_logits").shape
        if held[:1] == (2,) and logits_shape[:1] == (4,):
            raise ValueError(
                f"layer {'/'.join(self.path) or '(root)'!r}: mean_logits of shape {held} were saved by an "
                "earlier version, in which a layer with the default normalizers held bn's and ln's "
                "logits on (N, C) input; it now holds all four (blending bn and ln there), as the NNX "
                "layer does. Build this layer with normalizers=('bn', 'ln') to load these logits as "
                "they are."
            )

    def _built_for(self) -> int | None:
        """The channel count of the variables already created, if any."""
        for collection, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean")):
            if self.has_variable(collection, name):
                return math.prod(self.get_variable(collection, name).shape)  # the flattened feature axes
        return None
