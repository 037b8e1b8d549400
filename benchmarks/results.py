"""Everything README.md's results table and docs/results.md report, measured again by one command.

    python -m benchmarks.results                          # make results: about an hour on 2 CPU cores
    python -m benchmarks.results --quick --out /tmp/r     # a minutes-long subset (the tests run it)
    python -m benchmarks.results --render docs/results.json   # redraw the pages from recorded numbers

It reruns the project's own harnesses, never a copy of them:

* **accuracy**: ``switchnorm train`` for every dataset, norm (sn, bn, gn, ssn) and seed,
  and ``switchnorm collapse`` of every ssn run; each run's ``summary.json`` gives its test
  accuracy;
* **speed**: :func:`benchmarks.ratios.measure_shape` (``python -m benchmarks.ratios``) on
  every benchmark shape, SwitchNorm over Flax's BatchNorm;
* **compile time**: :func:`benchmarks.resnet_compile.main` (Flax's ResNet-18 train step;
  ``--quick``: one layer through :func:`benchmarks.layer_compile.compile_once`);
* **figures**: the runs' own weight figures, ``examples/sample_weights.py --compare`` and
  the ratio sweeps;
* **small-batch fine-tuning**: ``examples/fine_tune_small_batch.py`` where it exists.

It writes ``OUT/results.json`` (every number, with the command that produced it),
``OUT/results.md`` (rendered from it, with versions and hardware) and ``OUT/figures/``,
and replaces the block between ``<!-- results-table -->`` and ``<!-- /results-table -->``
in ``--readme`` with the summary block of ``results.md``. ``--out`` defaults to ``docs``
(``--quick``: ``build/results-quick``, so a quick run never replaces the recorded page);
``--readme`` defaults to ``README.md`` when ``--out`` is ``docs`` and to none otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results-table -->", "<!-- /results-table -->"
NORMS = ("sn", "bn", "gn", "ssn")
COLUMNS = ("sn", "bn", "gn", "ssn", "collapsed")
HEADINGS = {"collapsed": "ssn collapsed"}
DATASET_NAMES = {"digits": "digits", "mnist1d": "MNIST-1D"}
FINE_TUNE = ROOT / "examples" / "fine_tune_small_batch.py"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run of the driver measures: the full run or the ``--quick`` subset."""

    seeds: tuple[int, ...]
    norms: tuple[str, ...]  # the --norm values trained; the table shows "-" for the others
    datasets: dict[str, tuple[str, ...]]  # dataset -> the train flags beside --dataset/--norm/--seed
    shapes: tuple[str, ...]
    dtypes: tuple[str, ...]
    ratio_flags: tuple[str, ...]  # benchmarks.ratios's timing flags
    compile_module: str
    compile_flags: tuple[str, ...]
    sample_weights: bool  # run examples/sample_weights.py --compare
    sweep: bool  # draw the ratio sweeps
    fine_tune_flags: tuple[str, ...]


FULL = Plan(
    seeds=(0, 1, 2),
    norms=NORMS,
    datasets={"digits": ("--epochs", "30", "--eval-every", "10"), "mnist1d": ()},
    shapes=("32x32x32x64", "8x56x56x256", "128x8x8x128", "64x256x64", "1024x512"),
    dtypes=("float32", "bfloat16"),
    ratio_flags=("--repeats", "21"),
    compile_module="resnet_compile",
    compile_flags=("--repeats", "5", "--eager-repeats", "3"),
    sample_weights=True,
    sweep=True,
    fine_tune_flags=("--seeds", "0", "1", "2", "--fixed-blend"),
)
QUICK = Plan(
    seeds=(0,),
    norms=("sn", "ssn"),
    datasets={"digits": ("--epochs", "1", "--batch-size", "64")},
    shapes=("8x8x8x16",),
    dtypes=("float32",),
    ratio_flags=("--repeats", "3", "--min-sample-ms", "2"),
    compile_module="layer_compile",
    compile_flags=("8x8x8x16",),  # the shape of one compile_once per variant
    sample_weights=False,
    sweep=False,
    fine_tune_flags=("--quick", "--seeds", "0"),
)


def _run(command: list[str], log: Path) -> None:
    """Runs one command from the repository root, its output into ``log``; fails with the log's end."""
    print("$", " ".join(command), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-2000:]}")


def _switchnorm(argv: list[str], log: Path) -> None:
    """``switchnorm ARGV`` in this process (no import per run), its output into ``log``."""
    from switchnorm.train import cli

    print("$ switchnorm", " ".join(argv), flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        status = cli.main(argv)
    if status != 0:
        raise SystemExit(f"switchnorm {' '.join(argv)} failed ({status}):\n{log.read_text()[-2000:]}")


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def measure_accuracy(plan: Plan, runs: Path) -> dict[str, Any]:
    """Test accuracy (%) of every dataset, norm and seed, and of each ssn run collapsed."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    commands = []
    for dataset, flags in plan.datasets.items():
        train_flags = " ".join(("--dataset", dataset, "--norm", "N", *flags, "--seed", "S"))
        commands.append(f"switchnorm train {train_flags} --out runs/{dataset}-N-S --quiet")
        commands.append(f"switchnorm collapse runs/{dataset}-ssn-S --out runs/{dataset}-ssn-S-collapsed")
        per_norm: dict[str, dict[str, float]] = {column: {} for column in COLUMNS}
        for seed in plan.seeds:
            for norm in plan.norms:
                run = runs / f"{dataset}-{norm}-{seed}"
                train = ["train", "--dataset", dataset, "--norm", norm, *flags, "--seed", str(seed)]
                _switchnorm([*train, "--out", str(run), "--quiet", "--overwrite"], runs / f"{run.name}.log")
                per_norm[norm][str(seed)] = round(100 * _summary(run)["test_accuracy"], 2)
            if "ssn" not in plan.norms:
                continue
            collapsed = runs / f"{dataset}-ssn-{seed}-collapsed"
            source = runs / f"{dataset}-ssn-{seed}"
            _switchnorm(
                ["collapse", str(source), "--out", str(collapsed), "--overwrite"], runs / "collapse.log"
            )
            per_norm["collapsed"][str(seed)] = round(100 * _summary(collapsed)["test_accuracy"], 2)
        table[dataset] = per_norm
    return {"seeds": list(plan.seeds), "commands": commands, "runs": table}


def measure_speed(plan: Plan) -> dict[str, Any]:
    """benchmarks.ratios's rows (SwitchNorm over Flax BatchNorm) and its training-step memory."""
    from benchmarks import ratios

    flags = dict(zip(plan.ratio_flags[::2], plan.ratio_flags[1::2], strict=True))
    repeats, min_sample_s = int(flags["--repeats"]), float(flags.get("--min-sample-ms", 20.0)) / 1e3
    rows = [
        ratios.measure_shape(ratios.parse_shape(shape), dtype, repeats, min_sample_s)
        for dtype in plan.dtypes
        for shape in plan.shapes
    ]
    peaks = ratios.train_step_peak_memory() if plan is FULL else {}
    command = (
        f"python -m benchmarks.ratios --shapes {' '.join(plan.shapes)} --dtypes {' '.join(plan.dtypes)} "
    )
    command += " ".join(plan.ratio_flags) + ("" if peaks else " --no-memory")
    return {"command": command, "rows": rows, "peaks": peaks}


def measure_compile(plan: Plan) -> dict[str, Any]:
    """Compile time over BatchNorm's: Flax's ResNet-18 train step (full) or one layer (quick)."""
    if plan.compile_module == "resnet_compile":
        from benchmarks import resnet_compile

        rows = resnet_compile.main(list(plan.compile_flags))
        step = rows["train step: trace + lower + compile"]
        init = rows["eager model.init, first in the process"]
        model = "Flax's ResNet-18 train step (Linen, batch 8 of 64x64x3)"
        result = {"sn_s": step["switchnorm"], "bn_s": step["batchnorm"]}
        result["eager_init_ratio"] = init["switchnorm"] / init["batchnorm"]
    else:  # --quick: one fresh compile of one layer's forward + backward, benchmarks.layer_compile's own
        import jax

        from benchmarks import layer_compile

        shape = layer_compile.parse_shape(plan.compile_flags[0])
        x = jax.random.normal(jax.random.key(0), shape)
        sn, bn = (layer_compile.compile_once(v, "fwdbwd", x, x)[0] for v in ("sn", "bn"))
        model = f"one layer's forward + backward ({plan.compile_flags[0]})"
        command = f"benchmarks.layer_compile.compile_once(variant, 'fwdbwd', x, x), x {plan.compile_flags[0]}"
        return {"command": command, "model": model, "sn_s": sn, "bn_s": bn, "ratio": sn / bn}
    command = f"python -m benchmarks.{plan.compile_module} {' '.join(plan.compile_flags)}"
    return {"command": command, "model": model, **result, "ratio": result["sn_s"] / result["bn_s"]}


def draw_figures(plan: Plan, runs: Path, figures: Path) -> list[dict[str, str]]:
    """The figures the README and the docs show, each with the command that draws it."""
    figures.mkdir(parents=True, exist_ok=True)
    drawn = []
    copies = [
        ("digits-ssn-0", "weights_over_training.png", "ssn_weights.png", "switchnorm plot runs/digits-ssn-0")
    ]
    if "mnist1d" in plan.datasets:
        for name in ("weights_over_training", "final_weights"):
            copies.append(
                ("mnist1d-sn-0", f"{name}.png", f"mnist1d_sn_{name}.png", "switchnorm plot runs/mnist1d-sn-0")
            )
    for run, source, target, command in copies:
        shutil.copyfile(runs / run / source, figures / target)
        drawn.append({"path": f"figures/{target}", "command": f"{command} (its {source})"})
    if plan.sample_weights:
        out = figures / "sample_weights.png"
        _run(
            [sys.executable, "examples/sample_weights.py", "--compare", "--out", str(out)],
            runs / "sample_weights.log",
        )
        drawn.append(
            {"path": "figures/sample_weights.png", "command": "python examples/sample_weights.py --compare"}
        )
    if plan.sweep:
        from benchmarks import ratios

        flags = dict(zip(plan.ratio_flags[::2], plan.ratio_flags[1::2], strict=True))
        for path in ratios.sweep(str(figures), "float32", int(flags["--repeats"]), 0.02):
            command = "python -m benchmarks.ratios --sweep " + " ".join(plan.ratio_flags)
            drawn.append({"path": f"figures/{Path(path).name}", "command": command})
    return drawn


def measure_fine_tune(plan: Plan, runs: Path) -> dict[str, Any] | None:
    """``examples/fine_tune_small_batch.py``'s JSON, or None where the example does not exist."""
    if not FINE_TUNE.exists():
        return None
    out = runs / "fine_tune"
    _run([sys.executable, str(FINE_TUNE), *plan.fine_tune_flags, "--out", str(out)], runs / "fine_tune.log")
    command = f"python examples/fine_tune_small_batch.py {' '.join(plan.fine_tune_flags)} --out DIR"
    data = json.loads((out / "fine_tune.json").read_text())
    return {
        "command": command,
        "report": (out / "fine_tune.md").read_text(),
        "comparison": data["comparison"],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str) -> dict[str, Any]:
    """Versions, hardware, date and commit of this run."""
    import flax
    import jax
    import numpy
    import optax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "command": command,
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "commit": commit.stdout.strip() or "unknown",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "hardware": f"{_cpu_model()}, {os.cpu_count()} CPUs"
        + ("" if jax.default_backend() == "cpu" else f", {jax.devices()[0].device_kind}"),
    }


# Rendering: results.json -> results.md and the README block. A page drawn from recorded numbers
# and one drawn from a fresh run go through the same functions, so they read the same.


def _mean(values: dict[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fine_tune_rows(fine_tune: dict[str, Any] | None) -> list[str]:
    """The fine-tuning comparison as README table rows: test accuracy by method, per batch size."""
    if not fine_tune:
        return []
    by_batch = fine_tune["comparison"]
    methods = list(next(iter(by_batch.values()))["mean"])
    names = {"bn": "BatchNorm", "gn": "GroupNorm"}  # the converted model's is its method, "sn(W)"
    heading = "fine-tuning a trained BatchNorm network, shifted MNIST-1D, test accuracy %"
    columns = [names.get(m, f"converted, {m}") for m in methods]
    lines = ["", f"| {heading} | " + " | ".join(columns) + " |", "|---|" + "--:|" * len(methods)]
    for batch, row in by_batch.items():
        lines.append(
            f"| batch {batch} | " + " | ".join(f"{100 * row['mean'][m]:.1f}" for m in methods) + " |"
        )
    return lines


def summary_block(results: dict[str, Any]) -> str:
    """The README's results block: accuracy, speed and compile ratios, the hardware line."""
    accuracy, speed, compiled = results["accuracy"], results["speed"], results["compile"]
    seeds = accuracy["seeds"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {seeds[0]}-{seeds[-1]}"
    lines = [
        BEGIN,
        f"| test accuracy %, {seed_text} | " + " | ".join(HEADINGS.get(c, c) for c in COLUMNS) + " |",
        "|---|" + "--:|" * len(COLUMNS),
    ]
    for dataset, per_norm in accuracy["runs"].items():
        cells = [_cell(_mean(per_norm.get(column, {}))) for column in COLUMNS]
        lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| time, SwitchNorm / Flax BatchNorm (float32) | forward | forward + backward | inference |",
        "|---|--:|--:|--:|",
    ]
    for row in speed["rows"]:
        if row["dtype"] == "float32":
            q1 = [row[key]["q1"] for key in ("fwd/linen", "fwdbwd/linen", "infer/linen")]
            lines.append(f"| {row['shape']} | " + " | ".join(f"{v:.2f}" for v in q1) + " |")
    lines += _fine_tune_rows(results.get("fine_tune"))
    lines += [
        "",
        f"Compile time of {compiled['model']}: {compiled['ratio']:.2f}x BatchNorm's.",
        f"Time: lower quartiles of interleaved ratios. {results['provenance']['hardware']}, "
        f"jax {results['provenance']['jax']}, flax {results['provenance']['flax']}. "
        "Commands and per-seed numbers: docs/results.md.",
        END,
    ]
    return "\n".join(lines)


def parse_tables(block: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table in ``block`` as {first cell: {column heading: cell}}."""
    tables, current, headings = [], None, []
    for line in block.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current, headings = {}, cells
            tables.append(current)
        elif not re.fullmatch(r"[-:| ]+", line):
            current[cells[0]] = dict(zip(headings[1:], cells[1:], strict=True))
    return tables


def readme_block(results_md: str) -> str:
    """The block between the markers of a rendered results.md, markers included."""
    start, end = results_md.index(BEGIN), results_md.index(END) + len(END)
    return results_md[start:end]


def redraw_readme(readme: Path, results_md: str) -> None:
    """Replaces README's results block (markers included) with results.md's."""
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + readme_block(results_md) + text[end:])


def _recorded(entry: dict[str, Any]) -> str:
    """ " (when and where)" of a number recorded before this run, for the pages drawn by --render."""
    return f" ({entry['recorded']})" if entry.get("recorded") else ""


def _fine_tune_section(fine_tune: dict[str, Any]) -> list[str]:
    """The example's own report (its table, the comparison, the learned weights) under its command."""
    lines = ["## Small-batch fine-tuning", "", f"`{fine_tune['command']}`{_recorded(fine_tune)}", ""]
    return lines + [fine_tune["report"].rstrip("\n"), ""]


def render(results: dict[str, Any]) -> str:
    """docs/results.md from results.json."""
    from benchmarks import ratios

    prov, accuracy, speed, compiled = (results[k] for k in ("provenance", "accuracy", "speed", "compile"))
    lines = [
        "# Results",
        "",
        f"Generated by `{prov['command']}` from `results.json` beside it; `make results` measures",
        "everything again and rewrites this page and the table in README.md. Do not edit by hand.",
    ]
    if results.get("note"):
        lines += ["", results["note"]]
    lines += ["", "## Summary", "", summary_block(results), "", "## Test accuracy", ""]
    lines += ["```", *accuracy["commands"], "```", ""]
    if accuracy.get("sources"):
        lines += [f"- {source}" for source in accuracy["sources"]] + [""]
    seeds = [str(s) for s in accuracy["seeds"]]
    lines += [
        "| dataset | norm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|---|" + "--:|" * (len(seeds) + 1),
    ]
    for dataset, per_norm in accuracy["runs"].items():
        for column in COLUMNS:
            values = per_norm.get(column, {})
            cells = [_cell(values.get(s)) for s in seeds] + [_cell(_mean(values))]
            name = f"{DATASET_NAMES.get(dataset, dataset)} | {HEADINGS.get(column, column)}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy in %, the last epoch's; the seed sets initialization and data order.", ""]
    lines += ["## Speed against Flax's BatchNorm", "", f"`{speed['command']}`{_recorded(speed)}", ""]
    lines += [ratios.table(speed["rows"], speed.get("peaks") or {}), ""]
    lines += [
        "## Compile time",
        "",
        f"`{compiled['command']}`{_recorded(compiled)}: {compiled['model']}, trace + lower + compile, medians: "
        f"SwitchNorm {compiled['sn_s']:.3f} s, BatchNorm {compiled['bn_s']:.3f} s, "
        f"**{compiled['ratio']:.2f}x**.",
    ]
    if "eager_init_ratio" in compiled:
        lines.append(f"Un-jitted `model.init`, first call in a process: {compiled['eager_init_ratio']:.2f}x.")
    lines.append("")
    if results.get("fine_tune"):
        lines += _fine_tune_section(results["fine_tune"])
    if results.get("figures"):
        lines += ["## Figures", ""]
        lines += [f"- [{f['path']}]({f['path']}): `{f['command']}`{_recorded(f)}" for f in results["figures"]]
        lines.append("")
    lines += ["## Versions and hardware", ""]
    lines += [
        f"- {key}: {prov[key]}" for key in ("date", "commit", "python", "jax", "flax", "optax", "numpy")
    ]
    lines += [f"- hardware: {prov['hardware']}", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path, readme: Path | None) -> str:
    """results.json and results.md into ``out``; README's block redrawn; returns results.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    page = render(results)
    (out / "results.md").write_text(page)
    if readme is not None:
        redraw_readme(readme, page)
    return page


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a minutes-long subset (digits sn and ssn, 1 seed, 1 epoch; 1 shape)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where results.md/.json and figures/ go (default docs; --quick: build/results-quick)",
    )
    parser.add_argument("--readme", type=Path, default=None, help="the README whose results block to redraw")
    parser.add_argument("--runs", type=Path, default=None, help="training runs' folder (default OUT/runs)")
    parser.add_argument(
        "--render", type=Path, default=None, help="only redraw the pages from this results.json"
    )
    parser.add_argument(
        "--no-fine-tune", dest="fine_tune", action="store_false", help="skip the fine-tuning example"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "build" / "results-quick" if args.quick else ROOT / "docs"
    readme = args.readme
    if readme is None and args.out.resolve() == (ROOT / "docs").resolve():
        readme = ROOT / "README.md"
    if args.render is not None:
        results = json.loads(args.render.read_text())
        write(results, args.out, readme)
        return results
    from benchmarks.heap import keep_freed_memory

    keep_freed_memory()  # before JAX's first computation, as benchmarks.ratios does
    plan = QUICK if args.quick else FULL
    default_runs = ROOT / "runs" / "results" if readme == ROOT / "README.md" else args.out / "runs"
    runs = args.runs or default_runs
    runs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    command = "python -m benchmarks.results" + (" --quick" if args.quick else "")
    results: dict[str, Any] = {"provenance": provenance(command)}
    steps = {
        "accuracy": lambda: measure_accuracy(plan, runs),
        "speed": lambda: measure_speed(plan),
        "compile": lambda: measure_compile(plan),
        "figures": lambda: draw_figures(plan, runs, args.out / "figures"),
        "fine_tune": lambda: measure_fine_tune(plan, runs) if args.fine_tune else None,
    }
    for name, step in steps.items():
        results[name] = step()
        print(f"{name}: done at {time.perf_counter() - start:.1f} s", flush=True)
    results["provenance"]["seconds"] = round(time.perf_counter() - start, 1)
    write(results, args.out, readme)
    print(f"wrote {args.out / 'results.md'} in {results['provenance']['seconds']} s")
    return results


if __name__ == "__main__":
    main()
