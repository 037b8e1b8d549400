"""Per-sample mixing weights: SwitchNorm(weights="sample") on digits, half of them with altered contrast.

    python examples/sample_weights.py                   # writes docs/figures/sample_weights.png
    python examples/sample_weights.py --compare         # also weights="layer" from the same seed
    python examples/sample_weights.py --epochs 2 --out /tmp/weights.png

scikit-learn's 8x8 digits, where a random half of the images (train and test
alike) get a contrast gain drawn log-uniformly from 0.1x to 10x and a
brightness offset. Batch statistics then describe the clean images and fit
the altered ones badly, while a sample's own statistics (in, ln, gn) take
the gain and offset out. A small NNX CNN with ``SwitchNorm(..., weights=
"sample")`` gives every image its own blend: the layer's logits plus a
learned map of how far the image's statistics lie from each normalizer's.

It takes about 2 minutes of CPU time with ``--compare`` (most of it compiling;
12 minutes of wall time on 2 cores shared at a load average of 15). With seed 0
and 30 epochs it printed test accuracy 0.926 for "sample" (altered images
0.878) against 0.890 for "layer" (0.810); both 0.979 on the clean images.

The script prints the test accuracy (clean, altered, all), the median weight
each normalizer gets on clean and altered test images, and draws, for every
SwitchNorm layer, the distribution of those per-sample weights over the test
set, clean against altered.

The per-sample weights come from ``switchnorm.mixing_weight_arrays(model,
batch=...)``, which runs the model once on the batch and reads the weights every
``weights="sample"`` layer gave each sample (docs/design.md, "Finer weights: per
channel and per sample").
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import switchnorm

BATCH, LEARNING_RATE, TEST_SIZE = 64, 3e-3, 500
GAIN_RANGE, OFFSET_RANGE = (0.1, 10.0), (-2.0, 2.0)


def altered_digits(seed: int) -> dict[str, np.ndarray]:
    """Digits in [0, 1] as (N, 8, 8, 1); a random half scaled by a log-uniform gain and shifted.

    Returns train and test images, labels and the ``altered`` flag of each image.
    """
    digits = load_digits()
    x = digits.images[..., None].astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    altered = rng.random(len(x)) < 0.5
    gain = np.exp(rng.uniform(*np.log(GAIN_RANGE), len(x))).astype(np.float32)
    offset = rng.uniform(*OFFSET_RANGE, len(x)).astype(np.float32)
    x = np.where(altered[:, None, None, None], gain[:, None, None, None] * x + offset[:, None, None, None], x)
    order = rng.permutation(len(x))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    y = digits.target.astype(np.int32)
    return {
        "x_train": x[train], "y_train": y[train], "altered_train": altered[train],
        "x_test": x[test], "y_test": y[test], "altered_test": altered[test],
    }  # fmt: skip


class DigitsCNN(nnx.Module):
    """conv 16 -> SwitchNorm -> relu -> 2x2 pool -> conv 32 -> SwitchNorm -> relu -> mean -> dense 10."""

    def __init__(self, weights: str, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = switchnorm.SwitchNorm(16, weights=weights, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = switchnorm.SwitchNorm(32, weights=weights, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.avg_pool(nnx.relu(self.norm1(self.conv1(x))), (2, 2), strides=(2, 2))
        h = nnx.relu(self.norm2(self.conv2(h)))
        return self.head(h.mean(axis=(1, 2)))


@nnx.jit
def train_step(model: DigitsCNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: DigitsCNN, x: jax.Array) -> jax.Array:
    return model(x).argmax(-1)


def train(data: dict[str, np.ndarray], weights: str, epochs: int, seed: int) -> DigitsCNN:
    """The CNN with ``SwitchNorm(weights=weights)`` trained with Adam; returned in eval mode."""
    model = DigitsCNN(weights, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(data["x_train"]))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            batch = order[start : start + BATCH]
            train_step(model, optimizer, data["x_train"][batch], data["y_train"][batch])
    model.eval()
    return model


def accuracies(model: DigitsCNN, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Test accuracy on the clean images, the altered ones and all."""
    correct = np.asarray(predict(model, data["x_test"])) == data["y_test"]
    altered = data["altered_test"]
    return {"clean": correct[~altered].mean(), "altered": correct[altered].mean(), "all": correct.mean()}


def plot(layers_weights: list[dict[str, np.ndarray]], names: tuple[str, ...], altered: np.ndarray, out: str):
    """Box plots, one panel per layer and statistic: each normalizer's per-sample weight, clean vs altered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(layers_weights), 2, figsize=(9, 3.2 * len(layers_weights)), squeeze=False)
    positions = np.arange(len(names)) * 3.0
    for row, layer_weights in zip(axes, layers_weights, strict=True):
        for ax, kind in zip(row, ("mean", "var"), strict=True):
            w = layer_weights[kind]
            for offset, group, color in ((-0.55, ~altered, "tab:blue"), (0.55, altered, "tab:orange")):
                ax.boxplot(
                    [w[group, k] for k in range(len(names))],
                    positions=positions + offset,
                    widths=0.9,
                    patch_artist=True,
                    boxprops={"facecolor": color, "alpha": 0.6},
                    medianprops={"color": "black"},
                    flierprops={"markersize": 2, "markeredgecolor": color},
                )
            ax.set(xticks=positions, xticklabels=names, ylim=(0, 1), ylabel=f"{kind} weight")
    for i, ax in enumerate(axes[:, 0]):
        ax.set_title(f"SwitchNorm layer {i + 1}, mean weights", fontsize=10)
        axes[i, 1].set_title(f"SwitchNorm layer {i + 1}, variance weights", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in ("tab:blue", "tab:orange")]
    fig.legend(handles, ["clean test images", "altered (gain 0.1-10x, offset)"], loc="lower center", ncol=2)
    fig.suptitle('Per-sample weights of SwitchNorm(weights="sample") over the digits test set')
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _report(label: str, acc: dict[str, float]) -> None:
    print(
        f'weights="{label}": test accuracy {acc["all"]:.4f} (clean {acc["clean"]:.4f}, altered {acc["altered"]:.4f})'
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare", action="store_true", help='also train weights="layer" from the same seed'
    )
    parser.add_argument("--out", default=os.path.join("docs", "figures", "sample_weights.png"))
    args = parser.parse_args(argv)
    data = altered_digits(args.seed)
    model = train(data, "sample", args.epochs, args.seed)
    _report("sample", accuracies(model, data))
    if args.compare:
        _report("layer", accuracies(train(data, "layer", args.epochs, args.seed), data))
    # One eager forward pass over the test set; every weights="sample" layer reports each sample's
    # weights: {path: arrays}, mean and var of shape (N, K).
    arrays = switchnorm.mixing_weight_arrays(model, batch=data["x_test"])
    layers_weights = [{"mean": a.mean, "var": a.var} for a in arrays.values()]
    names = next(iter(arrays.values())).names
    altered = data["altered_test"]
    for i, layer_weights in enumerate(layers_weights):
        for kind, w in layer_weights.items():
            clean, alt = np.median(w[~altered], axis=0), np.median(w[altered], axis=0)
            pairs = ", ".join(f"{n} {c:.3f}/{a:.3f}" for n, c, a in zip(names, clean, alt, strict=True))
            print(f"layer {i + 1} {kind} weights, median clean/altered: {pairs}")
    plot(layers_weights, names, altered, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
