"""What a command-line run shows and records while it trains, and when it ends.

* :class:`Reporter`, the loop callback of ``switchnorm train``: progress bar,
  weight tables, one ``metrics.jsonl`` record and one checkpoint per epoch, and
  the divergence check: a non-finite loss (every step) or a non-finite
  parameter, running average or optimizer state (every epoch, before its
  checkpoint is written) stops the run with :class:`Diverged`, so the last
  checkpoint on disk is always a finite one. It also writes the run's
  TensorBoard event files (:mod:`switchnorm.train.tensorboard`), in the
  primary process, and closes them when the run ends (an interrupt exits at once,
  as a kill would: the steps since the last flush are logged again on resume).
* :func:`finish`: figures, ``summary.json`` and the printed result;
  :func:`final_weights`: a restored model's weights as ``inspect`` and ``plot`` show them.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import switchnorm
from switchnorm.train import data, loop, plots
from switchnorm.train.config import TrainConfig
from switchnorm.train.loop import Callback
from switchnorm.train.rundir import DISTRIBUTION_FIGURE, FIGURES, TENSORBOARD, RunDir, RunError
from switchnorm.train.tensorboard import EventLog


class Diverged(Exception):
    """Training produced a non-finite value at ``step``; ``reason`` says which."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason


def learned(weights: dict[str, Any] | None) -> dict[str, Any]:
    """The layers whose weights are learned: those that blend more than one normalizer.

    ``weights`` is :func:`switchnorm.mixing_weights`'s floats or
    :func:`switchnorm.mixing_weight_arrays`'s arrays.
    """

    def size(layer: Any) -> int:
        return len(layer.names) if isinstance(layer, switchnorm.LayerWeightArrays) else len(layer["mean"])

    return {path: layer for path, layer in (weights or {}).items() if size(layer) > 1}


def nonfinite_part(state: Any) -> str | None:
    """The name of the first part of a TrainState holding a NaN or an infinity, or None.

    ``rest`` holds the running averages: NaN in a batch poisons them (as in
    Flax) even when the parameters stay finite.
    """
    parts = {"parameters": state.params, "running averages": state.rest, "optimizer state": state.opt_state}
    for name, tree in parts.items():
        leaves = [
            jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
        ]
        if leaves and not bool(np.asarray(jax.device_get(jnp.stack(leaves).all()))):
            return name
    return None


def _nonfinite_number(record: dict[str, Any]) -> str | None:
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key.replace('_', ' ')} is {value}"
    return None


class Reporter(Callback):
    """The callback of a command-line run: progress bar, tables, metrics, checkpoints, divergence.

    Args:
      run: the (locked) run directory it records into.
      quiet: no per-evaluation weight tables.
      primary: whether this process shows progress (process 0 of a multi-process run).
    """

    def __init__(self, run: RunDir, quiet: bool, primary: bool = True):
        self.run = run
        self.primary = primary
        self.quiet = quiet or not primary
        self.bar: Any = None
        self.events: Any = None  # the TensorBoard writer, from on_train_begin to close

    def on_train_begin(self, trainer, state, epoch):
        from tqdm.auto import tqdm

        if self.primary:
            self.events = EventLog(self.run.tensorboard_dir(), int(state.step), self.run.path / TENSORBOARD)

        self.bar = tqdm(
            total=trainer.total_steps,
            initial=int(state.step),
            unit="step",
            dynamic_ncols=True,
            disable=None if self.primary else True,  # off when stderr is not a terminal
        )

    def on_step(self, trainer, step, loss, accuracy):
        if not math.isfinite(loss):
            raise Diverged(step, f"the training loss is {loss}")
        if self.events is not None:
            self.events.log_step(step, loss, accuracy)
        self.bar.update(1)
        if step % 10 == 0:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)

    def on_epoch_end(self, trainer, state, record):
        bad = nonfinite_part(state)
        if bad:
            raise Diverged(record["step"], f"the {bad} hold NaN or infinite values")
        bad = _nonfinite_number(record)
        if bad:
            raise Diverged(record["step"], bad)
        self.run.append_metrics(record)
        if self.events is not None:
            self.events.log_epoch(record)
        self.run.save_checkpoint(record["step"], state, record["epoch"])
        if "test_accuracy" in record:
            self.bar.set_description(f"test acc {record['test_accuracy']:.4f}")
            if not self.quiet and record["epoch"] != trainer.config.epochs:
                self._show(trainer.config.epochs, record)

    def _show(self, epochs: int, record: dict[str, Any]) -> None:
        self._write(
            f"\nepoch {record['epoch']}/{epochs}  step {record['step']}  "
            f"train loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test acc {record['test_accuracy']:.4f}"
        )
        if learned(record["weights"]):
            self._write(switchnorm.format_mixing_weights(learned(record["weights"])))

    def on_train_end(self, trainer, state, record):
        self.close()

    def close(self) -> None:
        """Closes the progress bar and flushes and closes the event file; safe to call twice.

        Called when the run ends, diverges or stops on an error. A failure to write the event file
        (a full disk) is raised, unless another error is already ending the
        run: that one is the error to report.
        """
        ending_with_error = sys.exc_info()[1] is not None
        events, self.events = self.events, None
        if events is not None:
            try:
                events.close()
            except OSError:
                if not ending_with_error:
                    raise
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stdout)


# -- the end of a run ------------------------------------------------------------------------------


def write_figures(
    run: RunDir, config: TrainConfig, records: list[dict[str, Any]], arrays: dict[str, Any] | None = None
) -> list[Any]:
    """The figures of the run's weights (none when nothing was learned); their paths.

    ``arrays``, :func:`switchnorm.mixing_weight_arrays` of the final model (on the
    test set for per-sample weights), gives the final-weights figure its
    spread over channels or samples, and a ``weights="sample"`` run a third
    figure, :data:`DISTRIBUTION_FIGURE`, of the per-sample weights' distribution.
    """
    if not records or not learned(records[-1].get("weights")):
        return []  # norm=none or a single normalizer: nothing was learned
    name = f"{config.dataset}, {config.model}, norm={config.norm}"
    final = learned(arrays) or records[-1]["weights"]
    figures = {
        FIGURES[0]: lambda path: plots.plot_weights_over_training(
            records, path, f"Mixing weights over training ({name})"
        ),
        FIGURES[1]: lambda path: plots.plot_final_weights(final, path, f"Final mixing weights ({name})"),
        DISTRIBUTION_FIGURE: lambda path: plots.plot_weight_distribution(
            learned(arrays), path, f"Per-sample mixing weights over the test set ({name})"
        ),
    }
    written = []
    for figure, draw in figures.items():
        with run.writing(figure) as path:
            if draw(path) is not None:
                written.append(run.path / figure)
    return written


def final_weights(config: TrainConfig, model: Any) -> dict[str, Any]:
    """The model's weights as inspect and plot show them; per-sample ones read on the test set.

    config.json's "weights" says how the layers blend. "layer":
    :func:`switchnorm.mixing_weights`'s floats, as the training loop records them. "channel" and
    "sample": :func:`switchnorm.mixing_weight_arrays`, whose spread the table and figures
    show; per-sample weights need inputs, so the model (in evaluation mode, as restored) runs
    once on the run's whole test split. RunError if the model's layers cannot be read so.
    """
    layers = [n for _, n in nnx.iter_graph(model) if isinstance(n, switchnorm.SwitchNorm)]
    if config.weights == "layer" and all(n.weights == "layer" for n in layers):
        return loop.model_weights(model)
    batch = None
    if config.weights == "sample" or any(n.weights == "sample" for n in layers):
        batch = jnp.asarray(data.load_dataset(config.dataset, config.seed).x_test)
    try:
        return switchnorm.mixing_weight_arrays(model, batch=batch) or loop.model_weights(model)
    except ValueError as error:
        raise RunError(" ".join(str(error).rstrip(".").split())) from None


def _print_result(run: RunDir, config: TrainConfig, record: dict[str, Any], seconds: float | None) -> None:
    timing = f" in {seconds:.1f} s" if seconds is not None else ""
    print(
        f"\n{config.dataset} {config.model} norm={config.norm}: "
        f"test accuracy {record['test_accuracy']:.4f} after {record['epoch']} epochs{timing}"
    )
    if learned(record.get("weights")):
        print("learned mixing weights (* marks each row's dominant normalizer):")
        print(switchnorm.format_mixing_weights(learned(record["weights"])))
    print(f"run directory: {run.path}")


def finish(run: RunDir, config: TrainConfig, seconds: float | None, previous: dict[str, Any] | None) -> None:
    """Figures, summary and the printed result of a run whose last epoch is done.

    ``seconds`` is None when a finished run is finished again (``--resume``);
    its earlier training time is then kept from ``previous``.
    """
    records, _ = run.read_metrics()
    record = records[-1]
    if run.primary:
        write_figures(run, config, records)
    summary: dict[str, Any] = {
        "status": "complete",
        "test_accuracy": record["test_accuracy"],
        "test_loss": record["test_loss"],
        "epochs": record["epoch"],
        "steps": record["step"],
    }
    if seconds is not None:
        summary["train_seconds"] = round(seconds, 2)
    elif previous and isinstance(previous.get("train_seconds"), int | float):
        summary["train_seconds"] = previous["train_seconds"]
    run.write_summary(summary)
    _print_result(run, config, record, seconds)


def record_divergence(run: RunDir, error: Diverged) -> str:
    """Writes the divergence into ``summary.json`` (for ``inspect``); the one-line message."""
    last = run.latest_step()
    run.write_summary(
        {"status": "diverged", "step": error.step, "reason": error.reason, "last_good_step": last}
    )
    kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was written"
    return f"{error}; {kept}; lower --lr or check the data, then start afresh with --overwrite"
