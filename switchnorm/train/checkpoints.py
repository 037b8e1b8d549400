"""A run's checkpoints: orbax step folders that carry a SHA-256 of every array they hold.

orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
once every file is written, so a step folder exists only complete: that atomic commit is the
one switchnorm relies on. The checkpoint's ``meta`` item, written inside the same commit,
records the step, the epoch and a SHA-256 of every array (its dtype, shape and bytes):

* a restored checkpoint is checked against them value by value, so a truncated or altered file
  is caught whatever orbax's file layout;
* a step folder whose ``meta`` does not say it is checkpoint ``<step>`` is not switchnorm's (or
  is damaged): it is never read as a checkpoint nor deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from switchnorm.train import files
from switchnorm.train.config import loads

KEEP = 2
"""Checkpoints kept: the newest two (the clean-up deletes older ones of switchnorm's own)."""

DELETING_SUFFIX = ".switchnorm-deleting"
"""A checkpoint is renamed to its step's name plus this before it is deleted."""

UNFINISHED = ("orbax-checkpoint-tmp", "switchnorm-deleting")
"""What follows ``<step>.`` in the name of a folder a kill left halfway written or deleted."""

_STEP = re.compile(r"0|[1-9][0-9]*")


def orbax() -> Any:
    """``orbax.checkpoint``, imported on first use, its logging quiet (failures reach the user as errors)."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    import orbax.checkpoint as ocp

    return ocp


def step_of(name: str) -> int | None:
    """The step a folder called ``name`` holds, or None if the name is not a step's."""
    return int(name) if _STEP.fullmatch(name) else None


def first_line(error: BaseException) -> str:
    """A short reason: the OS error inside a tensorstore message if there is one, else the first line."""
    text = str(error).strip()
    code = re.search(r"os_error_code='(\d+)'", text)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if code:
        return os.strerror(int(code.group(1)))
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    sha = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def flatten(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
    """(the leaves of ``tree`` as NumPy arrays by dotted path, its treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        flat[name] = np.asarray(leaf)
    return flat, treedef


def read_meta(folder: Path, step: int) -> dict[str, Any]:
    """The ``meta`` of checkpoint folder ``folder``; ValueError saying why it is not checkpoint ``step``."""
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError("is not a directory")
    try:
        meta = loads(files.read_text(folder / "meta" / "metadata"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"has no readable meta/metadata ({first_line(error)})") from None
    if not isinstance(meta, dict):
        raise ValueError("has a meta/metadata that is not a JSON object")
    epoch, digests = meta.get("epoch"), meta.get("sha256")
    if (
        meta.get("step") != step
        or isinstance(epoch, bool)
        or not isinstance(epoch, int)
        or epoch < 0
        or not isinstance(digests, dict)
        or not all(isinstance(d, str) for d in digests.values())
    ):
        raise ValueError(f"has a meta/metadata that does not describe switchnorm's checkpoint {step}")
    return meta


def manager(root: Path) -> Any:
    """An orbax CheckpointManager writing into ``root`` (switchnorm deletes old steps itself)."""
    ocp = orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=False)
    return ocp.CheckpointManager(root, options=options)


def save(checkpoints: Any, step: int, state: Any, epoch: int) -> None:
    """Saves ``state`` (any pytree) as checkpoint ``step`` of ``checkpoints`` (a :func:`manager`)."""
    ocp = orbax()
    flat, _ = flatten(state)
    meta = {"step": step, "epoch": epoch, "sha256": {name: digest(a) for name, a in flat.items()}}
    args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
    checkpoints.save(step, args=args, force=True)
    checkpoints.wait_until_finished()


def _read_arrays(root: Path, step: int) -> dict[str, Any]:
    ocp = orbax()
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(root.absolute(), options=options) as reader:
        restored = reader.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return dict(restored["state"])


def restore(root: Path, step: int, template: Any) -> tuple[Any, int]:
    """(the checkpoint ``step`` under ``root`` shaped like ``template``, its epoch). Reads only.

    ValueError, ending a sentence about the checkpoint, unless every array is there with the
    template's name, shape and dtype and the bytes that were saved.
    """
    meta = read_meta(root / str(step), step)
    expected, treedef = flatten(template)
    try:
        flat = _read_arrays(root, step)
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise ValueError(f"is damaged (unreadable, truncated or altered): {first_line(error)}") from None
    if sorted(flat) != sorted(expected) or sorted(meta["sha256"]) != sorted(expected):
        missing = sorted(set(expected) - set(flat))[:3]
        extra = sorted(set(flat) - set(expected))[:3]
        raise ValueError(f"does not match the model (missing {missing}, unexpected {extra})")
    leaves = []
    for name, want in expected.items():
        got = np.asarray(flat[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"holds {name} of {got.shape} {got.dtype}; the model needs {want.shape} {want.dtype}"
            )
        if digest(got) != meta["sha256"][name]:
            raise ValueError(f"is damaged: {name} does not hold the bytes saved (its SHA-256 differs)")
        leaves.append(got)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta["epoch"]
