"""The mixing logits' own optimizer: labels, learning-rate scale, clipping, no weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from switchnorm.train import build_model, make_optimizer, param_labels, weight_decay_mask

LR, DECAY, SCALE, CLIP = 0.1, 0.5, 0.1, 1.0


def tree(logits, rest):
    """Parameters (or gradients) shaped like a model with one SwitchNorm layer."""
    return {
        "norm": {"mean_logits": jnp.asarray(logits, jnp.float32), "scale": jnp.full(3, rest, jnp.float32)},
        "kernel": jnp.full((2, 2), rest, jnp.float32),
    }


def first_updates(tx, grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_param_labels_mark_exactly_the_mixing_logits_of_a_model():
    labels = param_labels(nnx.state(build_model("mlp", (8,), 4, norm="sn"), nnx.Param))
    flat = {jax.tree_util.keystr(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}
    mixing = {p for p, label in flat.items() if label == "mixing"}
    assert len(mixing) == 4  # mean_logits and var_logits of two layers
    assert all("_logits" in p for p in mixing)
    assert {label for p, label in flat.items() if p not in mixing} == {"rest"}


def test_sgd_gives_the_logits_the_scaled_lr_and_the_clip_and_no_weight_decay():
    params, grads = tree([1.0, 1.0], 1.0), tree([30.0, 40.0], 1.0)  # logits' gradient norm 50
    tx = make_optimizer("sgd", LR, momentum=0.0, weight_decay=DECAY, mixing_lr_scale=SCALE, mixing_clip=CLIP)
    updates = first_updates(tx, grads, params)
    # clipped to norm 1: (0.6, 0.8); then -lr * scale; no decay term
    np.testing.assert_allclose(
        updates["norm"]["mean_logits"], [-LR * SCALE * 0.6, -LR * SCALE * 0.8], rtol=1e-6
    )
    # everything else exactly as without the options: -lr * (g + decay * p)
    plain = first_updates(make_optimizer("sgd", LR, momentum=0.0, weight_decay=DECAY), grads, params)
    np.testing.assert_array_equal(updates["kernel"], plain["kernel"])
    np.testing.assert_array_equal(updates["norm"]["scale"], plain["norm"]["scale"])
    np.testing.assert_allclose(updates["kernel"], -LR * (1.0 + DECAY), rtol=1e-6)


def test_adamw_gives_the_logits_the_scaled_lr_and_no_weight_decay():
    params, grads = tree([1.0, 1.0], 1.0), tree([3.0, -4.0], 0.0)
    tx = make_optimizer("adamw", LR, weight_decay=DECAY, mixing_lr_scale=SCALE, mixing_clip=CLIP)
    updates = first_updates(tx, grads, params)
    # Adam's first step is -lr * g / |g| whatever the clip; no decay term
    # (up to float32 rounding in Adam's bias corrections)
    np.testing.assert_allclose(updates["norm"]["mean_logits"], [-LR * SCALE, LR * SCALE], rtol=1e-5)
    plain = first_updates(make_optimizer("adamw", LR, weight_decay=DECAY), grads, params)
    np.testing.assert_array_equal(updates["kernel"], plain["kernel"])
    np.testing.assert_allclose(updates["kernel"], -LR * DECAY, rtol=1e-6)  # zero gradient: decay alone


def test_without_the_options_the_optimizer_and_its_state_are_unchanged():
    params = tree([1.0, 1.0], 1.0)
    tx = make_optimizer("adamw", LR, weight_decay=DECAY)
    # no multi_transform wrapper: checkpoints of earlier runs still restore
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(
        optax.adamw(LR, weight_decay=DECAY, mask=weight_decay_mask).init(params)
    )


@pytest.mark.parametrize("option", [{"mixing_lr_scale": 0.0}, {"mixing_clip": -1.0}])
def test_non_positive_mixing_options_are_refused(option):
    with pytest.raises(ValueError, match="must be positive"):
        make_optimizer("sgd", LR, **option)


# -- the command's own optimizer ------------------------------------------------------------------


def _with_logits(params, value: float):
    """``params`` with every mixing logit set to ``value`` (initial logits are 0: decay would not show)."""

    def set_logit(path, leaf):
        return jnp.full_like(leaf, value) if "_logits" in jax.tree_util.keystr(path) else leaf

    return jax.tree_util.tree_map_with_path(set_logit, params)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mixing", [{}, {"mixing_lr_scale": 0.1, "mixing_clip": 1.0}], ids=["plain", "ssn"])
def test_the_train_commands_optimizer_never_decays_the_mixing_logits(optimizer, mixing):
    from switchnorm.train import TrainConfig, command

    config = TrainConfig.for_dataset(
        "synthetic", norm="sn", optimizer=optimizer, weight_decay=1.0, warmup_epochs=0, **mixing
    )
    trainer = command.build(config, devices=None).trainer  # what `switchnorm train` steps with
    params = _with_logits(trainer.initial_state().params, 1.0)
    updates, _ = trainer.tx.update(jax.tree.map(jnp.zeros_like, params), trainer.tx.init(params), params)
    flat = {jax.tree_util.keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    values = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    logits = [k for k in flat if "_logits" in k]
    kernels = [k for k in flat if "kernel" in k]
    assert len(logits) == 4 and all(np.all(flat[k] == 0) for k in logits)  # no gradient, no decay
    for k in kernels:  # decay alone moves the rest, towards zero
        assert np.all(flat[k] * values[k] < 0), k
