"""Layer settings with non-default values, through both front ends, against the reference.

Each setting here once had only its default exercised, so a front end that
dropped it on the way to the core (epsilon, group_size, axis_name,
axis_index_groups, a call-time ``use_running_average`` in evaluation mode)
would have passed the suite.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from reference import ALL, NON_DEFAULT_EPSILONS, SHAPES, C, assert_matches, data, near_epsilon_input

import switchnorm
from switchnorm import linen as snn


def randomize(layer: switchnorm.SwitchNorm, rng) -> switchnorm.SwitchNorm:
    """Random logits, scale, bias and running averages on an NNX layer, in place."""
    k = len(layer.normalizers)
    layer.mean_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.var_logits[...] = jnp.asarray(rng.normal(size=k), jnp.float32)
    layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
    if layer.mean is not None:
        layer.mean[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
        layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
    return layer


def linen_variables(layer: switchnorm.SwitchNorm) -> dict:
    """The NNX layer's parameters and running averages as a Linen variables dict."""
    variables = {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}
    stats = nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat))
    return {**variables, "batch_stats": stats} if stats else variables


def reference_of(layer, x, *, num_groups, epsilon=1e-5, use_running_average=False):
    running = {}
    if use_running_average and layer.mean is not None:
        running = dict(running_mean=layer.mean[...], running_var=layer.var[...])
    return reference.switch_norm(
        x,
        layer.mean_logits[...],
        layer.var_logits[...],
        scale=layer.scale[...],
        bias=layer.bias[...],
        normalizers=layer.normalizers,
        num_groups=num_groups,
        epsilon=epsilon,
        **running,
    )


@functools.partial(jax.jit, static_argnums=(0, 3))
def linen_apply(module, variables, x, use_running_average):
    if use_running_average:
        return module.apply(variables, x, use_running_average=True), None
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])


# --------------------------------------------------------------------------
# epsilon and group_size reach the core from both front ends.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_running_average", [False, True], ids=["train", "eval"])
@pytest.mark.parametrize("epsilon", NON_DEFAULT_EPSILONS)
def test_epsilon_reaches_the_core_from_both_front_ends(rng, epsilon, use_running_average):
    layer = randomize(switchnorm.SwitchNorm(C, num_groups=6, epsilon=epsilon, rngs=nnx.Rngs(0)), rng)
    layer.var[...] = layer.var[...] * epsilon  # running variances of epsilon's size too
    x = near_epsilon_input(rng, SHAPES[4], epsilon)
    y_ref, _, _ = reference_of(
        layer, x, num_groups=6, epsilon=epsilon, use_running_average=use_running_average
    )
    module = snn.SwitchNorm(num_groups=6, epsilon=epsilon)
    y_linen, _ = linen_apply(module, linen_variables(layer), x, use_running_average)
    y_nnx = nnx.jit(lambda m, x: m(x, use_running_average=use_running_average))(layer, x)
    assert_matches(y_nnx, y_ref, err_msg="nnx")
    assert_matches(y_linen, y_ref, err_msg="linen")


@pytest.mark.parametrize("normalizers", [("gn",), ALL], ids=["gn", "all"])
def test_group_size_reaches_the_core_from_both_front_ends(rng, normalizers):
    # group_size=3 means 2 groups of 3 channels; the default for 6 channels is 3 groups.
    assert switchnorm.default_num_groups(C) != C // 3
    layer = switchnorm.SwitchNorm(C, normalizers=normalizers, group_size=3, rngs=nnx.Rngs(0))
    layer = randomize(layer, rng)
    x = data(rng, SHAPES[4])
    y_ref, _, _ = reference_of(layer, x, num_groups=2)
    module = snn.SwitchNorm(normalizers=normalizers, group_size=3)
    y_linen, _ = linen_apply(module, linen_variables(layer), x, False)
    assert_matches(nnx.jit(lambda m, x: m(x))(layer, x), y_ref, err_msg="nnx")
    assert_matches(y_linen, y_ref, err_msg="linen")


# --------------------------------------------------------------------------
# Evaluation mode, overridden at the call: batch statistics, averages updated.
# --------------------------------------------------------------------------


def test_eval_mode_layer_called_with_use_running_average_false_trains_like_nnx_batchnorm(rng):
    ours = switchnorm.SwitchNorm(C, normalizers=("bn",), rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(C, use_fast_variance=False, rngs=nnx.Rngs(0))
    for layer in (ours, theirs):
        layer.scale[...] = jnp.asarray(np.linspace(0.5, 1.5, C), jnp.float32)
        layer.eval()
    x = data(rng, SHAPES[4], offset=3.0)
    call = nnx.jit(lambda m, x: m(x, use_running_average=False))
    assert_matches(call(ours, x), call(theirs, x))
    assert_matches(ours.mean[...], theirs.mean[...])
    assert_matches(ours.var[...], theirs.var[...])
    assert not np.allclose(theirs.mean[...], 0.0)  # nnx.BatchNorm did update its averages
    assert ours.use_running_average is True  # the call did not change the mode


def test_eval_mode_layer_called_with_use_running_average_false_uses_batch_statistics(rng):
    layer = randomize(switchnorm.SwitchNorm(C, num_groups=2, rngs=nnx.Rngs(0)), rng)
    layer.eval()
    x = data(rng, SHAPES[4])
    old_mean = np.asarray(layer.mean[...])
    y_ref, bn_mean, _ = reference_of(layer, x, num_groups=2)
    y = nnx.jit(lambda m, x: m(x, use_running_average=False))(layer, x)
    assert_matches(y, y_ref)
    assert_matches(layer.mean[...], 0.99 * old_mean + 0.01 * bn_mean)


# --------------------------------------------------------------------------
# axis_name: bn statistics over a named axis (jax.vmap gives one in-process).
# --------------------------------------------------------------------------

SHARDS = 2
"""Sub-batches under ``jax.vmap(..., axis_name="batch")``; SHAPES[4] has 3 samples each."""


def sharded(x):
    return x.reshape(SHARDS, x.shape[0] // SHARDS, *x.shape[1:])


@pytest.mark.parametrize("front_end", ["nnx", "linen"])
def test_axis_name_gives_bn_statistics_over_the_whole_named_axis(rng, front_end):
    layer = randomize(switchnorm.SwitchNorm(C, num_groups=2, rngs=nnx.Rngs(0)), rng)
    x = data(rng, (6, 4, 3, C))
    y_ref, bn_mean, _ = reference_of(layer, x, num_groups=2)
    old_mean = np.asarray(layer.mean[...])
    if front_end == "linen":
        module = snn.SwitchNorm(num_groups=2, axis_name="batch")
        variables = linen_variables(layer)
        y, updates = jax.jit(jax.vmap(lambda s: linen_apply(module, variables, s, False), axis_name="batch"))(
            sharded(x)
        )
        new_mean = updates["batch_stats"]["mean"]
    else:
        layer.axis_name = "batch"
        graphdef, state = nnx.split(layer)

        def forward(state, s):
            model = nnx.merge(graphdef, state)
            return model(s), nnx.state(model, nnx.BatchStat)

        y, new_state = jax.jit(jax.vmap(forward, in_axes=(None, 0), axis_name="batch"))(state, sharded(x))
        new_mean = new_state["mean"][...]
    assert_matches(np.asarray(y).reshape(x.shape), y_ref)
    expected_mean = 0.99 * old_mean + 0.01 * bn_mean
    for shard_mean in np.asarray(new_mean):  # every shard holds the global batch's average
        assert_matches(shard_mean, expected_mean)


# --------------------------------------------------------------------------
# axis_index_groups: bn statistics within each group of devices (jax.pmap on
# several CPU devices; vmap and shard_map do not implement the groups).
# --------------------------------------------------------------------------

GROUPS_SCRIPT = Path(__file__).with_name("axis_index_groups_check.py")


@pytest.mark.slow
def test_axis_index_groups_give_each_group_its_own_batch_statistics():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(GROUPS_SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    # Each front end's output against the reference over its own group's batch...
    for name in ("nnx", "linen"):
        assert diffs[f"{name}/output"] < diffs["tolerance"], diffs
        assert diffs[f"{name}/running_mean"] < diffs["tolerance"], diffs
    # ...and the groups' batches really differ, so per-device or global statistics would fail.
    assert diffs["per_device_vs_group"] > 100 * diffs["tolerance"], diffs
    assert diffs["global_vs_group"] > 100 * diffs["tolerance"], diffs
