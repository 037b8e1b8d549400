"""Chooses the mutants that ``make mutate`` runs: a deterministic sample of the core's math.

Usage: ``python tests/mutation_sample.py STRIDE FILE...`` prints mutant names, one a line.

mutmut 3 names each mutant ``package.module.x_function__mutmut_N``. Every mutant of
the given files is generated (cheap: source rewriting only), then every STRIDE-th
mutant of each function is kept, in mutmut's own numbering, so the same code gives
the same sample before and after a change to the tests. Functions that only build
error messages (their mutants change wording, which no reference test can see) are
left out: tests/test_errors.py checks the messages' content by pattern instead.
Relies on mutmut's internals (generation without a run), hence the pinned version
in the Makefile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from mutmut.__main__ import (
    copy_also_copy_files,
    copy_src_dir,
    create_mutants,
    set_mutant_under_test,
    setup_source_paths,
)

MESSAGE_ONLY = {"check_input", "validate_normalizers"}


def generate() -> None:
    """mutmut's mutant generation step alone: writes mutants/ and its .meta files."""
    set_mutant_under_test("mutant_generation")
    os.makedirs("mutants", exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(1)


def sample(stride: int, files: list[str]) -> list[str]:
    names = []
    for file in files:
        meta = json.loads(Path("mutants", file + ".meta").read_text())
        by_function: dict[str, list[tuple[int, str]]] = {}
        for name in meta["exit_code_by_key"]:
            function, number = name.rsplit("__mutmut_", 1)
            by_function.setdefault(function, []).append((int(number), name))
        for function, mutants in sorted(by_function.items()):
            if re.sub(r"^.*\.x_", "", function) in MESSAGE_ONLY:
                continue
            names += [name for _, name in sorted(mutants)[::stride]]
    return names


if __name__ == "__main__":
    stride, files = int(sys.argv[1]), sys.argv[2:]
    with contextlib.redirect_stdout(sys.stderr):  # mutmut's progress lines
        generate()
    print("\n".join(sample(stride, files)))
