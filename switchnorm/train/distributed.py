"""Data parallelism for the training loop: one device mesh, one or many processes.

The model state is replicated on every device of a one-axis mesh ``("data",)``
and each global batch is split along that axis. The train step stays a plain
``jax.jit``: XLA sees a batch sharded with ``NamedSharding`` and inserts the
collectives itself, so the bn statistics of every SwitchNorm layer span the
whole global batch and the result does not depend on the number of devices
(up to the order of float32 reductions). No model code changes, and no
trainer subclass: :class:`DataParallel` is the sharding plan the ordinary
:class:`~switchnorm.train.loop.Trainer` takes (:func:`make_trainer`).

Several processes (hosts) join with :func:`initialize` (``jax.distributed``).
Every process builds the same data order from the seed, takes its own
contiguous share of each global batch (:meth:`DataParallel.shard`) and feeds
only that; the mesh spans the devices of all processes.

Example::

    >>> from switchnorm.train import distributed
    >>> distributed.initialize()            # no-op unless a cluster is configured
    False
    >>> parallel = distributed.DataParallel(devices=None)   # all local devices
    >>> parallel.num_devices >= 1
    True
    >>> # trainer = Trainer(model, config, dataset, plan=parallel)  # or make_trainer(...)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from switchnorm.train import loop

AXIS = "data"

ENVIRONMENT = {  # each setting of a multi-process run and the variable it is read from if not given
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",  # also read by jax.distributed itself
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def _from_environment(value: Any, variable: str, name: str) -> Any:
    """``value``, or (if None) the environment variable's, as an int unless ``name`` is the address."""
    value = os.environ.get(variable) or None if value is None else value
    if value is None or name == "coordinator_address":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process run with ``jax.distributed.initialize`` if one is asked for.

    Arguments left ``None`` are read from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``. With nothing set anywhere this does nothing and returns False: a
    single-process run. Must run before anything else touches JAX's devices. On CPU the
    processes talk through gloo (JAX's default ``jax_cpu_collectives_implementation``).
    """
    given = zip((coordinator_address, num_processes, process_id), ENVIRONMENT.items(), strict=True)
    cluster = {name: _from_environment(value, variable, name) for value, (name, variable) in given}
    if all(v is None for v in cluster.values()):
        return False
    missing = [name for name, value in cluster.items() if value is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id; missing "
            f"{missing} (flags --coordinator-address, --num-processes, --process-id or "
            f"{', '.join(ENVIRONMENT.values())})."
        )
    processes, rank = cluster["num_processes"], cluster["process_id"]
    if processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {processes}.")
    if not 0 <= rank < processes:
        raise ValueError(f"process_id must be in 0..{processes - 1}, got {rank}.")
    if processes == 1:
        return False
    jax.distributed.initialize(cluster["coordinator_address"], processes, rank)
    return True


def request_cpu_devices(devices: int | None) -> None:
    """Lets the CPU backend expose ``devices`` devices (call before JAX starts).

    On a machine without accelerators this makes ``--devices 8`` work with no
    ``XLA_FLAGS``; it does not touch GPU or TPU backends. Ignored once JAX has
    started its backends.
    """
    if devices is None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # backends already initialized: the count is fixed
        pass


def is_primary() -> bool:
    """True in process 0, the one that writes the run's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def mesh_devices(devices: int | None = None) -> list[jax.Device]:
    """The first ``devices`` local devices of every process, process by process.

    ``None`` means all local devices. Every process must pass the same number.
    """
    local = jax.local_device_count()
    devices = local if devices is None else devices
    if not isinstance(devices, int) or not 1 <= devices <= local:
        raise ValueError(
            f"devices must be between 1 and the {local} local device(s) of this process, got {devices!r}."
        )
    chosen = []
    for process in range(jax.process_count()):
        own = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
        chosen += own[:devices]
    return chosen


class DataParallel:
    """A ``("data",)`` mesh and the two placements the loop needs: a ``loop.ShardingPlan``.

    * :meth:`replicate`: the same array on every device (model and optimizer state).
    * :meth:`shard`: a global batch split along its first axis; each process
      contributes only its own contiguous share of the rows.

    Args:
      devices: local devices per process (``None``: all of them).
    """

    def __init__(self, devices: int | None = None):
        self.mesh = Mesh(np.array(mesh_devices(devices)), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch = NamedSharding(self.mesh, P(AXIS))
        self.num_devices = self.mesh.size
        self.num_processes = jax.process_count()
        self.process_index = jax.process_index()

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the {self.num_devices} "
                f"devices it is split over; use a multiple of {self.num_devices} or "
                f"fewer devices (--devices)."
            )

    def shard(self, global_batch: Any) -> jax.Array:
        """Splits ``global_batch`` (the same NumPy array in every process) over the mesh.

        Only this process's rows are read and copied to its devices.
        """
        global_batch = np.asarray(global_batch)
        self.check_batch_size(len(global_batch))
        share = len(global_batch) // self.num_processes
        local = global_batch[self.process_index * share : (self.process_index + 1) * share]
        return jax.make_array_from_process_local_data(self.batch, local, global_batch.shape)

    def replicate(self, tree: Any) -> Any:
        """Puts every array of ``tree`` (equal in all processes) on every device."""
        if self.num_processes == 1:
            return jax.device_put(tree, self.replicated)

        def put(leaf):
            if isinstance(leaf, jax.Array) and leaf.sharding == self.replicated:
                return leaf
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                data = put(jax.random.key_data(leaf))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
            host = np.asarray(leaf)
            return jax.make_array_from_process_local_data(self.replicated, host, host.shape)

        return jax.tree.map(put, tree)


def make_trainer(model, config, dataset, tx=None, devices: int | None = None) -> loop.Trainer:
    """A :class:`~switchnorm.train.loop.Trainer` over ``devices`` local devices per process.

    With several devices in all, the trainer gets a :class:`DataParallel` plan:
    the state is replicated, every train and eval batch is sharded over the
    mesh, and the jitted steps are the single-device ones, so bn statistics
    span the global batch. ``config.batch_size`` is the global batch and must
    be a multiple of the device count. With one device there is no plan.
    """
    parallel = DataParallel(devices)
    return loop.Trainer(model, config, dataset, tx, plan=parallel if parallel.num_devices > 1 else None)
