"""Flax's ImageNet-style Linen ResNet with SwitchNorm in place of BatchNorm, trained on local data.

    python examples/linen_resnet.py              # ResNet with [2, 2] stages on digits, a few minutes
    python examples/linen_resnet.py --epochs 1   # a quick look

The model is the structure of Flax's ImageNet example (``examples/imagenet/models.py``:
``ResNetBlock``, ``ResNet`` with ``stage_sizes``, ``num_filters`` and a ``norm`` partial),
with one change: ``norm`` is ``switchnorm.linen.SwitchNorm`` instead of ``nn.BatchNorm``,
with the same arguments (``use_running_average``, ``momentum=0.9``, ``epsilon=1e-5``,
``dtype``, ``axis_name``). The last norm of each block starts with a zero scale, as there.
The stem is ImageNet's (7x7 stride-2 convolution, 3x3 max pool) with ``--stem imagenet``;
the default, a 3x3 convolution, suits the 8x8 images of scikit-learn's digits, which ship
with scikit-learn. The loop is plain Linen: ``params`` and ``batch_stats``, ``mutable=``.
At the end it prints the test accuracy and the weights each SwitchNorm layer learned.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import switchnorm
from switchnorm import linen as snn
from switchnorm.train import load_dataset
from switchnorm.train.data import train_batches

ModuleDef = Any


class ResNetBlock(nn.Module):
    """conv-norm-relu-conv-norm plus a shortcut, as in Flax's ImageNet ResNet."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet v1 of Flax's ImageNet example, its BatchNorm replaced by SwitchNorm."""

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 16
    stem: str = "small"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(  # the one line that differs from Flax's example
            snn.SwitchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (3, 3), name="conv_init")(x)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2**i, conv=conv, norm=norm, act=nn.relu, strides=strides)(
                    x
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def make_steps(model: ResNet, tx: optax.GradientTransformation):
    """The jitted train step (batch statistics, running averages updated) and prediction."""

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def predict(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False).argmax(-1)

    return train_step, predict


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 2], help="blocks per stage")
    parser.add_argument("--stem", choices=["small", "imagenet"], default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate, cosine decay")
    args = parser.parse_args(argv)

    data = load_dataset("digits")  # 1437 / 360 images of 8x8x1, from scikit-learn
    model = ResNet(stage_sizes=args.stages, num_classes=data.num_classes, stem=args.stem)
    variables = model.init(jax.random.key(args.seed), jnp.asarray(data.x_train[:2]), train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    steps = args.epochs * (len(data.x_train) // args.batch_size)
    # AdamW whose weight decay spares the mixing logits, as every SN codebase does.
    schedule = optax.cosine_decay_schedule(args.lr, max(steps, 1))
    tx = optax.adamw(schedule, weight_decay=1e-4, mask=switchnorm.weight_decay_mask)
    opt_state = tx.init(params)
    train_step, predict = make_steps(model, tx)

    accuracy = 0.0
    for epoch in range(args.epochs):
        for x, y in train_batches(data.x_train, data.y_train, args.batch_size, seed=args.seed, epoch=epoch):
            params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x, y)
        accuracy = float(np.mean(np.asarray(predict(params, batch_stats, data.x_test)) == data.y_test))
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}, test accuracy {accuracy:.4f}")

    # The Linen variables dict is all mixing_weights needs: one row per layer, by path.
    print(switchnorm.format_mixing_weights(switchnorm.mixing_weights({"params": params})))
    return accuracy


if __name__ == "__main__":
    main()
