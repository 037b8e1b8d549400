"""One writer per run directory: an exclusive ``flock`` on a lock file inside it.

The lock file (``.lock``) is opened relative to the directory the writer opened, with
``O_NOFOLLOW`` (a planted symlink is refused, never followed), and locked with
``fcntl.flock(LOCK_EX | LOCK_NB)``; the holder writes its pid into it so that a second writer
can name it. The kernel releases the lock when the holding process dies, however it dies, so a
run killed with SIGKILL leaves no stale lock: the next ``--resume`` simply takes it.

Readers (``inspect``, ``plot``) never take it; :func:`holder` tells them whether a writer is at
work, without writing anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

LOCK = ".lock"
_TRIES = 3
_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


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


def _open(directory: Path, flags: int, dir_fd: int | None = None) -> int:
    path = LOCK if dir_fd is not None else directory / LOCK
    try:
        return os.open(path, flags | _FLAGS, 0o644, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP,
                f"{directory / LOCK} is a symbolic link; switchnorm never follows links inside a run directory",
            ) from None
        raise


def acquire(dir_fd: int, directory: Path) -> int:
    """Locks ``.lock`` in the opened directory ``dir_fd`` (``directory`` names it in messages).

    Returns the lock's descriptor (closing it releases the lock) or raises :class:`LockHeld`
    at once: never waits, but for a reader's brief shared lock (:func:`holder`).
    """
    fd = _open(directory, os.O_RDWR | os.O_CREAT, dir_fd)
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


def holder(directory: Path) -> int | None:
    """The pid of the process writing to ``directory`` (0 if unknown), or None if none is.

    Writes nothing: a shared, non-blocking lock attempt on the existing lock file.
    """
    path = directory / LOCK
    if not path.is_file() or path.is_symlink():
        return None
    try:
        fd = _open(directory, os.O_RDONLY)
    except FileNotFoundError:  # gone since: no writer
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)
    return None
