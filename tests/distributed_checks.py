"""Multi-device agreement checks, run in a subprocess by ``test_distributed.py``.

JAX fixes its device count when it first initializes, and the other test files
share the pytest process with one CPU device. So ``test_distributed.py`` starts
this script once with ``JAX_NUM_CPU_DEVICES=8``;
the script runs every scenario on the same 8 CPU devices. Each scenario
(``jit/bn``, ``pmap/sn``, ``groups``, ...) reports itself on stdout as one JSON
line as soon as it ends, either ``{"scenario": name, "results": {comparison:
largest absolute difference}}`` or ``{"scenario": name, "error": traceback}``,
so one scenario that raises fails only the tests that read it. Each comparison
sets a distributed computation against the single-device result it must
reproduce, on the same global batch:

* ``jit/...``: plain ``jax.jit`` on a batch sharded over a ``Mesh`` with
  ``NamedSharding``; XLA inserts the collectives, the layer has no axis_name.
* ``shard_map/...``: explicit SPMD; with ``axis_name`` bn spans the whole
  batch, without it each shard is normalized on its own.
* ``pmap/...``: the same through ``jax.pmap``, including ``axis_index_groups``.
* ``train/...``: whole SGD steps of a small conv net.

Run it by hand to see the numbers (arguments select scenarios by name or
prefix, e.g. ``jit pmap/sn``):
``JAX_NUM_CPU_DEVICES=8 python tests/distributed_checks.py``
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import switchnorm
from switchnorm import linen as snn

DEVICES = 8
BATCH = 16  # global batch: 2 samples per device
CHANNELS = 8
CONFIGS = {  # name -> normalizers
    "bn": ("bn",),
    "in": ("in",),
    "ln": ("ln",),
    "gn": ("gn",),
    "sn": ("bn", "in", "ln", "gn"),
}

WEIGHTED = {"sn-channel": "channel", "sn-sample": "sample"}
"""Layers blending all four normalizers with per-channel or per-sample weights: name -> weights."""

Results = dict[str, float]
"""One scenario's comparisons: name -> largest absolute difference."""


def largest_difference(*pairs) -> float:
    """The largest |a - b| over all pairs of array trees."""
    worst = 0.0
    for a, b in pairs:
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
            assert u.shape == v.shape, (u.shape, v.shape)
            worst = max(worst, float(np.max(np.abs(u - v))) if u.size else 0.0)
    return worst


def batch(seed: int = 0, shape=(BATCH, 5, 5, CHANNELS)) -> np.ndarray:
    """Channels with different offsets and spreads, mean far from zero."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-20, 20, shape[-1])
    spread = rng.uniform(0.5, 3.0, shape[-1])
    return (offset + spread * rng.standard_normal(shape)).astype(np.float32)


def layer(normalizers, **kwargs) -> switchnorm.SwitchNorm:
    """A layer with random logits, scale, bias and sample map (so every term matters)."""
    norm = switchnorm.SwitchNorm(CHANNELS, normalizers=normalizers, num_groups=4, rngs=nnx.Rngs(0), **kwargs)
    keys = jax.random.split(jax.random.key(1), 5)
    norm.mean_logits[...] = jax.random.normal(keys[0], norm.mean_logits.shape)
    norm.var_logits[...] = jax.random.normal(keys[1], norm.var_logits.shape)
    norm.scale[...] = 1.0 + 0.1 * jax.random.normal(keys[2], (CHANNELS,))
    norm.bias[...] = 0.1 * jax.random.normal(keys[3], (CHANNELS,))
    if norm.sample_map is not None:
        norm.sample_map[...] = 0.5 * jax.random.normal(keys[4], norm.sample_map.shape)
    return norm


def named_layer(name: str, **kwargs) -> switchnorm.SwitchNorm:
    """:func:`layer` for a scenario name: a key of CONFIGS, or of WEIGHTED (all four normalizers)."""
    if name in WEIGHTED:
        return layer(CONFIGS["sn"], weights=WEIGHTED[name], **kwargs)
    return layer(CONFIGS[name], **kwargs)


def forward(graphdef, state, x):
    """One training-mode call: output and the updated state (running stats)."""
    model = nnx.merge(graphdef, state)
    y = model(x)
    return y, nnx.state(model)


def functional(norm: switchnorm.SwitchNorm, **kwargs):
    """``switch_norm`` closed over ``norm``'s parameters."""

    def apply(x):
        return switchnorm.switch_norm(
            x,
            norm.mean_logits[...],
            norm.var_logits[...],
            scale=norm.scale[...],
            bias=norm.bias[...],
            normalizers=norm.normalizers,
            num_groups=4,
            weights=norm.weights,
            sample_map=norm.sample_map[...] if norm.sample_map is not None else None,
            **kwargs,
        )

    return apply


# --------------------------------------------------------------------------
# (a) jit with a batch-sharded input.
# --------------------------------------------------------------------------


def check_jit(mesh: Mesh, name: str) -> Results:
    x = batch()
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    x_sharded = jax.device_put(x, data)
    assert len(x_sharded.sharding.device_set) == DEVICES
    norm = named_layer(name)
    normalizers = norm.normalizers
    graphdef, state = nnx.split(norm)
    step = jax.jit(forward, static_argnums=0)
    y1, s1 = step(graphdef, state, jax.device_put(x, jax.devices()[0]))
    y8, s8 = step(graphdef, jax.device_put(state, replicated), x_sharded)
    assert y8.sharding.is_equivalent_to(data, y8.ndim), y8.sharding
    results = {f"jit/nnx/{name}/output": largest_difference((y1, y8))}
    if "bn" in normalizers:  # XLA must have inserted a cross-device reduction
        hlo = step.lower(graphdef, jax.device_put(state, replicated), x_sharded).compile().as_text()
        assert "all-reduce" in hlo
        results[f"jit/nnx/{name}/running_stats"] = largest_difference(
            ((s1["mean"], s1["var"]), (s8["mean"], s8["var"]))
        )
    f = jax.jit(functional(norm))
    (y1, b1), (y8, b8) = f(x), f(x_sharded)
    results[f"jit/functional/{name}/output"] = largest_difference((y1, y8), (b1, b8))
    return results


# --------------------------------------------------------------------------
# (b) shard_map and pmap with explicit collectives.
# --------------------------------------------------------------------------


def _shard_map_without_axis_name(mesh: Mesh, name: str, x: np.ndarray) -> Results:
    """Each shard normalized on its own: equal to the layer applied to each shard."""
    norm = named_layer(name)
    full = jax.jit(functional(norm))
    y_full, b_full = full(x)
    local = jax.jit(
        jax.shard_map(functional(norm), mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P("data")))
    )
    y, b = local(x)
    per_shard = [full(s) for s in x.reshape(DEVICES, BATCH // DEVICES, *x.shape[1:])]
    results = {}
    if name == "bn":  # proves the comparison below can tell the two apart
        results["shard_map/no_axis_name/bn/gap_to_full_batch"] = largest_difference((y_full, y))
    results[f"shard_map/no_axis_name/{name}/output"] = largest_difference(
        (np.concatenate([p[0] for p in per_shard]), y)
    )
    if b_full is not None:
        results[f"shard_map/no_axis_name/{name}/batch_stats"] = largest_difference(
            (np.stack([p[1].mean for p in per_shard]), np.asarray(b.mean).reshape(DEVICES, -1)),
            (np.stack([p[1].var for p in per_shard]), np.asarray(b.var).reshape(DEVICES, -1)),
        )
    return results


def _shard_map_nnx(mesh: Mesh, name: str, x: np.ndarray, y_full: jax.Array) -> Results:
    """The NNX module under shard_map with axis_name: state replicated in and out."""
    norm = named_layer(name, axis_name="data")
    graphdef, state = nnx.split(norm)
    y, new_state = jax.jit(
        jax.shard_map(
            lambda s, x, g=graphdef: forward(g, s, x),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P()),
        )
    )(state, x)
    _, ref_state = jax.jit(forward, static_argnums=0)(*nnx.split(named_layer(name)), x)
    results = {f"shard_map/axis_name/nnx/{name}/output": largest_difference((y_full, y))}
    if "bn" in norm.normalizers:
        results[f"shard_map/axis_name/nnx/{name}/running_stats"] = largest_difference(
            ((ref_state["mean"], ref_state["var"]), (new_state["mean"], new_state["var"]))
        )
    return results


def check_shard_map(mesh: Mesh, name: str) -> Results:
    x = batch(1)
    norm = named_layer(name)
    y_full, b_full = jax.jit(functional(norm))(x)
    synced = jax.jit(
        jax.shard_map(
            functional(norm, axis_name="data"), mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P())
        )
    )
    y, b = synced(x)
    return {
        f"shard_map/axis_name/{name}/output": largest_difference((y_full, y), (b_full, b)),
        **_shard_map_without_axis_name(mesh, name, x),
        **_shard_map_nnx(mesh, name, x, y_full),
    }


def check_groups(mesh2d: Mesh) -> Results:
    """Sync BN within groups of 4 devices: 2-D mesh under shard_map, groups under pmap.

    ``shard_map`` does not implement ``axis_index_groups`` (JAX raises
    NotImplementedError); a mesh axis per group level is its equivalent.
    """
    x = batch(2)
    halves = x.reshape(2, BATCH // 2, *x.shape[1:])
    norm = layer(CONFIGS["sn"])
    full = jax.jit(functional(norm))
    expected = np.concatenate([full(h)[0] for h in halves])

    f = jax.jit(
        jax.shard_map(
            functional(norm, axis_name="data"),
            mesh=mesh2d,
            in_specs=P(("group", "data")),
            out_specs=(P(("group", "data")), P("group")),
        )
    )
    y, _ = f(x)
    results = {"shard_map/2d_mesh_groups/sn/output": largest_difference((expected, y))}

    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    g = jax.pmap(
        lambda s: functional(norm, axis_name="data", axis_index_groups=groups)(s)[0], axis_name="data"
    )
    y = g(x.reshape(DEVICES, BATCH // DEVICES, *x.shape[1:]))
    results["pmap/axis_index_groups/sn/output"] = largest_difference(
        (expected, np.asarray(y).reshape(x.shape))
    )
    return results


def check_gradients(mesh: Mesh, name: str) -> Results:
    """d(loss)/d(x, logits, sample map) under shard_map with axis_name, against one device.

    Each shard's loss is its part of the full batch's sum; the gradient of the replicated
    parameters (``in_specs=P()``) is summed over the devices by shard_map's own transpose.
    """
    x = batch(5)
    norm = named_layer(name)
    params = {"mean_logits": norm.mean_logits[...], "var_logits": norm.var_logits[...]}
    if norm.sample_map is not None:
        params["sample_map"] = norm.sample_map[...]

    def loss(params, x, axis_name=None):
        y, _ = switchnorm.switch_norm(
            x, normalizers=norm.normalizers, num_groups=4, weights=norm.weights, axis_name=axis_name, **params
        )
        total = jnp.sum(jnp.sin(y))
        return total if axis_name is None else jax.lax.psum(total, axis_name)

    full = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    sharded = jax.shard_map(
        lambda p, x: loss(p, x, "data"), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
    )
    g_params, g_x = jax.jit(jax.grad(lambda p, x: jnp.sum(sharded(p, x)), argnums=(0, 1)))(params, x)

    def scale(tree) -> float:  # the largest entry: gradients of logits sum over the whole batch
        return max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(tree))

    return {
        f"gradients/{name}/params_relative": largest_difference((full[0], g_params)) / scale(full[0]),
        f"gradients/{name}/x_relative": largest_difference((full[1], g_x)) / scale(full[1]),
    }


MASK_LENGTHS = np.array([25, 0, 3, 17, 0, 0, 9, 25, 1, 12, 25, 5, 0, 20, 7, 25])
"""Masked-in positions (of 25) per sample: every device's count differs, device 2 holds none."""


def check_mask(mesh: Mesh) -> Results:
    """A call-time mask of padded positions under shard_map with axis_name, against one device.

    bn's statistics must be those of the masked-in elements of the whole batch however
    they fall on the devices; outputs, batch statistics and gradients are compared.
    ``equal_weights_gap`` is how far an average of the devices' own masked means (which
    weighs each device equally) lands from that: what the comparisons can tell apart.
    """
    x = batch(6)
    keep = (np.arange(25)[None, :] < MASK_LENGTHS[:, None]).reshape(BATCH, 5, 5, 1)
    x = np.where(keep, x, np.float32(1e3))  # padding far from the data
    norm = layer(CONFIGS["sn"])
    params = {"mean_logits": norm.mean_logits[...], "var_logits": norm.var_logits[...]}

    def apply(params, x, mask, axis_name=None):
        return switchnorm.switch_norm(
            x, scale=norm.scale[...], num_groups=4, axis_name=axis_name, mask=mask, **params
        )

    def loss(params, x, mask, axis_name=None):
        # over the masked-in outputs, as a model's loss is: sin of the padding's outputs (in the
        # hundreds) would turn their last-bit float32 differences into gradient differences
        total = jnp.sum(jnp.where(mask, jnp.sin(apply(params, x, mask, axis_name)[0]), 0.0))
        return total if axis_name is None else jax.lax.psum(total, axis_name)

    (y_full, b_full), full_grads = (
        jax.jit(apply)(params, x, keep),
        jax.jit(jax.grad(loss, (0, 1)))(params, x, keep),
    )
    specs = (P(), P("data"), P("data"))
    synced = jax.shard_map(
        lambda p, x, m: apply(p, x, m, "data"), mesh=mesh, in_specs=specs, out_specs=(P("data"), P())
    )
    y, b = jax.jit(synced)(params, x, keep)
    sharded_loss = jax.shard_map(
        lambda p, x, m: loss(p, x, m, "data"), mesh=mesh, in_specs=specs, out_specs=P()
    )
    grads = jax.jit(jax.grad(lambda p, x, m: jnp.sum(sharded_loss(p, x, m)), (0, 1)))(params, x, keep)

    def relative(a, b) -> float:
        return largest_difference((a, b)) / max(
            float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(a)
        )

    kept = np.broadcast_to(keep, x.shape).reshape(DEVICES, -1, x.shape[-1])
    values = x.reshape(DEVICES, -1, x.shape[-1])
    device_means = [
        values[d][kept[d]].reshape(-1, x.shape[-1]).mean(0) for d in range(DEVICES) if kept[d].any()
    ]
    return {
        # padded elements normalize to hundreds: the output is compared relative to its largest
        "mask/shard_map/output_relative": relative(y_full, y),
        "mask/shard_map/batch_stats": largest_difference((b_full, b)),
        "mask/gradients/params_relative": relative(full_grads[0], grads[0]),
        "mask/gradients/x_relative": relative(full_grads[1], grads[1]),
        "mask/equal_weights_gap": float(
            np.max(np.abs(np.mean(device_means, axis=0) - np.asarray(b_full.mean)))
        ),
    }


def check_pmap(name: str) -> Results:
    x = batch(3)
    shards = x.reshape(DEVICES, BATCH // DEVICES, *x.shape[1:])
    norm = named_layer(name)
    y_full, b_full = jax.jit(functional(norm))(x)
    y, b = jax.pmap(functional(norm, axis_name="data"), axis_name="data")(shards)
    pairs = [(y_full, np.asarray(y).reshape(x.shape))]
    if b_full is not None:  # every device holds the same global statistics
        pairs += [
            (np.broadcast_to(b_full.mean, b.mean.shape), b.mean),
            (np.broadcast_to(b_full.var, b.var.shape), b.var),
        ]
    return {f"pmap/axis_name/{name}/output": largest_difference(*pairs)}


# --------------------------------------------------------------------------
# (c) whole training steps.
# --------------------------------------------------------------------------


class ConvNet(nnx.Module):
    def __init__(self, normalizers, rngs: nnx.Rngs, axis_name=None):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm1 = switchnorm.SwitchNorm(
            8, normalizers=normalizers, num_groups=4, axis_name=axis_name, rngs=rngs
        )
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.norm2 = switchnorm.SwitchNorm(
            8, normalizers=normalizers, num_groups=4, axis_name=axis_name, rngs=rngs
        )
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        x = jax.nn.relu(self.norm2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def train_data(seed=4):
    rng = np.random.default_rng(seed)
    images = (2.0 + rng.standard_normal((BATCH, 6, 6, 3))).astype(np.float32)
    labels = rng.integers(0, 4, BATCH).astype(np.int32)
    return images, labels


def make_step(graphdef, tx, axis_name=None):
    """One SGD step on (model state, optimizer state), as a pure function."""

    def step(state, opt_state, images, labels):
        model = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)  # updates running stats
        if axis_name is not None:
            # The global loss is the mean of the per-shard losses. Under
            # shard_map the gradient of a replicated (P()) parameter already
            # arrives summed over the shards (the transpose of its implicit
            # broadcast is a psum), so only the 1/shards factor is missing.
            shards = jax.lax.axis_size(axis_name)
            grads = jax.tree.map(lambda g: g / shards, grads)
            loss = jax.lax.pmean(loss, axis_name)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return nnx.state(model), opt_state, loss

    return step


def _three_steps(step, tx, state, images, labels):
    """Three steps of ``step`` from ``state``: the final state and the three losses."""
    opt_state, losses = tx.init(state.filter(nnx.Param)), []
    for _ in range(3):
        state, opt_state, loss = step(state, opt_state, images, labels)
        losses.append(loss)
    return state, losses


def check_train(mesh: Mesh, name: str) -> Results:
    images, labels = train_data()
    tx = optax.sgd(0.1, momentum=0.9)
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(ConvNet(CONFIGS[name], nnx.Rngs(0)))
    step = jax.jit(make_step(graphdef, tx))
    s1, l1 = _three_steps(step, tx, state, images, labels)
    s8, l8 = _three_steps(
        step,
        tx,
        jax.device_put(state, replicated),
        jax.device_put(images, data),
        jax.device_put(labels, data),
    )
    assert all(len(leaf.sharding.device_set) == DEVICES for leaf in jax.tree.leaves(s8))

    sync_graphdef, _ = nnx.split(ConvNet(CONFIGS[name], nnx.Rngs(0), axis_name="data"))
    smap = jax.jit(
        jax.shard_map(
            make_step(sync_graphdef, tx, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
        )
    )
    s, losses = _three_steps(smap, tx, state, images, labels)
    return {
        f"train/jit/{name}/params_and_stats": largest_difference((s1, s8), (l1, l8)),
        f"train/shard_map/{name}/params_and_stats": largest_difference((s1, s), (l1, losses)),
    }


def check_linen_jit(mesh: Mesh) -> Results:
    """The Linen module under jit with a sharded batch, running stats included."""
    x = batch(5)
    module = snn.SwitchNorm(num_groups=4)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    apply = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=["batch_stats"]))
    y1, u1 = apply(variables, x)
    y8, u8 = apply(
        jax.device_put(variables, NamedSharding(mesh, P())), jax.device_put(x, NamedSharding(mesh, P("data")))
    )
    return {"jit/linen/sn/output_and_running_stats": largest_difference((y1, y8), (u1, u8))}


def scenarios(devices: list[jax.Device]) -> dict[str, Callable[[], Results]]:
    """Every scenario by name, in the order they run."""
    mesh = Mesh(np.array(devices), ("data",))
    mesh2d = Mesh(np.array(devices).reshape(2, 4), ("group", "data"))
    table: dict[str, Callable[[], Results]] = {}
    for name in CONFIGS:
        table[f"jit/{name}"] = functools.partial(check_jit, mesh, name)
    for name in CONFIGS:
        table[f"shard_map/{name}"] = functools.partial(check_shard_map, mesh, name)
    table["groups"] = functools.partial(check_groups, mesh2d)
    for name in CONFIGS:
        table[f"pmap/{name}"] = functools.partial(check_pmap, name)
    for name in WEIGHTED:
        for prefix, check in (
            ("jit", check_jit),
            ("shard_map", check_shard_map),
            ("gradients", check_gradients),
        ):
            table[f"{prefix}/{name}"] = functools.partial(check, mesh, name)
        table[f"pmap/{name}"] = functools.partial(check_pmap, name)
    for name in ("bn", "sn"):
        table[f"train/{name}"] = functools.partial(check_train, mesh, name)
    table["linen"] = functools.partial(check_linen_jit, mesh)
    table["mask"] = functools.partial(check_mask, mesh)
    return table


def run(name: str, scenario: Callable[[], Results]) -> dict:
    """One scenario's report line: its results, or the traceback of what it raised."""
    try:
        return {"scenario": name, "results": scenario()}
    except Exception:  # reported by name; the other scenarios still run
        return {"scenario": name, "error": traceback.format_exc()}


def main() -> None:
    start = time.perf_counter()
    devices = jax.devices()
    if len(devices) != DEVICES:
        sys.exit(f"need {DEVICES} devices, got {len(devices)}; set JAX_NUM_CPU_DEVICES={DEVICES}")
    table = scenarios(devices)
    wanted = sys.argv[1:]
    failed = 0
    for name, scenario in table.items():
        if wanted and not any(name == w or name.startswith(w + "/") for w in wanted):
            continue
        report = run(name, scenario)
        print(json.dumps(report), flush=True)  # one line each, out before the next begins
        failed += "error" in report
        if os.environ.get("SWITCHNORM_VERBOSE"):
            for key, value in report.get("results", {}).items():
                print(f"{value:10.3g}  {key}", file=sys.stderr)
    if os.environ.get("SWITCHNORM_VERBOSE"):
        print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
