"""``axis_index_groups`` through both front ends, run in a subprocess by ``test_settings.py``.

Needs 4 CPU devices (``JAX_NUM_CPU_DEVICES=4``).
Devices {0, 1} and {2, 3} form two groups under ``jax.pmap``; each group's bn
statistics must be those of its own 2-device batch, computed by the float64
reference. Prints one JSON object of largest absolute differences on its last line.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import reference
from flax import nnx

import switchnorm
from switchnorm import linen as snn

DEVICES, PER_DEVICE, C = 4, 2, reference.C
GROUPS = [[0, 1], [2, 3]]
NUM_GROUPS = 2


def main() -> None:
    assert jax.device_count() == DEVICES, jax.devices()
    rng = np.random.default_rng(0)
    # The second group's samples have another mean and spread: its statistics differ.
    x = reference.channel_input(rng, (DEVICES * PER_DEVICE, 3, 3, C))
    x[DEVICES * PER_DEVICE // 2 :] = 3.0 * x[DEVICES * PER_DEVICE // 2 :] + 4.0
    x = np.asarray(x, np.float32)
    logits = [rng.normal(size=4).astype(np.float32) for _ in range(2)]
    layer = switchnorm.SwitchNorm(
        C, num_groups=NUM_GROUPS, axis_name="data", axis_index_groups=GROUPS, rngs=nnx.Rngs(0)
    )
    layer.mean_logits[...], layer.var_logits[...] = (jnp.asarray(v) for v in logits)
    shards = x.reshape(DEVICES, PER_DEVICE, *x.shape[1:])

    def per_batch(batch):
        y, mean, _ = reference.switch_norm(batch, *logits, num_groups=NUM_GROUPS)
        return y, 0.01 * mean  # running mean after one step from zero, momentum 0.99

    group_ref = [per_batch(x[i * 4 : (i + 1) * 4]) for i in range(2)]
    y_group = np.concatenate([g[0] for g in group_ref])
    mean_group = np.stack([group_ref[d // 2][1] for d in range(DEVICES)])
    y_device = np.concatenate([per_batch(s)[0] for s in shards])
    y_global = per_batch(x)[0]

    graphdef, state = nnx.split(layer)

    def nnx_step(state, s):
        model = nnx.merge(graphdef, state)
        return model(s), model.mean[...]

    y_nnx, mean_nnx = jax.pmap(nnx_step, axis_name="data", in_axes=(None, 0))(state, shards)

    module = snn.SwitchNorm(num_groups=NUM_GROUPS, axis_name="data", axis_index_groups=GROUPS)
    variables = module.init(jax.random.key(0), shards[0], use_running_average=False)
    variables = {
        **variables,
        "params": {**variables["params"], "mean_logits": logits[0], "var_logits": logits[1]},
    }

    def linen_step(s):
        y, updates = module.apply(variables, s, use_running_average=False, mutable=["batch_stats"])
        return y, updates["batch_stats"]["mean"]

    y_linen, mean_linen = jax.pmap(linen_step, axis_name="data")(shards)

    def worst(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64).reshape(np.shape(b)) - b)))

    print(
        json.dumps(
            {
                "nnx/output": worst(y_nnx, y_group),
                "nnx/running_mean": worst(mean_nnx, mean_group),
                "linen/output": worst(y_linen, y_group),
                "linen/running_mean": worst(mean_linen, mean_group),
                "per_device_vs_group": worst(y_device, y_group),
                "global_vs_group": worst(y_global, y_group),
                "tolerance": reference.float32_tolerance(y_group),
            }
        )
    )


if __name__ == "__main__":
    main()
