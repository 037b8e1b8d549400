"""The ``switchnorm`` command's entry point: a Ctrl-C answered from the first instant.

It lives outside the ``switchnorm`` package because importing any part of that package
first imports JAX and Flax, which takes a second or more; a Ctrl-C then would print
Python's ``KeyboardInterrupt`` traceback. Here the command's own answer (one line, exit
130) is installed before that import; ``switchnorm.train.cli.main`` then takes over.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

EXIT_INTERRUPTED = 130


def _interrupted(signum: int, frame: Any) -> None:
    """SIGINT before the command has started: one line, exit 130, nothing written."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
    os.write(2, b"switchnorm: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``switchnorm`` command: ``switchnorm.train.cli.main``, Ctrl-C handled meanwhile."""
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread: the caller keeps its own handling
        pass
    from switchnorm.train.cli import main as command

    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
