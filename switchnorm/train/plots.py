"""Figures of a run's learned mixing weights (matplotlib, imported here only).

- :func:`plot_weights_over_training`: one panel per layer, the mean weights
  (solid) and variance weights (dashed) of each normalizer against the step.
- :func:`plot_final_weights`: the view of the SN paper's Figure 1, one pair of
  stacked bars (mean, var) per layer, each bar split by normalizer; a
  per-channel or per-sample layer's segments are its mean weights, with a
  whisker of plus and minus their standard deviation.
- :func:`plot_weight_distribution`: for layers with per-sample (or
  per-channel) weights, how each normalizer's weight is spread over the
  samples of a batch: one panel per layer and kind, one box per normalizer,
  optionally one per group of samples (e.g. clean and altered inputs).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import switchnorm
from switchnorm.train import files

COLORS = {"bn": "#1f77b4", "in": "#ff7f0e", "ln": "#2ca02c", "gn": "#d62728"}
LABELS = {"bn": "BN (batch)", "in": "IN (instance)", "ln": "LN (layer)", "gn": "GN (group)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Writes the figure as PNG in one rename, never through a symlink (see switchnorm.train.files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    files.atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _names(weights: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for layer in weights.values():
        for name in _summary(layer)["mean"]:
            if name not in names:
                names.append(name)
    return names


def _summary(layer: Any) -> Mapping[str, Mapping[str, float]]:
    """A layer's weights as floats: as given, or the mean of :class:`switchnorm.LayerWeightArrays`."""
    return layer.summary() if isinstance(layer, switchnorm.LayerWeightArrays) else layer


def _spread(layer: Any) -> Mapping[str, Mapping[str, float]] | None:
    """The std over channels or samples of a per-channel or per-sample layer's weights, else None."""
    return layer.spread() if isinstance(layer, switchnorm.LayerWeightArrays) else None


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


def _whiskers(ax: Any, x: list[float], bottom: list[float], values: list[float], spreads, kind, name) -> None:
    """Plus and minus the std of each per-channel or per-sample segment, through its middle."""
    points = [
        (xi, b + v / 2, spread[kind].get(name, 0.0))
        for xi, b, v, spread in zip(x, bottom, values, spreads, strict=True)
        if spread is not None and name in spread[kind]
    ]
    if points:
        xs, ys, errors = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="black", elinewidth=1.0, capsize=3)


def plot_final_weights(weights: Mapping[str, Any], path: Path, title: str = "") -> Path | None:
    """Stacked bars of the final weights: for each layer, a mean bar and a var bar.

    ``weights`` is :func:`switchnorm.mixing_weights`'s floats, or
    :func:`switchnorm.mixing_weight_arrays`'s arrays: a per-channel or
    per-sample layer's segments are then its mean weights, each with a black
    whisker through its middle spanning plus and minus their standard
    deviation over the channels or samples.
    """
    if not weights:
        return None
    plt = _pyplot()
    layers = list(weights)
    names = _names(weights)
    summaries = {layer: _summary(weights[layer]) for layer in layers}
    spreads = {layer: _spread(weights[layer]) for layer in layers}
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(layers) + 2.0), 4.8))
    for offset, kind, hatch in ((-width / 2 - 0.01, "mean", ""), (width / 2 + 0.01, "var", "//")):
        bottom = [0.0] * len(layers)
        for name in names:
            values = [summaries[layer][kind].get(name, 0.0) for layer in layers]
            x = [i + offset for i in range(len(layers))]
            style = {"color": COLORS.get(name), "hatch": hatch, "edgecolor": "white", "linewidth": 0.6}
            ax.bar(x, values, width, bottom=bottom, **style)
            _whiskers(ax, x, bottom, values, [spreads[layer] for layer in layers], kind, name)
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
    if any(spread is not None for spread in spreads.values()):
        handles.append(plt.Line2D([], [], color="black", marker="|", label="± std over channels / samples"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    ax.set_title(title or "Final SwitchNorm mixing weights per layer", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


GROUP_HATCHES = ("", "//", "..", "xx", "\\\\", "oo")
"""How the boxes of successive sample groups differ (the colour is the normalizer's)."""


def _group_rows(labels: Sequence[Any] | None, samples: int) -> list[tuple[str, Any]]:
    """``(group name, row selector)`` per group of samples, in order of first appearance."""
    import numpy as np

    if labels is None:
        return [("", slice(None))]
    labels = list(labels)
    if len(labels) != samples:
        raise ValueError(
            f"groups has {len(labels)} labels for a batch of {samples} samples; give one per sample."
        )
    order = list(dict.fromkeys(labels))
    return [(str(g), np.array([label == g for label in labels])) for g in order]


def _distribution_panel(ax: Any, weights: Any, names: Sequence[str], groups: list[tuple[str, Any]]) -> None:
    """One box per normalizer (and group) of the (N, K) per-sample ``weights``."""
    span = 0.8 / len(groups)
    for g, (_, rows) in enumerate(groups):
        positions = [k + (g - (len(groups) - 1) / 2) * span for k in range(len(names))]
        boxes = ax.boxplot(
            [weights[rows, k] for k in range(len(names))],
            positions=positions,
            widths=span * 0.85,
            patch_artist=True,
            showfliers=False,
            medianprops={"color": "black"},
        )
        for box, name in zip(boxes["boxes"], names, strict=True):
            box.set(
                facecolor=COLORS.get(name, "gray"), hatch=GROUP_HATCHES[g % len(GROUP_HATCHES)], alpha=0.85
            )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.upper() for n in names])
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)


def plot_weight_distribution(
    arrays: Mapping[str, Any], path: Path, title: str = "", groups: Sequence[Any] | None = None
) -> Path | None:
    """How each per-sample layer's weights spread over a batch: boxes per layer, kind, normalizer.

    ``arrays`` is :func:`switchnorm.mixing_weight_arrays` on a batch; its
    ``weights="sample"`` layers get one row of panels (mean weights left,
    variance weights right), each with one box per normalizer: quartiles and
    whiskers to 1.5 interquartile ranges of the weight the batch's samples
    give it. ``groups``, one label per sample (e.g. "clean" / "altered"),
    splits every box into one per group, side by side, hatched in the order
    the labels first appear. None when no layer has per-sample weights.
    """
    layers = [p for p, a in arrays.items() if getattr(a, "weights", "layer") == "sample"]
    if not layers:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(layers), 2, figsize=(8.5, 2.3 * len(layers) + 1.2), sharey=True, squeeze=False
    )
    for row, layer in zip(axes, layers, strict=True):
        weights = arrays[layer]
        split = _group_rows(groups, weights.mean.shape[0])
        for ax, kind in zip(row, ("mean", "var"), strict=True):
            _distribution_panel(ax, getattr(weights, kind), weights.names, split)
            ax.set_title(f"{layer or '(root)'}: {kind} weights", fontsize=10)
        row[0].set_ylabel("weight per sample")
    names = [str(g) for g in dict.fromkeys(groups)] if groups is not None else []
    if len(names) > 1:
        hatches = [GROUP_HATCHES[g % len(GROUP_HATCHES)] for g in range(len(names))]
        handles = [
            plt.Rectangle((0, 0), 1, 1, facecolor="lightgray", edgecolor="dimgray", hatch=h, label=n)
            for h, n in zip(hatches, names, strict=True)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(title or "Per-sample mixing weights over a batch", fontsize=12)
    fig.tight_layout(rect=(0, 0.05 if len(names) > 1 else 0, 1, 1))
    return _save(fig, path)
