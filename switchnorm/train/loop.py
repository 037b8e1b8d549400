"""A reusable training loop for NNX models: jitted steps, eval in eval mode, hooks.

The loop splits the model once into a static graph and pure pytrees
(parameters, other state such as running averages, optimizer state) and jits
two pure module-level functions once: :func:`train_step` and :func:`eval_step`,
with the graph and the optimizer bound. On several devices the same functions
run under a sharding plan (:class:`ShardingPlan`,
:class:`switchnorm.train.distributed.DataParallel`) that only decides where
their inputs and outputs live. Everything it
needs to continue arrives in a :class:`TrainState`, so a checkpoint of that
state plus the epoch number resumes a run exactly: the data order is a
function of (seed, epoch) alone (:func:`switchnorm.train.data.epoch_order`).

Linen models train through the same loop with :class:`LinenAdapter`.

Example::

    >>> from flax import nnx
    >>> from switchnorm.train import Trainer, TrainConfig, load_dataset, build_model
    >>> data = load_dataset("synthetic")
    >>> model = build_model("mlp", data.input_shape, data.num_classes, norm="sn")
    >>> trainer = Trainer(model, TrainConfig(epochs=2, batch_size=64), data)
    >>> result = trainer.fit()                                    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import switchnorm
from switchnorm.train import data as data_lib
from switchnorm.train import optim
from switchnorm.train.config import TrainConfig


class TrainState(NamedTuple):
    """Everything that changes during training, as pytrees of arrays.

    ``params`` and ``rest`` are the two halves of ``nnx.split(model, nnx.Param, ...)``;
    ``rest`` holds the running averages.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any


class Callback:
    """Hooks the loop calls; override any of them. ``model`` carries the current state."""

    def on_train_begin(self, trainer: Trainer, state: TrainState, epoch: int) -> None:
        """Before the first step (``epoch`` > 0 when resuming)."""

    def on_step(self, trainer: Trainer, step: int, loss: float, accuracy: float) -> None:
        """After every training step, with that batch's loss and accuracy."""

    def on_epoch_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        """After every epoch. ``record`` has epoch, step, train_loss,
        train_accuracy, weights and, after an evaluation, test_loss and
        test_accuracy."""

    def on_train_end(self, trainer: Trainer, state: TrainState, record: dict[str, Any]) -> None:
        """After the last epoch, with its record."""


WEIGHTS_BATCH = 256
"""Test examples (the first ones) the loop summarises each epoch's mixing weights on."""


class WeightHistory(Callback):
    """Records every SwitchNorm layer's mixing weights: one call per point.

    In this loop, pass it as a callback (one point per epoch; the loop's records
    use :attr:`Trainer.weights_batch`). In your own loop, call
    ``history.record(step, model, batch)`` whenever you like; ``batch`` (model
    inputs) is needed only by ``weights="sample"`` layers, whose weights are
    reported as their mean over it. Keep it fixed, so the points compare.

    Attributes:
      steps: the steps recorded.
      weights: for each step, ``switchnorm.mixing_weights(model, batch=batch)``.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[dict[str, Any]] = []

    def record(self, step: int, model: Any, batch: Any = None) -> dict[str, Any]:
        """Appends ``mixing_weights(model, batch=batch)`` at ``step`` and returns it."""
        weights = model_weights(model, batch)
        self.steps.append(int(step))
        self.weights.append(weights)
        return weights

    def on_epoch_end(self, trainer, state, record):
        self.steps.append(record["step"])
        self.weights.append(record["weights"])

    def series(self, layer: str, kind: str, normalizer: str) -> np.ndarray:
        """One weight over the recorded steps."""
        return np.array([w[layer][kind][normalizer] for w in self.weights])


def model_weights(model: nnx.Module, batch: Any = None) -> dict[str, Any]:
    """``switchnorm.mixing_weights`` of an NNX model, also through :class:`LinenAdapter`.

    NNX SwitchNorm layers are found as modules; a ``weights="channel"`` layer is
    reported as its mean over the channels, a ``weights="sample"`` one as its mean
    over ``batch`` (model inputs; required for such a layer), which runs through a
    copy of the model. Linen layers inside a :class:`LinenAdapter` are found in its
    parameter tree (paths ``inner/...``); those of another NNX module holding Linen
    parameters too, except ``"sample"`` ones, which need the adapter's forward pass.

    Example::

      >>> from switchnorm import train
      >>> model = train.build_model("mlp", (8,), 3, norm="sn")
      >>> weights = train.model_weights(model)
      >>> sorted(next(iter(weights.values()))["mean"])
      ['bn', 'ln']
    """
    weights = switchnorm.mixing_weights(model, batch=batch)
    if weights:
        return weights
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not isinstance(model, LinenAdapter):
        return switchnorm.mixing_weights(params)
    # The forward pass names Linen layers from the wrapped module's root, so read its own tree.
    inner = switchnorm.mixing_weights(params["inner"], batch=batch, forward=lambda _, x: model(x))
    return {f"inner/{path}": layer for path, layer in inner.items()}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def schedule_for(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Warmup then cosine decay over the whole run."""
    total = steps_per_epoch * config.epochs
    return optim.warmup_cosine(config.learning_rate, total, round(config.warmup_epochs * steps_per_epoch))


def make_tx(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer the config names, on its schedule, weight decay sparing the mixing logits.

    The logits get their own learning-rate scale and gradient clipping when the
    config asks (``mixing_lr_scale``, ``mixing_clip``).

    Example::

      >>> from switchnorm import train
      >>> tx = train.make_tx(train.TrainConfig(optimizer="sgd", learning_rate=0.1), steps_per_epoch=10)
      >>> type(tx).__name__
      'GradientTransformationExtraArgs'
    """
    return optim.make_optimizer(
        config.optimizer,
        schedule_for(config, steps_per_epoch),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        mask=optim.weight_decay_mask,
        mixing_lr_scale=config.mixing_lr_scale,
        mixing_clip=config.mixing_clip,
    )


def initial_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
    """The TrainState of a fresh model: step 0, its parameters, running averages, tx state.

    Example::

      >>> from switchnorm import train
      >>> model = train.build_model("mlp", (8,), 3, norm="bn")
      >>> state = train.initial_state(model, train.make_tx(train.TrainConfig(), steps_per_epoch=10))
      >>> int(state.step)
      0
    """
    model.train()
    # Two filters give exactly two States; flax's stubs say "one or more", which cannot unpack into two names.
    _, params, rest = cast(tuple[nnx.GraphDef, nnx.State, nnx.State], nnx.split(model, nnx.Param, ...))
    return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


# -- the two pure step functions ---------------------------------------------------------


def train_step(
    graphdef: nnx.GraphDef,
    state: TrainState,
    batch: tuple[jax.Array, jax.Array],
    tx: optax.GradientTransformation,
    total_steps: int | None = None,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer step on ``batch = (x, y)``: the new state, the batch's mean loss and accuracy.

    ``graphdef`` is the model's static graph in training mode (batch statistics,
    running averages updated); it, ``tx`` and ``total_steps`` are bound before
    ``jax.jit``, so only ``state`` and ``batch`` are traced.

    With ``total_steps``, every ``mixing="sparsestmax"`` layer first gets the radius
    ``radius_schedule(step, total_steps - 1)`` (``step`` the traced count of steps done): 0 at
    the first step, where sparsestmax is sparsemax, rising linearly to 1 at the last step. After
    the last step the layers keep radius 1 (also in a run of one step), so the trained model
    has every layer on one normalizer. The radius lives in ``rest``, so a checkpoint resumes
    it. Models without such layers are unchanged.
    """
    x, y = batch
    model = nnx.merge(graphdef, state.params, state.rest)
    if total_steps is not None:
        radius = switchnorm.radius_schedule(state.step, max(total_steps - 1, 1))
        switchnorm.set_radius(model, radius)

    def loss_fn(model):
        logits = model(x)
        return cross_entropy(logits, y).mean(), logits

    # nnx.value_and_grad, not jax's: it lets the layers update their
    # running averages in place while differentiating w.r.t. nnx.Param.
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    if total_steps is not None:  # the radius the model ends with: one-hot after the last step
        switchnorm.set_radius(model, jnp.where(state.step + 1 >= total_steps, 1.0, radius))
    # Two filters give exactly two States; flax's stubs say "one or more", which cannot unpack into two names.
    _, params, rest = cast(tuple[nnx.GraphDef, nnx.State, nnx.State], nnx.split(model, nnx.Param, ...))
    updates, opt_state = tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = (logits.argmax(-1) == y).mean()
    return TrainState(state.step + 1, params, rest, opt_state), loss, accuracy


def eval_step(
    graphdef: nnx.GraphDef, state: TrainState, batch: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(summed loss, number correct) over the rows of ``batch = (x, y, valid)`` where ``valid``.

    ``graphdef`` is the model's graph in eval mode (running averages); the
    ``valid`` mask lets the last, padded batch keep the shape of the others.
    """
    x, y, valid = batch
    logits = nnx.merge(graphdef, state.params, state.rest)(x)
    loss = jnp.where(valid, cross_entropy(logits, y), 0.0).sum()
    correct = jnp.where(valid, logits.argmax(-1) == y, False).sum()
    return loss, correct


class ShardingPlan(Protocol):
    """Where a :class:`Trainer` puts its arrays when it spans several devices.

    :class:`switchnorm.train.distributed.DataParallel` is the one this package
    provides: the state replicated over a device mesh, every batch split along
    its first axis.
    """

    num_devices: int

    @property  # read-only, so a plan may hold any Sharding subclass (e.g. NamedSharding) here
    def replicated(self) -> jax.sharding.Sharding: ...  # where the steps' outputs live

    def check_batch_size(self, batch_size: int) -> None: ...

    def shard(self, global_batch: Any) -> jax.Array: ...

    def replicate(self, tree: Any) -> Any: ...


class Trainer:
    """Trains an NNX classifier on a :class:`~switchnorm.train.data.Dataset`.

    The record of every epoch holds the model's mixing weights
    (:func:`model_weights`), summarised on :attr:`weights_batch`, the first
    :data:`WEIGHTS_BATCH` test examples: a ``weights="sample"`` layer's are its
    mean over them, in eval mode (running averages), as the model predicts.

    Args:
      model: the NNX module; it is split once, and :meth:`model_at` puts any
        state back into it. ``model.train()``/``model.eval()`` choose the graph
        of the train and eval steps (running averages in eval).
      config: a :class:`TrainConfig`.
      dataset: the data.
      tx: an optax transformation; by default ``optim.make_optimizer`` from the
        config, with the weight-decay mask that spares the mixing logits.
      plan: a :class:`ShardingPlan` to spread every step over several devices
        (``config.batch_size`` is then the global batch); None: one device.
        The step functions are the same either way; only where their inputs
        and outputs live differs.
    """

    def __init__(
        self,
        model: nnx.Module,
        config: TrainConfig,
        dataset: data_lib.Dataset,
        tx: optax.GradientTransformation | None = None,
        plan: ShardingPlan | None = None,
    ):
        if plan is not None:
            plan.check_batch_size(config.batch_size)
        if config.batch_size > len(dataset.x_train):  # TrainConfig refuses one below 1
            raise ValueError(
                f"batch_size must be at most the training set's {len(dataset.x_train)} examples."
            )
        self.model = model
        self.config = config
        self.dataset = dataset
        self.plan = plan
        self.steps_per_epoch = data_lib.steps_per_epoch(len(dataset.x_train), config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.tx = tx if tx is not None else make_tx(config, self.steps_per_epoch)
        self.schedule = schedule_for(config, self.steps_per_epoch)
        model.eval()
        self.eval_graph = nnx.graphdef(model)
        model.train()
        self.train_graph = nnx.graphdef(model)
        self._initial = self._place_state(initial_state(model, self.tx))
        # Fixed for the whole run, so that per-sample weights compare from epoch to epoch.
        self.weights_batch = dataset.x_test[:WEIGHTS_BATCH]
        devices = 1 if plan is None else plan.num_devices
        # One eval shape for every batch, split evenly over the devices.
        self.eval_batch_size = math.ceil(min(1000, len(dataset.x_test)) / devices) * devices
        outputs: dict[str, Any] = {} if plan is None else {"out_shardings": plan.replicated}
        step = functools.partial(train_step, self.train_graph, tx=self.tx, total_steps=self.total_steps)
        self._train_step = jax.jit(step, **outputs)
        self._eval_step = jax.jit(functools.partial(eval_step, self.eval_graph), **outputs)

    def _place_state(self, state: TrainState) -> TrainState:
        """``state`` where the steps expect it: replicated under a plan, as is otherwise."""
        return state if self.plan is None else self.plan.replicate(state)

    def _place_batch(self, *arrays: Any) -> tuple[Any, ...]:
        """The arrays of one batch, split over the plan's devices (as is without a plan)."""
        return arrays if self.plan is None else tuple(self.plan.shard(a) for a in arrays)

    # -- public API -----------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """The state before the first step."""
        return self._initial

    def train_step(self, state: TrainState, x: Any, y: Any) -> tuple[TrainState, float, float]:
        """One jitted optimizer step; returns the new state, the batch's loss and accuracy."""
        state, loss, accuracy = self._train_step(state, self._place_batch(x, y))
        return state, float(loss), float(accuracy)

    def evaluate(self, state: TrainState, x: np.ndarray | None = None, y: np.ndarray | None = None):
        """(mean loss, accuracy) in eval mode, on the test split by default."""
        x = self.dataset.x_test if x is None else x
        y = self.dataset.y_test if y is None else y
        size = self.eval_batch_size
        total_loss, total_correct = 0.0, 0
        for start in range(0, len(x), size):
            xb, yb = x[start : start + size], y[start : start + size]
            n = len(xb)
            if n < size:  # pad to one shape: one compilation
                xb = np.concatenate([xb, np.zeros((size - n, *xb.shape[1:]), xb.dtype)])
                yb = np.concatenate([yb, np.zeros(size - n, yb.dtype)])
            loss, correct = self._eval_step(state, self._place_batch(xb, yb, np.arange(size) < n))
            total_loss += float(loss)
            total_correct += int(correct)
        return total_loss / len(x), total_correct / len(x)

    def model_at(self, state: TrainState) -> nnx.Module:
        """The model holding ``state``: a new module on copies of its variables, so changing
        it changes neither the trainer's own model nor ``state``."""
        return nnx.merge(self.eval_graph, state.params, state.rest, copy=True)

    def recalibrated(self, state: TrainState, epoch: int) -> TrainState:
        """``state`` with population bn statistics: :func:`switchnorm.recalibrate` over
        ``config.recalibrate`` training batches, drawn in the orders of the epochs after ``epoch``."""
        data, config = self.dataset, self.config
        orders = (
            data_lib.train_batches(data.x_train, data.y_train, config.batch_size, config.seed, later)
            for later in itertools.count(epoch + 1)
        )
        batches = itertools.islice(itertools.chain.from_iterable(orders), self.config.recalibrate)
        model = nnx.merge(self.train_graph, state.params, state.rest, copy=True)  # leaves ``state`` alone
        switchnorm.recalibrate(model, (self._place_batch(xb)[0] for xb, _ in batches))
        _, _, rest = cast(tuple[nnx.GraphDef, nnx.State, nnx.State], nnx.split(model, nnx.Param, ...))
        return self._place_state(state._replace(rest=rest))

    def _train_epoch(
        self, state: TrainState, epoch: int, callbacks: Sequence[Callback]
    ) -> tuple[TrainState, dict[str, Any]]:
        """One pass over the training set; the state after it and the epoch's record."""
        losses, accuracies = [], []
        for x, y in data_lib.train_batches(
            self.dataset.x_train, self.dataset.y_train, self.config.batch_size, self.config.seed, epoch
        ):
            state, loss, accuracy = self.train_step(state, x, y)
            losses.append(loss)
            accuracies.append(accuracy)
            for callback in callbacks:
                callback.on_step(self, int(state.step), loss, accuracy)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": float(np.mean(losses)),
            "train_accuracy": float(np.mean(accuracies)),
            "learning_rate": float(self.schedule(int(state.step))),
        }
        if epoch + 1 == self.config.epochs and self.config.recalibrate:
            state = self.recalibrated(state, epoch)
        if (epoch + 1) % self.config.eval_every == 0 or epoch + 1 == self.config.epochs:
            record["test_loss"], record["test_accuracy"] = self.evaluate(state)
        record["weights"] = model_weights(self.model_at(state), self.weights_batch)
        return state, record

    def fit(
        self,
        state: TrainState | None = None,
        start_epoch: int = 0,
        callbacks: Sequence[Callback] = (),
    ) -> tuple[TrainState, dict[str, Any]]:
        """Trains from ``state`` (default: the initial one) at ``start_epoch`` to the end.

        A given ``state`` (e.g. restored from a checkpoint) is first placed as
        the plan wants it. Returns the final state and the last epoch's record.
        """
        state = self._initial if state is None else self._place_state(state)
        for callback in callbacks:
            callback.on_train_begin(self, state, start_epoch)
        record: dict[str, Any] = {}
        for epoch in range(start_epoch, self.config.epochs):
            state, record = self._train_epoch(state, epoch, callbacks)
            for callback in callbacks:
                callback.on_epoch_end(self, state, record)
        for callback in callbacks:
            callback.on_train_end(self, state, record)
        return state, record


class LinenAdapter(nnx.Module):
    """Trains a Linen model with this loop: wraps it as an NNX module.

    The Linen module must take ``use_running_average`` as a call argument (as
    ``switchnorm.linen.SwitchNorm`` and ``flax.linen.BatchNorm`` do) and pass it
    on; ``adapter.train()`` / ``adapter.eval()`` then switch it like an NNX model.

    Example::

      >>> import flax.linen as nn, jax.numpy as jnp
      >>> from switchnorm import linen as snn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, use_running_average):
      ...     x = snn.SwitchNorm(use_running_average=use_running_average)(nn.Dense(8)(x))
      ...     return nn.Dense(2)(x)
      >>> model = LinenAdapter(Net(), jnp.zeros((1, 4)))
      >>> model(jnp.ones((3, 4))).shape
      (3, 2)
    """

    def __init__(self, module: Any, sample_input: jax.Array, seed: int = 0):
        from flax.nnx import bridge

        self.use_running_average = False
        self.inner = bridge.ToNNX(module, rngs=nnx.Rngs(seed)).lazy_init(
            sample_input, use_running_average=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        mutable = False if self.use_running_average else ["batch_stats"]
        return self.inner(x, use_running_average=self.use_running_average, mutable=mutable)
