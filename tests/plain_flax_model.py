"""A model written with Flax's own layers only: no switchnorm import, so that a process without
switchnorm can rebuild it (tests/test_convert.py loads a collapsed model's state into it)."""

import jax
from flax import nnx


class PlainNet(nnx.Module):
    """Conv, BatchNorm, conv, GroupNorm, pooling, Dense, BatchNorm on (N, C): both normalizers, two ranks."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(16, num_groups=4, rngs=rngs)
        self.dense = nnx.Linear(16, 5, rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, epsilon=1e-3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.gn(self.conv2(x)))
        return self.bn2(self.dense(x.mean(axis=(1, 2))))
