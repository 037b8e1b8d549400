"""The file primitives of a run directory: writes that follow no symbolic link, and the lock.

A run directory is the user's data and may hold anything a mistake or a hostile file put
there. Every write here:

* creates a new temporary file with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and a unique name
  (:data:`TEMPORARY`), so a symlink planted under any name is never written through;
* renames it over the target with ``os.replace``, which replaces a link planted at the target
  rather than following it, so readers see the old file or the new one, never half of one.

Appending (``metrics.jsonl``) opens with ``O_NOFOLLOW`` and writes each line with one
``write`` call, then ``fsync``. The directory a target lies in is the caller's to vouch for
(:class:`switchnorm.train.rundir.RunDir` reaches it through the descriptor it opened).

One writer per run directory: an exclusive ``flock`` on ``.lock`` (:func:`lock`), opened relative
to the directory the writer opened, with ``O_NOFOLLOW``; the holder writes its pid into it so that
a second writer can name it. The kernel releases the lock when the holder dies, however it dies,
so a run killed with SIGKILL leaves no stale lock. Readers never take it; :func:`lock_holder`
tells them whether a writer is at work, without writing anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import time
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
LOCK = ".lock"
_TRIES = 3

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


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is the one it wrote (None if unreadable)."""

    def __init__(self, directory: Path, pid: int | None):
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{directory} is in use by {who} (another switchnorm command writing to it); "
            "wait for it to finish or stop it, then try again"
        )
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _open_lock(directory: Path, flags: int, dir_fd: int | None = None) -> int:
    path = LOCK if dir_fd is not None else directory / LOCK
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP,
                f"{directory / LOCK} is a symbolic link; switchnorm never follows links inside a run directory",
            ) from None
        raise


def lock(dir_fd: int, directory: Path) -> int:
    """Locks ``.lock`` in the opened directory ``dir_fd`` (``directory`` names it in messages).

    Returns the lock's descriptor (closing it releases the lock) or raises :class:`LockHeld`
    at once: never waits, but for a reader's brief shared lock (:func:`lock_holder`).
    """
    fd = _open_lock(directory, os.O_RDWR | os.O_CREAT, dir_fd)
    for attempt in range(_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt + 1 < _TRIES:
                time.sleep(0.05)
                continue
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(directory, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(directory: Path) -> int | None:
    """The pid of the process writing to ``directory`` (0 if unknown), or None if none is.

    Writes nothing: a shared, non-blocking lock attempt on the existing lock file.
    """
    path = directory / LOCK
    if not path.is_file() or path.is_symlink():
        return None
    try:
        fd = _open_lock(directory, os.O_RDONLY)
    except FileNotFoundError:  # gone since: no writer
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)
    return None
