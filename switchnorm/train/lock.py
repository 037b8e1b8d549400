"""One writer per run directory: an exclusive ``flock`` on a lock file inside it.

The lock file (``.lock``) is opened with ``O_NOFOLLOW`` (a planted symlink is
refused, never followed) and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``; the
holder writes its pid into it so that a second writer can name it. The kernel
releases the lock when the holding process dies, however it dies, so a run
killed with SIGKILL leaves no stale lock: the next ``--resume`` simply takes it.

Readers (``inspect``, ``plot``) never take it; :func:`holder` tells them whether
a writer is at work, without writing anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

_TRIES = 3
_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class LockHeld(Exception):
    """Another process holds the lock; ``pid`` is the one it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            f"{path.parent} is in use by {who} (another switchnorm command writing to it); "
            "wait for it to finish or stop it, then try again"
        )
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | _FLAGS, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or path.is_symlink():
            raise OSError(
                errno.ELOOP,
                f"{path} is a symbolic link; switchnorm never follows links inside a run directory",
            ) from None
        raise


class RunLock:
    """The exclusive lock of one run directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`LockHeld` at once (never waits)."""
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        for attempt in range(_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < _TRIES:  # a reader's brief shared lock (holder()) passes soon
                    time.sleep(0.05)
                    continue
                pid = _read_pid(fd)
                os.close(fd)
                raise LockHeld(self.path, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (the file stays: removing it would let two writers lock two files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder(directory: Path) -> int | None:
    """The pid of the process writing to ``directory`` (0 if unknown), or None if none is.

    Writes nothing: a shared, non-blocking lock attempt on the existing lock file.
    """
    path = directory / ".lock"
    if not path.is_file() or path.is_symlink():
        return None
    fd = _open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)
    return None
