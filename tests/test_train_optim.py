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
