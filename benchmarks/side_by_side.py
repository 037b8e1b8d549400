"""Two versions of the layer side by side: ``benchmarks.ratios`` run in each tree, processes alternating.

    python -m benchmarks.side_by_side OLD_TREE NEW_TREE                     # 4 rounds, float32
    python -m benchmarks.side_by_side /tmp/main . --rounds 6 --dtypes float32 bfloat16

Each round runs ``python -m benchmarks.ratios --no-memory`` once in each tree (the order
alternating between rounds), with the tree first on ``PYTHONPATH``, so each process times
its own SwitchNorm against Flax's BatchNorm. A ratio taken within one process cancels
most of a shared machine's slow spells; the rounds cancel the rest. Printed per shape,
dtype and column: the median over the rounds of each tree's lower-quartile ratio, and
new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

COLUMNS = ("fwd", "fwd_nnx", "fwdbwd", "fwdbwd_nnx", "inference")


def run_ratios(
    tree: str, shapes: list[str], dtypes: list[str], repeats: int
) -> dict[tuple[str, str], list[float]]:
    """``benchmarks.ratios`` in ``tree``: {(shape, dtype): lower quartiles of the five ratio columns}."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    command = [sys.executable, "-m", "benchmarks.ratios", "--no-memory", "--repeats", str(repeats)]
    command += ["--shapes", *shapes, "--dtypes", *dtypes]
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("measured |"):
            cells = [c.strip() for c in line.split("|")[1:]]
            rows[(cells[0], cells[1])] = [float(c.split("/")[0]) for c in cells[2 : 2 + len(COLUMNS)]]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--shapes", nargs="+", default=["32x32x32x64", "8x56x56x256", "128x8x8x128", "64x256x64", "1024x512"]
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    args = parser.parse_args(argv)
    samples: dict[str, dict] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            for key, values in run_ratios(
                getattr(args, name), args.shapes, args.dtypes, args.repeats
            ).items():
                samples[name].setdefault(key, []).append(values)
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    print(f"medians over {args.rounds} rounds of the lower-quartile ratio to Linen BatchNorm (nnx: to NNX's)")
    print(f"old: {args.old}   new: {args.new}")
    print("| shape | dtype | " + " | ".join(f"{c} old, new, new/old" for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for key in samples["old"]:
        cells = []
        for i in range(len(COLUMNS)):
            old = statistics.median(v[i] for v in samples["old"][key])
            new = statistics.median(v[i] for v in samples["new"][key])
            cells.append(f"{old:.2f}, {new:.2f}, {new / old:.2f}")
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
