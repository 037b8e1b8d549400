"""An NNX model whose SwitchNorm blocks are stacked with ``nnx.vmap`` and run with ``nnx.scan``.

    python examples/nnx_scan_blocks.py              # 6 blocks on MNIST-1D, a few minutes
    python examples/nnx_scan_blocks.py --epochs 1   # a quick look

Flax's scan-over-layers pattern: ``nnx.vmap`` builds ``--blocks`` copies of one
residual block (a 1-D convolution, a SwitchNorm blending bn, in, ln and gn, a
ReLU) with every parameter stacked on a leading axis, and ``nnx.scan`` applies
them one after the other, so the block compiles once however deep the stack is.
The running averages of every copy update inside the scan. The data is
MNIST-1D (4000 / 1000 sequences of length 40, generated locally).

Every copy learns its own blend: ``switchnorm.mixing_weights`` reads a stack as
one row per copy, ``blocks/norm[0]``, ``blocks/norm[1]``, ..., and the script
prints that table at the end, with the test accuracy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx

import switchnorm
from switchnorm.train import load_dataset
from switchnorm.train.data import train_batches


class Block(nnx.Module):
    """x + relu(norm(conv(x))): one residual block, the unit that is stacked."""

    def __init__(self, features: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(features, features, (5,), use_bias=False, rngs=rngs)
        self.norm = switchnorm.SwitchNorm(features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.relu(self.norm(self.conv(x)))


class ScanNet(nnx.Module):
    """A convolution into ``features`` channels, ``blocks`` stacked blocks, a linear head."""

    def __init__(self, blocks: int, features: int, num_classes: int, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, features, (5,), rngs=rngs)

        @nnx.split_rngs(splits=blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs) -> Block:
            return Block(features, rngs)

        self.blocks = create_blocks(rngs)  # every parameter and running average: (blocks, ...)
        self.head = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        x = run(self.stem(x), self.blocks)
        return self.head(x.mean(axis=1))


@nnx.jit
def train_step(model: ScanNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model: ScanNet) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: ScanNet, x: jax.Array) -> jax.Array:
    return model(x).argmax(-1)


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_dataset("mnist1d")
    model = ScanNet(args.blocks, args.features, data.num_classes, nnx.Rngs(args.seed))
    steps = args.epochs * (len(data.x_train) // args.batch_size)
    schedule = optax.cosine_decay_schedule(3e-3, max(steps, 1))
    # AdamW whose weight decay spares the mixing logits, as every SN codebase does.
    tx = optax.adamw(schedule, weight_decay=1e-4, mask=switchnorm.weight_decay_mask)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    accuracy = 0.0
    for epoch in range(args.epochs):
        model.train()  # batch statistics for the bn term
        for x, y in train_batches(data.x_train, data.y_train, args.batch_size, seed=args.seed, epoch=epoch):
            loss = train_step(model, optimizer, x, y)
        model.eval()  # running averages for the bn term
        accuracy = float(np.mean(np.asarray(predict(model, data.x_test)) == data.y_test))
        print(f"epoch {epoch + 1}: loss {float(loss):.4f}, test accuracy {accuracy:.4f}")

    print(switchnorm.format_mixing_weights(switchnorm.mixing_weights(model)))  # one row per copy
    return accuracy


if __name__ == "__main__":
    main()
