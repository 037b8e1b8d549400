"""Figures of a run's learned mixing weights (matplotlib, imported here only).

- :func:`plot_weights_over_training`: one panel per layer, the mean weights
  (solid) and variance weights (dashed) of each normalizer against the step.
- :func:`plot_final_weights`: the view of the SN paper's Figure 1, one pair of
  stacked bars (mean, var) per layer, each bar split by normalizer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = {"bn": "#1f77b4", "in": "#ff7f0e", "ln": "#2ca02c", "gn": "#d62728"}
LABELS = {"bn": "BN (batch)", "in": "IN (instance)", "ln": "LN (layer)", "gn": "GN (group)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Writes the figure as PNG in one rename, never through a symlink (see switchnorm.train.files)."""
    from switchnorm.train import files

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    files.atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _names(weights: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for layer in weights.values():
        for name in layer["mean"]:
            if name not in names:
                names.append(name)
    return names


def plot_weights_over_training(
    records: Sequence[Mapping[str, Any]], path: Path, title: str = ""
) -> Path | None:
    """Every layer's mixing weights against the training step; None if no layer has any."""
    records = [r for r in records if r.get("weights")]
    if not records or not records[-1]["weights"]:
        return None
    plt = _pyplot()
    layers = list(records[-1]["weights"])
    names = _names(records[-1]["weights"])
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 2.9 * rows + 0.9), sharex=True, sharey=True, squeeze=False
    )
    steps = [0] + [r["step"] for r in records]
    largest = max(
        w
        for r in records
        for layer in r["weights"].values()
        for kind in layer.values()
        for w in kind.values()
    )
    top = min(1.0, max(0.5, largest + 0.1))
    for ax, layer in zip(axes.flat, layers, strict=True):
        for name in names:
            uniform = 1.0 / len(records[-1]["weights"][layer]["mean"])
            for kind, style in (("mean", "-"), ("var", "--")):
                values = [uniform] + [r["weights"][layer][kind].get(name, float("nan")) for r in records]
                ax.plot(steps, values, style, color=COLORS.get(name), linewidth=1.6)
        ax.set_title(layer, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, top)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("mixing weight")
    handles = [plt.Line2D([], [], color=COLORS.get(n), linewidth=2.5, label=LABELS.get(n, n)) for n in names]
    handles += [
        plt.Line2D([], [], color="gray", linestyle="-", label="mean weights"),
        plt.Line2D([], [], color="gray", linestyle="--", label="variance weights"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(title or "SwitchNorm mixing weights over training", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    return _save(fig, path)


def plot_final_weights(weights: Mapping[str, Any], path: Path, title: str = "") -> Path | None:
    """Stacked bars of the final weights: for each layer, a mean bar and a var bar."""
    if not weights:
        return None
    plt = _pyplot()
    layers = list(weights)
    names = _names(weights)
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(layers) + 2.0), 4.8))
    for offset, kind, hatch in ((-width / 2 - 0.01, "mean", ""), (width / 2 + 0.01, "var", "//")):
        bottom = [0.0] * len(layers)
        for name in names:
            values = [weights[layer][kind].get(name, 0.0) for layer in layers]
            ax.bar(
                [i + offset for i in range(len(layers))],
                values,
                width,
                bottom=bottom,
                color=COLORS.get(name),
                hatch=hatch,
                edgecolor="white",
                linewidth=0.6,
            )
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("mixing weight")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS.get(n), label=LABELS.get(n, n)) for n in names]
    handles += [
        plt.Rectangle((0, 0), 1, 1, facecolor="lightgray", label="left bar: mean"),
        plt.Rectangle(
            (0, 0), 1, 1, facecolor="lightgray", hatch="//", edgecolor="dimgray", label="right bar: variance"
        ),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    ax.set_title(title or "Final SwitchNorm mixing weights per layer", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)
