"""``switchnorm.recalibrate``: population bn statistics, against a float64 NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import linen as nn
from flax import nnx
from reference import data

import switchnorm
from switchnorm import linen as snn

C = 4
BATCHES = 3


class TwoNorms(nnx.Module):
    """SwitchNorm -> relu -> Linear -> SwitchNorm: the second layer sees the first's training output."""

    def __init__(self, rngs):
        self.first = switchnorm.SwitchNorm(C, num_groups=2, rngs=rngs)
        self.linear = nnx.Linear(C, C, rngs=rngs)
        self.second = switchnorm.SwitchNorm(C, num_groups=2, rngs=rngs)
        self.other = nnx.BatchNorm(C, rngs=rngs)  # not a SwitchNorm: left alone

    def __call__(self, x):
        h = self.linear(nnx.relu(self.first(x)))
        return self.other(self.second(h))


def randomized(rng):
    model = TwoNorms(nnx.Rngs(0))
    for layer in (model.first, model.second):
        layer.mean_logits[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
        layer.var_logits[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
        layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
        layer.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
    return model


def batch_statistics_float64(model, x):
    """Each SwitchNorm's bn batch mean and variance on ``x`` in training mode, in float64."""
    stats = []
    for layer in (model.first, model.second):
        if layer is model.second:  # relu, then the Linear layer, on the first layer's output
            kernel, bias = (np.asarray(a[...], np.float64) for a in (model.linear.kernel, model.linear.bias))
            x = np.maximum(y, 0.0) @ kernel + bias  # noqa: F821  (y: the first layer's output)
        y, mean, var = reference.switch_norm(
            x,
            layer.mean_logits[...],
            layer.var_logits[...],
            scale=layer.scale[...],
            bias=layer.bias[...],
            num_groups=2,
        )
        stats.append((mean, var))
    return stats


def test_recalibrate_sets_the_pooled_batch_statistics_of_every_layer(rng):
    model = randomized(rng)
    model.eval()
    # Each batch has its own offset, so the variance of the batch means is a real part of the answer.
    batches = [data(rng, (6, 3, C), offset=2.0 * b) for b in range(BATCHES)]
    assert switchnorm.recalibrate(model, batches) == 2
    per_batch = [batch_statistics_float64(model, x) for x in batches]
    for index, layer in enumerate((model.first, model.second)):
        means = np.stack([stats[index][0] for stats in per_batch])
        variances = np.stack([stats[index][1] for stats in per_batch])
        want_var = variances.mean(axis=0) + means.var(axis=0)
        np.testing.assert_allclose(layer.mean[...], means.mean(axis=0), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(layer.var[...], want_var, rtol=2e-5)
        assert layer.use_running_average  # the mode the caller chose stays


def test_pooled_statistics_equal_the_statistics_of_the_union_of_the_batches(rng):
    layer = switchnorm.SwitchNorm(C, normalizers=("bn",), rngs=nnx.Rngs(0))
    batches = [data(rng, (5, 2, C), offset=3.0 * b) for b in range(BATCHES)]
    switchnorm.recalibrate(layer, batches)
    union = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(layer.mean[...], union.mean(axis=(0, 1)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.var[...], union.var(axis=(0, 1)), rtol=1e-6)


def test_recalibrate_changes_no_parameter_and_no_other_state(rng):
    model = randomized(rng)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    switchnorm.recalibrate(model, [data(rng, (6, 3, C))])
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    for name in ("first", "second"):
        for stat in ("mean", "var"):
            assert not np.array_equal(before[name].pop(stat), after[name].pop(stat))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # params and nnx.BatchNorm's averages
    assert not model.first.use_running_average and model.first.momentum == 0.99


def test_forward_runs_batches_that_are_not_the_input(rng):
    layer = switchnorm.SwitchNorm(C, normalizers=("bn",), rngs=nnx.Rngs(0))
    x = data(rng, (5, C))
    switchnorm.recalibrate(layer, [(x, jnp.zeros(5))], forward=lambda m, batch: m(batch[0]))
    np.testing.assert_allclose(layer.mean[...], np.asarray(x, np.float64).mean(axis=0), rtol=1e-6)


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="at least one batch"):
        switchnorm.recalibrate(switchnorm.SwitchNorm(C, rngs=nnx.Rngs(0)), [])


# --------------------------------------------------------------------------
# The training loop's ``recalibrate`` setting and ``switchnorm train --recalibrate``.
# --------------------------------------------------------------------------


def test_the_loop_recalibrates_over_the_next_epochs_batches_before_the_last_evaluation():
    from switchnorm.train import TrainConfig, Trainer, build_model, load_dataset
    from switchnorm.train.data import train_batches

    data = load_dataset("synthetic")
    runs = {}
    for batches in (0, 3):
        model = build_model("mlp", data.input_shape, data.num_classes, norm="sn")
        trainer = Trainer(model, TrainConfig(epochs=1, batch_size=128, recalibrate=batches), data)
        runs[batches] = (trainer, *trainer.fit())
    trainer, plain, _ = runs[0]
    _, recalibrated, record = runs[3]
    jax.tree.map(np.testing.assert_array_equal, recalibrated.params, plain.params)  # only the averages move
    assert not jax.tree.all(jax.tree.map(np.array_equal, recalibrated.rest, plain.rest))
    model = nnx.clone(trainer.model_at(plain))
    next_epoch = [x for x, _ in train_batches(data.x_train, data.y_train, 128, 0, 1)][:3]  # 4 per epoch
    switchnorm.recalibrate(model, next_epoch)
    jax.tree.map(np.testing.assert_array_equal, recalibrated.rest, nnx.state(model, nnx.Not(nnx.Param)))
    assert record["test_accuracy"] == trainer.evaluate(recalibrated)[1]


def test_the_train_command_records_recalibrate_and_refuses_a_negative_count(tmp_path, capsys):
    from switchnorm.train.cli import main

    flags = ["train", "--dataset", "synthetic", "--norm", "sn", "--epochs", "1", "--batch-size", "256"]
    assert main([*flags, "--recalibrate", "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert '"recalibrate": 2' in (tmp_path / "run" / "config.json").read_text()
    assert main([*flags, "--recalibrate", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--recalibrate must be an integer >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Linen: recalibrate_variables.
# --------------------------------------------------------------------------


class LinenTwoNorms(nn.Module):
    """The Linen twin of TwoNorms, with a Flax BatchNorm whose averages must stay as they were."""

    @nn.compact
    def __call__(self, x, train):
        h = snn.SwitchNorm(num_groups=2, momentum=0.9, name="first")(x, use_running_average=not train)
        h = nn.Dense(C, name="linear")(nn.relu(h))
        h = snn.SwitchNorm(num_groups=2, name="second")(h, use_running_average=not train)
        return nn.BatchNorm(name="other")(h, use_running_average=not train)


def random_linen_variables(module, x, rng):
    variables = module.init(jax.random.key(0), x, train=True)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: (
            jnp.asarray(rng.normal(size=p.shape), jnp.float32)
            if "logits" in jax.tree_util.keystr(path) or "bias" in jax.tree_util.keystr(path)
            else p
        ),
        variables["params"],
    )
    return {**variables, "params": params}


def test_linen_variables_get_the_pooled_batch_statistics_of_every_layer(rng):
    batches = [data(rng, (6, 3, C), offset=2.0 * b) for b in range(BATCHES)]
    module = LinenTwoNorms()
    variables = random_linen_variables(module, batches[0], rng)
    new = switchnorm.recalibrate_variables(module, variables, batches, train=True)
    params = variables["params"]
    per_batch = []
    for x in batches:
        stats = []
        for name in ("first", "second"):
            if name == "second":  # relu, then the Dense layer, on the first layer's output
                x = np.maximum(y, 0.0) @ np.asarray(params["linear"]["kernel"], np.float64)  # noqa: F821
                x = x + np.asarray(params["linear"]["bias"], np.float64)
            p = params[name]
            y, mean, var = reference.switch_norm(
                x, p["mean_logits"], p["var_logits"], scale=p["scale"], bias=p["bias"], num_groups=2
            )
            stats.append((mean, var))
        per_batch.append(stats)
    for index, name in enumerate(("first", "second")):  # first: momentum 0.9, second: 0.99
        means = np.stack([stats[index][0] for stats in per_batch])
        variances = np.stack([stats[index][1] for stats in per_batch])
        got = new["batch_stats"][name]
        np.testing.assert_allclose(got["mean"], means.mean(axis=0), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(got["var"], variances.mean(axis=0) + means.var(axis=0), rtol=2e-5)
    jax.tree.map(
        np.testing.assert_array_equal, new["batch_stats"]["other"], variables["batch_stats"]["other"]
    )
    jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])


def test_a_linen_scan_stack_gets_each_copys_pooled_statistics(rng):
    from test_inspect import LinenScannedModel

    batches = [data(rng, (5, 2, C), offset=1.5 * b) for b in range(BATCHES)]
    module = LinenScannedModel(3)
    variables = module.init(jax.random.key(0), batches[0])
    new = switchnorm.recalibrate_variables(module, variables, batches)
    p = variables["params"]["blocks"]["norm"]
    per_copy = [([], []) for _ in range(3)]
    for x in batches:
        for i in range(3):
            x, mean, var = reference.switch_norm(
                x,
                p["mean_logits"][i],
                p["var_logits"][i],
                scale=p["scale"][i],
                bias=p["bias"][i],
                num_groups=2,
            )
            per_copy[i][0].append(mean)
            per_copy[i][1].append(var)
    got = new["batch_stats"]["blocks"]["norm"]
    for i, (means, variances) in enumerate(per_copy):
        np.testing.assert_allclose(got["mean"][i], np.mean(means, axis=0), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(
            got["var"][i], np.mean(variances, axis=0) + np.var(means, axis=0), rtol=2e-5
        )


def test_a_linen_layer_whose_averages_never_move_is_refused_naming_it():
    module = snn.SwitchNorm(momentum=1.0, use_running_average=False)
    variables = module.init(jax.random.key(0), jnp.ones((4, C)))
    with pytest.raises(ValueError, match="momentum=1.0: its running averages never move"):
        switchnorm.recalibrate_variables(module, variables, [jnp.ones((4, C))])
