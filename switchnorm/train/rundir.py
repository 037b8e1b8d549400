"""A run directory: config.json, metrics.jsonl, orbax checkpoints, figures.

::

    runs/sn64/
      config.json          every setting of the run (what --resume reads back)
      metrics.jsonl        one JSON record per epoch: step, losses, accuracies, weights
      checkpoints/<step>/  orbax checkpoints: the full TrainState plus the epoch
      manifests/<step>.json  size and SHA-256 of every file of that checkpoint
      summary.json         written at the end: final accuracy, wall time
      weights_over_training.png, final_weights.png

Checkpoints are written synchronously by ``orbax.checkpoint.CheckpointManager``,
which writes each one into a temporary directory and renames it into place only
when complete. After that, a manifest of the checkpoint's files (size and
SHA-256) is written atomically; a checkpoint counts as complete only once its
manifest exists. So a process killed at any moment leaves the previous
checkpoint as the latest complete one, and a checkpoint damaged later
(truncated, overwritten) is caught before orbax reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MANIFESTS = "manifests"


class RunError(Exception):
    """A problem with a run directory, reported as a one-line message."""


def _quiet_orbax() -> Any:
    logging.getLogger("absl").setLevel(logging.ERROR)
    import orbax.checkpoint as ocp

    return ocp


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise RunError(f"{path} is not a directory holding a run.")
    if not is_run(path):
        raise RunError(f"{path} holds no run (no {CONFIG}).")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"{path / CONFIG} is unreadable: {error}") from None
    if not isinstance(config, dict):
        raise RunError(f"{path / CONFIG} does not hold a JSON object.")
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    _atomic_write(path / SUMMARY, json.dumps(summary, indent=2) + "\n")


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


# -- metrics.jsonl ---------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a last line cut short by a kill is skipped."""
    file = path / METRICS
    if not file.exists():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # a partial last line: the process died while writing it
    return records


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path / METRICS, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps only the records up to ``last_step``: what the checkpoint there had seen."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    _atomic_write(path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


# -- checkpoints ---------------------------------------------------------------------


def _flatten(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        flat[name] = np.asarray(leaf)
    return flat, treedef


def save_checkpoint(path: Path, step: int, state: Any, epoch: int, max_to_keep: int = 2) -> None:
    """Saves ``state`` (any pytree) and the epoch it ends, as checkpoint ``step``."""
    ocp = _quiet_orbax()
    flat, _ = _flatten(state)
    unfinished = path / CHECKPOINTS / str(step)
    if jax.process_index() == 0 and unfinished.is_dir() and not (path / MANIFESTS / f"{step}.json").is_file():
        # left by a kill between orbax's rename and the manifest: orbax would refuse the step
        import shutil

        shutil.rmtree(unfinished)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"switchnorm-save-{step}")
    manager = ocp.CheckpointManager(
        (path / CHECKPOINTS).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        ),
    )
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat),
                meta=ocp.args.JsonSave({"step": step, "epoch": epoch, "names": sorted(flat)}),
            ),
            force=True,
        )
        manager.wait_until_finished()
        kept = set(manager.all_steps())
    finally:
        manager.close()
    if jax.process_index() != 0:  # multi-process run: orbax synced the save; one manifest writer
        return
    (path / MANIFESTS).mkdir(exist_ok=True)
    _atomic_write(
        path / MANIFESTS / f"{step}.json", json.dumps(_file_digests(path / CHECKPOINTS / str(step)))
    )
    for manifest in (path / MANIFESTS).glob("*.json"):  # of checkpoints orbax has deleted
        if manifest.stem.isdigit() and int(manifest.stem) not in kept:
            manifest.unlink()


def _file_digests(directory: Path) -> dict[str, list[Any]]:
    return {
        str(file.relative_to(directory)): [file.stat().st_size, hashlib.sha256(file.read_bytes()).hexdigest()]
        for file in sorted(directory.rglob("*"))
        if file.is_file()
    }


def latest_step(path: Path) -> int | None:
    """The step of the newest complete checkpoint (one with a manifest), or None."""
    directory, manifests = path / CHECKPOINTS, path / MANIFESTS
    if not directory.is_dir() or not manifests.is_dir():
        return None
    # orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when complete;
    # the manifest comes after the rename.
    steps = [
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and p.is_dir() and (manifests / f"{p.name}.json").is_file()
    ]
    return max(steps) if steps else None


def verify_checkpoint(path: Path, step: int) -> None:
    """Raises RunError unless checkpoint ``step``'s files match its manifest."""
    where = path / CHECKPOINTS / str(step)
    try:
        manifest = json.loads((path / MANIFESTS / f"{step}.json").read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"checkpoint {where} has an unreadable manifest: {error}") from None
    try:
        found = _file_digests(where)
    except OSError as error:
        raise RunError(f"checkpoint {where} is unreadable: {error}") from None
    for name, (size, digest) in manifest.items():
        if name not in found:
            raise RunError(f"checkpoint {where} is incomplete: {name} is missing.")
        if found[name][0] != size:
            raise RunError(
                f"checkpoint {where} is truncated: {name} has {found[name][0]} of its {size} bytes."
            )
        if found[name][1] != digest:
            raise RunError(f"checkpoint {where} is corrupted: {name} does not match its checksum.")


def restore_checkpoint(path: Path, template: Any, step: int | None = None) -> tuple[Any, int, int]:
    """(state shaped like ``template``, step, epoch) from a checkpoint (default: the latest).

    Raises RunError if there is none, or it is unreadable, truncated or does
    not match the template's names, shapes and dtypes.
    """
    step = latest_step(path) if step is None else step
    if step is None:
        raise RunError(f"{path} has no checkpoint.")
    where = path / CHECKPOINTS / str(step)
    verify_checkpoint(path, step)
    ocp = _quiet_orbax()
    expected, treedef = _flatten(template)
    try:
        manager = ocp.CheckpointManager(
            (path / CHECKPOINTS).absolute(),
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        )
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        finally:
            manager.close()
        flat, meta = dict(restored["state"]), dict(restored["meta"])
    except Exception as error:  # orbax/tensorstore raise many kinds
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"checkpoint {where} is unreadable or truncated: {first[:200]}") from None
    if sorted(flat) != sorted(expected):
        missing = sorted(set(expected) - set(flat))[:3]
        extra = sorted(set(flat) - set(expected))[:3]
        raise RunError(
            f"checkpoint {where} does not match the model (missing {missing}, unexpected {extra})."
        )
    leaves = []
    for name, want in expected.items():
        got = np.asarray(flat[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise RunError(
                f"checkpoint {where}: {name} has shape {got.shape} {got.dtype}, "
                f"the model needs {want.shape} {want.dtype}."
            )
        leaves.append(got)
    if meta.get("step") != step or not isinstance(meta.get("epoch"), int):
        raise RunError(f"checkpoint {where} has inconsistent metadata {meta}.")
    return jax.tree_util.tree_unflatten(treedef, leaves), step, meta["epoch"]
