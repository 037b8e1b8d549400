"""The training loop, datasets, models and the weight-decay mask (switchnorm.train)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import switchnorm
from switchnorm.train import (
    LinenAdapter,
    TrainConfig,
    Trainer,
    WeightHistory,
    build_model,
    load_dataset,
    weight_decay_mask,
)
from switchnorm.train import data as data_lib


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")


def test_loop_learns_the_synthetic_set(synthetic):
    model = build_model("mlp", synthetic.input_shape, synthetic.num_classes, norm="sn")
    history = WeightHistory()
    trainer = Trainer(model, TrainConfig(epochs=4, batch_size=32, learning_rate=1e-2), synthetic)
    _, initial_accuracy = trainer.evaluate(trainer.initial_state())
    state, record = trainer.fit(callbacks=[history])

    assert record["train_loss"] < 0.5 * np.log(4)  # cross-entropy of chance is log(4)
    assert record["test_accuracy"] > 0.8 > 0.25 + 0.5  # chance is 1/4
    assert initial_accuracy < 0.5
    assert history.steps == [16, 32, 48, 64]
    # The mixing weights learned something, and history holds them by layer.
    assert set(history.weights[-1]) == {"norms/0", "norms/1"}
    assert max(abs(w - 0.5) for w in history.series("norms/0", "var", "bn")) > 1e-3


def test_eval_runs_in_eval_mode_with_running_averages(synthetic):
    model = build_model("mlp", synthetic.input_shape, synthetic.num_classes, norm="bn")
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=64), synthetic)
    state, _ = trainer.fit()
    evaluated = trainer.model_at(state)
    assert all(layer.use_running_average for layer in evaluated.norms)
    # The running mean moved from its initial zeros: the train step updated it.
    assert float(jnp.abs(evaluated.norms[0].mean[...]).max()) > 0
    # Eval output does not depend on the rest of the batch (running averages).
    x = synthetic.x_test[:8]
    alone = evaluated(x[:1])
    assert np.allclose(evaluated(x)[:1], alone, atol=1e-6)
    # The model is on copies: changing it leaves the state it came from alone.
    kept = jax.tree.map(np.array, (state.params, state.rest))
    evaluated.norms[0].mean[...] += 1.0
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.rest), kept)


def test_a_sharding_plan_changes_where_arrays_live_not_the_result(synthetic):
    from switchnorm.train.distributed import DataParallel

    config = TrainConfig(epochs=1, batch_size=128)
    build = lambda: build_model("mlp", synthetic.input_shape, synthetic.num_classes, norm="sn")  # noqa: E731
    plain_state, plain = Trainer(build(), config, synthetic).fit()
    planned = Trainer(build(), config, synthetic, plan=DataParallel(devices=1))
    state, record = planned.fit()
    assert state.params["head"]["kernel"].sharding == planned.plan.replicated
    assert record["test_loss"] == plain["test_loss"] and record["train_loss"] == plain["train_loss"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_mask_excludes_exactly_the_mixing_logits(synthetic):
    model = build_model("mlp", (8,), 4, norm="sn")
    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params)
    flags = {jax.tree_util.keystr(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(mask)}
    excluded = {path for path, flag in flags.items() if not flag}
    assert excluded and all(("mean_logits" in p) or ("var_logits" in p) for p in excluded)
    assert sum(("logits" in p) for p in flags) == len(excluded)

    # Used by AdamW: with zero gradients, decay shrinks kernels but not logits.
    tree = {"norm": {"mean_logits": jnp.ones(4), "scale": jnp.ones(3)}, "kernel": jnp.ones((2, 2))}
    tx = optax.adamw(0.1, weight_decay=0.5, mask=weight_decay_mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
    assert np.all(updates["norm"]["mean_logits"] == 0)
    assert np.all(updates["kernel"] < 0) and np.all(updates["norm"]["scale"] < 0)


def test_data_order_depends_only_on_seed_and_epoch():
    a = data_lib.epoch_order(100, seed=3, epoch=5)
    assert np.array_equal(a, data_lib.epoch_order(100, seed=3, epoch=5))
    assert not np.array_equal(a, data_lib.epoch_order(100, seed=3, epoch=6))
    assert not np.array_equal(a, data_lib.epoch_order(100, seed=4, epoch=5))


def test_datasets_have_the_documented_shapes_and_splits():
    digits = load_dataset("digits")
    assert digits.x_train.shape[1:] == (8, 8, 1) and len(digits.x_train) + len(digits.x_test) == 1797
    mnist1d = load_dataset("mnist1d")
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int32
    assert set(np.unique(mnist1d.y_test)) == set(range(10))


@pytest.mark.parametrize("norm", ["sn", "bn", "in", "ln", "gn", "none"])
def test_norm_flag_changes_only_the_normalization_layers(norm):
    model = build_model("resnet2d", (8, 8, 1), 10, norm=norm)
    plain = build_model("resnet2d", (8, 8, 1), 10, norm="none")
    model.eval()  # eval mode: no running-average update inside eval_shape
    assert nnx.eval_shape(lambda: model(jnp.ones((2, 8, 8, 1)))).shape == (2, 10)
    kernels = lambda m: [  # noqa: E731
        v.shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if p[-1] == "kernel"
    ]
    assert kernels(model) == kernels(plain)
    weights = switchnorm.mixing_weights(model)
    if norm == "none":
        assert weights == {}
    else:
        expected = ["bn", "in", "ln", "gn"] if norm == "sn" else [norm]
        assert all(list(w["mean"]) == expected for w in weights.values())


def test_in_and_gn_are_refused_on_dense_features():
    with pytest.raises(ValueError, match="spatial"):
        build_model("mlp", (8,), 4, norm="gn")


def _linen_net(weights: str = "layer"):
    """A Linen MLP with a SwitchNorm (bn + ln) layer, as users write one."""
    import flax.linen as nn

    from switchnorm import linen as snn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, use_running_average):
            x = nn.Dense(32, use_bias=False)(x)
            x = nn.relu(snn.SwitchNorm(use_running_average=use_running_average, weights=weights)(x))
            return nn.Dense(4)(x)

    return Net()


def test_linen_model_trains_through_the_adapter(synthetic):
    model = LinenAdapter(_linen_net(), jnp.zeros((1, 8)))
    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2), synthetic)
    state, record = trainer.fit()
    assert record["test_accuracy"] > 0.6
    assert list(record["weights"]) == ["inner/SwitchNorm_0"]


def test_a_linen_sample_layer_records_its_weights_on_the_fixed_batch_in_eval_mode(synthetic):
    net = _linen_net("sample")
    trainer = Trainer(LinenAdapter(net, jnp.zeros((1, 8))), TrainConfig(epochs=1, batch_size=64), synthetic)
    state, record = trainer.fit()
    inner = trainer.model_at(state).inner
    params = nnx.to_pure_dict(nnx.state(inner, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(inner, nnx.BatchStat))
    assert np.abs(params["SwitchNorm_0"]["sample_map"]).max() > 0  # trained: not the base logits' blend
    expected = switchnorm.mixing_weights(  # Flax's own eval-mode call runs the layer
        {"params": params, "batch_stats": stats},
        batch=synthetic.x_test[:256],
        forward=lambda v, x: net.apply(v, x, use_running_average=True),
    )
    assert record["weights"].keys() == {"inner/SwitchNorm_0"}
    for kind in ("mean", "var"):
        got, want = record["weights"]["inner/SwitchNorm_0"][kind], expected["SwitchNorm_0"][kind]
        assert got == pytest.approx(want, abs=1e-6)


def test_linen_adapter_evaluates_with_the_running_averages(synthetic):
    net = _linen_net()
    trainer = Trainer(LinenAdapter(net, jnp.zeros((1, 8))), TrainConfig(epochs=1, batch_size=64), synthetic)
    state, _ = trainer.fit()
    evaluated = trainer.model_at(state)
    params = nnx.to_pure_dict(nnx.state(evaluated.inner, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(evaluated.inner, nnx.BatchStat))
    assert float(np.abs(stats["SwitchNorm_0"]["mean"]).max()) > 0  # training moved them

    x = synthetic.x_test[:8]
    # Flax's own eval-mode call on the trained variables is the reference.
    expected = net.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)
    np.testing.assert_allclose(evaluated(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluated(x[:1]), expected[:1], rtol=1e-5, atol=1e-6)
    # ...and evaluating leaves the running averages where training left them.
    after = nnx.to_pure_dict(nnx.state(evaluated.inner, nnx.BatchStat))
    assert jax.tree.all(jax.tree.map(np.array_equal, after, stats))


def test_bfloat16_models_keep_float32_parameters_and_statistics():
    model = build_model("resnet1d", (40, 1), 10, norm="sn", dtype=jnp.bfloat16)
    assert model.layers[0](jnp.ones((2, 40, 1), jnp.bfloat16)).dtype == jnp.bfloat16
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert {p.dtype for p in params} == {jnp.dtype("float32")} == {s.dtype for s in stats}


def test_importing_the_library_and_the_training_wing_loads_no_heavy_dependency():
    import subprocess
    import sys

    code = (
        "import sys, switchnorm, switchnorm.train, switchnorm.train.cli;"
        "print([m for m in ('matplotlib', 'sklearn', 'orbax', 'mnist1d', 'tqdm', 'tensorboardX') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_sgd_weight_decay_also_spares_the_mixing_logits():
    from switchnorm.train import make_optimizer

    tree = {"norm": {"var_logits": jnp.ones(4), "scale": jnp.ones(3)}, "kernel": jnp.ones((2, 2))}
    tx = make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.5)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
    assert np.all(updates["norm"]["var_logits"] == 0)
    assert np.all(updates["kernel"] < 0)


def test_a_one_step_ssn_run_ends_with_every_layer_one_hot(synthetic):
    model = build_model("mlp", synthetic.input_shape, synthetic.num_classes, norm="ssn")
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=512), synthetic)  # 512 examples: one step
    state, record = trainer.fit()
    assert int(state.step) == 1
    for layer in record["weights"].values():
        for row in layer.values():
            assert sorted(row.values()) == [0.0, 1.0]
    assert {
        float(r[...]) for r in jax.tree.leaves(nnx.state(trainer.model_at(state), switchnorm.MixingRadius))
    } == {1.0}
