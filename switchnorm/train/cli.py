"""The ``switchnorm`` command: train, inspect, plot and collapse runs.

::

    switchnorm train --dataset mnist1d --norm sn --epochs 30 --batch-size 64 --out runs/sn64
    switchnorm train --out runs/sn64 --resume      # continue a run from its latest checkpoint
    switchnorm inspect runs/sn64                    # the learned weights, from the checkpoint
    switchnorm plot runs/sn64                       # write the figures again
    switchnorm collapse runs/ssn --out runs/ssn-collapsed   # layers that chose compute only their choice
    python -m switchnorm ...                        # the same command

Exit status: 0 done; 2 bad input (an unknown name, an out-of-range number, a run directory that
is missing, taken, in use, damaged or replaced, a full disk), reported as one line
``switchnorm: error: ...`` with no file changed; 3 the training diverged (the last good
checkpoint is kept); 130 interrupted, at any moment, with one line.

This module parses and reports; :mod:`switchnorm.train.command` trains and collapses, and the
two reading commands, ``inspect`` and ``plot``, are the short functions below.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import switchnorm
from switchnorm.train import command, report
from switchnorm.train.command import UsageError
from switchnorm.train.config import DATASET, TrainConfig
from switchnorm.train.files import LockHeld
from switchnorm.train.rundir import RunDir, RunError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_DEVICES = 4096

_restore_model = command.restore_model  # (config, model, step, epoch) of a run's latest checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)


def _number(convert, what: str, accept=lambda v: True):
    """An argparse type: ``convert(text)``, refused unless it parses and ``accept(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _path(text: str) -> Path:
    """A path argument; refused unless it is valid UTF-8 (orbax, JSON and the terminal need it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid UTF-8; rename it or choose another"
        ) from None
    return Path(text)


_int = _number(int, "an integer")
_float = _number(float, "a number")
_devices = _number(int, f"an integer from 1 to {MAX_DEVICES}", lambda v: 1 <= v <= MAX_DEVICES)
_min_weight = _number(float, "a number in (0.5, 1]", lambda v: 0.5 < v <= 1)

_RUN_FLAGS: dict[str, dict[str, Any]] = {  # flags that set a TrainConfig field; absent unless given
    "--dataset": {"help": "digits, mnist1d (default) or synthetic"},
    "--model": {"help": "resnet2d, resnet1d or mlp (default: the dataset's)"},
    "--norm": {"help": "sn (default), ssn (Sparse SN: ends one-hot), bn, in, ln, gn or none"},
    "--weights": {"help": "how finely sn and ssn layers blend: layer (default), channel or sample"},
    "--epochs": {"type": _int, "help": "default: 20 mnist1d, 30 digits, 10 synthetic"},
    "--batch-size": {"type": _int, "help": "default: 64 mnist1d, 32 otherwise"},
    "--optimizer": {"help": "adamw (default) or sgd (Nesterov momentum)"},
    "--lr": {"dest": "learning_rate", "type": _float, "help": "peak learning rate (default 3e-3)"},
    "--momentum": {"type": _float, "help": "SGD momentum / AdamW b1, in [0, 1) (default 0.9)"},
    "--weight-decay": {"type": _float, "help": "in [0, 1] (default 1e-2); never on the mixing logits"},
    "--warmup-epochs": {"type": _float, "help": "linear warmup, then cosine (default 1)"},
    "--eval-every": {"type": _int, "help": "epochs between evaluations and weight tables (default 5)"},
    "--seed": {"type": _int, "help": "initialization and data order, 0 .. 2**32-1 (default 0)"},
    "--dtype": {"help": "activation dtype: float32 (default) or bfloat16 (parameters stay float32)"},
    "--mixing-lr-scale": {"type": _float, "help": "mixing logits' lr over the others' (default 1)"},
    "--mixing-clip": {"type": _float, "help": "clip the mixing logits' gradient to this global norm"},
    "--recalibrate": {"type": _int, "help": "recompute bn running averages over N batches at the end"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="switchnorm",
        description="Train models with Switchable Normalization and inspect the weights they learn.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    train = commands.add_parser("train", help="train a model and report its learned weights")
    for name, settings in _RUN_FLAGS.items():
        train.add_argument(name, default=argparse.SUPPRESS, **settings)
    add = train.add_argument
    add("--out", type=_path, default=None, help="run directory (default runs/<dataset>-<norm>)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--overwrite", action="store_true", help="delete the switchnorm run in --out and start afresh")
    add("--quiet", action="store_true", help="no per-evaluation weight tables")
    # Scaling out (switchnorm.train.distributed, docs/scaling.md); not part of a run's config.
    add("--devices", type=_devices, default=None, help="local devices per process to shard each batch over")
    add("--coordinator-address", default=None, help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    add("--num-processes", type=_int, default=None, help="processes of the run (or JAX_NUM_PROCESSES)")
    add("--process-id", type=_int, default=None, help="this process's rank, 0 .. N-1 (or JAX_PROCESS_ID)")
    for name, text in (("inspect", "print a run's learned weights from its latest checkpoint"),
                       ("plot", "write a run's figures from its metrics.jsonl")):  # fmt: skip
        commands.add_parser(name, help=text).add_argument("run", type=_path)
    collapse = commands.add_parser(
        "collapse", help="write a copy of a finished run whose layers compute only the normalizers they chose"
    )
    collapse.add_argument("run", type=_path)
    collapse.add_argument("--out", type=_path, required=True, help="the new run directory")
    text = "collapse a layer whose mean and var each give one normalizer this weight, in (0.5, 1] (0.99)"
    collapse.add_argument("--min-weight", type=_min_weight, default=None, help=text)
    collapse.add_argument("--overwrite", action="store_true", help="replace the switchnorm run in --out")
    return parser


# -- train, collapse ------------------------------------------------------------------------------

_RUN_SETTINGS = {settings.get("dest", name[2:].replace("-", "_")) for name, settings in _RUN_FLAGS.items()}


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out, the run directory to continue")
    options = {k: v for k, v in vars(args).items() if k in _RUN_SETTINGS}
    default = Path("runs") / f"{options.get('dataset', DATASET)}-{options.get('norm', TrainConfig.norm)}"
    _interrupt_note(args.out or default)
    return command.train(options, args.out or default, args)


def cmd_collapse(args: argparse.Namespace) -> int:
    return command.collapse(args.run, args.out, args.min_weight, args.overwrite)


# -- inspect, plot --------------------------------------------------------------------------------


def _status_line(run: RunDir, summary: dict[str, Any] | None) -> str | None:
    """What a reader must know beyond the checkpoint: a writer at work, or a divergence."""
    pid = run.writer()
    if pid is not None:
        who = f"process {pid}" if pid else "another process"
        return f"in progress: {who} is writing this run; what follows is its latest checkpoint, not a final result"
    if summary and summary.get("status") == "diverged":
        return (
            f"DIVERGED at step {summary.get('step')}: {summary.get('reason')}; "
            f"what follows is the last good checkpoint (step {summary.get('last_good_step')})"
        )
    return None


def _collapsed_lines(collapsed: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    """What ``inspect`` says of a run made by ``switchnorm collapse``: its layers' choices."""
    lines = [f"collapsed from {summary.get('collapsed_from', '?')}: each layer computes only its choice"]
    before, after = summary.get("test_accuracy_before"), summary.get("test_accuracy")
    if isinstance(before, float) and isinstance(after, float):
        lines.append(f"test accuracy before the collapse {before:.4f}, after {after:.4f}")
    for path, choice in collapsed.items():
        form = "x * a + b (folded bn)" if choice["affine"] else f"mean {choice['mean']}, var {choice['var']}"
        lines.append(f"  {path}: {form}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    config = run.read_config()
    records, _ = run.read_metrics()
    summary = run.read_summary()
    status = _status_line(run, summary)
    if status and run.latest_step() is None:
        print(f"{args.run}: {config.dataset} {config.model} norm={config.norm}, no checkpoint")
        print(status)
        return 0
    config, model, step, epoch = _restore_model(args.run)
    print(
        f"{args.run}: {config.dataset} {config.model} norm={config.norm}, "
        f"checkpoint at epoch {epoch}/{config.epochs} (step {step})"
    )
    if status:
        print(status)
    evals = [r for r in records if isinstance(r.get("test_accuracy"), float) and r["step"] <= step]
    if evals:
        print(f"test accuracy {evals[-1]['test_accuracy']:.4f} (epoch {evals[-1]['epoch']})")
    weights = report.learned(report.final_weights(config, model))
    if weights:
        print(switchnorm.format_mixing_weights(weights))
        if any(getattr(layer, "weights", "layer") != "layer" for layer in weights.values()):
            print("mean±std: over each layer's channels (weights='channel') or test examples ('sample')")
    elif not config.collapsed:
        print(f"norm={config.norm}: the model has no learned mixing weights.")
    if config.collapsed:
        print(_collapsed_lines(config.collapsed, summary or {}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    config = run.read_config()
    records, _ = run.read_metrics()
    if not records:
        raise UsageError(f"{args.run} has no metrics to plot yet")
    links = [name for name in run.links() if name.endswith(".png")]
    if links:
        raise UsageError(f"{args.run / links[0]} is a symbolic link; switchnorm never writes through links")
    arrays = None
    if config.weights != "layer" and run.latest_step() is not None:
        arrays = report.final_weights(*_restore_model(args.run)[:2])
    with run:
        run.open(locked=False)  # each figure is one atomic rename: no lock needed
        written = report.write_figures(run, config, records, arrays)
    if not written:
        print(f"{args.run}: norm={config.norm} learns no mixing weights; no figures.")
    for path in written:
        print(path)
    return 0


# -- main -----------------------------------------------------------------------------------------

_INTERRUPTED = ["switchnorm: interrupted"]


def _interrupt_note(out: Path) -> None:
    """From now on an interrupt points to ``--resume`` once ``out`` holds a run."""
    _INTERRUPTED.append(str(out / "config.json"))


def _interrupted(signum: int, frame: Any) -> None:
    """SIGINT: one line and exit 130 at once, whatever the program is doing.

    Without unwinding: a KeyboardInterrupt raised inside XLA's compilation or orbax's writes
    left threads running into a segfault or a redirected stderr, or was swallowed by a
    garbage-collection callback. The run directory is safe to stop at any point (a SIGKILL
    is), and ``--resume`` finishes what was cut short.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
    message = _INTERRUPTED[0]
    if len(_INTERRUPTED) > 1 and os.path.isfile(_INTERRUPTED[-1]):
        message += "; continue with --resume"
    try:
        sys.stdout.flush()
    except Exception:  # a closed pipe: nothing more to say there
        pass
    os.write(2, (message + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def _quiet_closed_loop(report_unraisable: Any) -> Any:
    """``report_unraisable``, but for tensorstore's threads calling into orbax's closed event loop.

    They do after any failed checkpoint read or write (a damaged file, a full disk), once the
    one-line error is already out; their tracebacks are not the user's to read.
    """

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            report_unraisable(unraisable)

    hook.quiet_closed_loop = True  # type: ignore[attr-defined]
    return hook


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"cannot write or read {error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``switchnorm`` command; returns the exit status."""
    try:
        previous = signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread: the caller keeps its own handling
        previous = None
    del _INTERRUPTED[1:]
    if not getattr(sys.unraisablehook, "quiet_closed_loop", False):  # kept: the threads outlive main
        sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    try:
        args = build_parser().parse_args(argv)
        commands = {"train": cmd_train, "inspect": cmd_inspect, "plot": cmd_plot, "collapse": cmd_collapse}
        return commands[args.command](args)
    except BrokenPipeError:  # e.g. `switchnorm inspect run | head`
        sys.stderr.close()
        return 0
    except (UsageError, LockHeld, RunError, OSError) as error:
        print(f"switchnorm: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
