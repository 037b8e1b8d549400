"""Reading a ``switchnorm train`` run directory the way a user would: config, checkpoint, tables.

Shared by the tests that drive the command. The checkpoint is read back with
the library's public pieces (``build_model``, ``make_tx``, ``initial_state``,
``rundir.RunDir.restore_checkpoint``), independently of the command's own code, so a
test can hold the command's printed output against it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from switchnorm.train import TrainConfig, TrainState, build_model, initial_state, make_tx, rundir


def read_config(run: Path) -> dict[str, Any]:
    return json.loads((run / "config.json").read_text())


def build(config: dict[str, Any]) -> nnx.Module:
    """The untrained model a run with ``config`` starts from."""
    dtype = None if config["dtype"] == "float32" else jnp.dtype(config["dtype"])
    return build_model(
        config["model"],
        tuple(config["input_shape"]),
        config["num_classes"],
        norm=config["norm"],
        dtype=dtype,
        weights=config.get("weights", "layer"),  # absent from runs made before the flag
        seed=config["seed"],
    )


def restore(run: Path, **changes: Any) -> tuple[nnx.Module, TrainState]:
    """(model holding the latest checkpoint, its TrainState), for the run's config with ``changes``.

    ``RunDir.restore_checkpoint`` refuses a checkpoint whose names, shapes or
    dtypes differ from the template's, so ``changes`` that do not fit raise
    ``rundir.RunError``.
    """
    config = {**read_config(run), **changes}
    model = build(config)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tx = make_tx(TrainConfig(**{k: v for k, v in config.items() if k in fields}), config["steps_per_epoch"])
    state, _, _ = rundir.RunDir(run).restore_checkpoint(initial_state(model, tx))
    model.eval()
    nnx.update(model, state.params, state.rest)
    return model, state


def params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters by path, as NumPy arrays."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }


_CELL = re.compile(r"-?\d+\.\d+|(?<!\S)-(?!\S)")


def parse_weights_table(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """The table of ``switchnorm.format_mixing_weights`` found in ``text``, as {layer: {kind: {name: w}}}.

    The dominant weight's ``*`` and the ``-`` of a normalizer a layer lacks are dropped.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "kind"])
    names = lines[start].split()[2:]
    table: dict[str, dict[str, dict[str, float]]] = {}
    layer = None
    for line in lines[start + 2 :]:
        fields = line.split()
        if len(fields) > 1 and fields[1] in ("mean", "var"):
            layer = fields.pop(0)
        if not fields or fields[0] not in ("mean", "var"):
            break  # the table has ended
        kind = fields.pop(0)
        cells = _CELL.findall(" ".join(fields))
        assert len(cells) == len(names), line
        table.setdefault(layer, {})[kind] = {
            n: float(c) for n, c in zip(names, cells, strict=True) if c != "-"
        }
    return table
