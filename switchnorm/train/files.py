"""Writing files without following symbolic links: the primitives a run directory uses.

A run directory is the user's data and may hold anything a mistake or a hostile file put
there. Every write here:

* creates a new temporary file with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and a unique name
  (:data:`TEMPORARY`), so a symlink planted under any name is never written through;
* renames it over the target with ``os.replace``, which replaces a link planted at the target
  rather than following it, so readers see the old file or the new one, never half of one.

Appending (``metrics.jsonl``) opens with ``O_NOFOLLOW`` and writes each line with one
``write`` call, then ``fsync``. The directory a target lies in is the caller's to vouch for
(:class:`switchnorm.train.rundir.RunDir` reaches it through the descriptor it opened).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

TEMPORARY = re.compile(r"\..+\.[0-9]+\.[0-9a-f]{8}\.tmp")
"""The names :func:`atomic_write` gives its temporary files: a kill can leave one behind."""


class LinkError(OSError):
    """A path switchnorm would write through is a symbolic link."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(target: Path, data: bytes | str) -> None:
    """Replaces ``target`` with ``data`` in one rename; no symlink is followed."""
    if isinstance(data, str):
        data = data.encode()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(target: Path, line: str) -> None:
    """Appends one line (``line`` plus a newline) and syncs it; refuses a symlinked target."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError:
        if target.is_symlink():
            raise LinkError(f"{target.name} is a symbolic link") from None
        raise
    try:
        _write_all(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_text(path: Path) -> str:
    """The text of ``path``, refusing a symlink (so a planted link never feeds a read either)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        return file.read().decode("utf-8", errors="strict")


def make_dir(path: Path) -> None:
    """Creates the directory ``path`` if absent; refuses a symlink or a non-directory there."""
    if path.is_symlink():
        raise LinkError(f"{path.name} is a symbolic link")
    path.mkdir(exist_ok=True)
    if not path.is_dir():
        raise NotADirectoryError(f"{path.name} exists and is not a directory")
