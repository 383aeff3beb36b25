"""Device mesh, shardings and multi-process start-up.

Data parallelism over every device of every process: a 1-D `Mesh` with axis `data`; the batch is sharded along
it and parameters are replicated, so `jax.jit` averages gradients with an all-reduce, as `pmap` did, in the
form that also spans hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables that launch one process of a multi-process run (flags take precedence).
ENV_COORDINATOR = "MMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MMJAX_PROCESS_ID"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Calls `jax.distributed.initialize` when this process is one of several; returns whether it did.

    Arguments default to the MMJAX_* environment variables. With none given, nothing happens (one process).
    On CPU the cross-process collectives use gloo.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if not coordinator_address:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("a multi-process run needs a coordinator address (--coordinator_address HOST:PORT)")
        return False
    if num_processes is None or process_id is None:
        raise ValueError("a multi-process run needs --num_processes and --process_id with --coordinator_address")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, key: str = "data.batch_size") -> None:
    """The global batch must split evenly over every device (and so over every process)."""
    devices = jax.device_count()
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(
            f"config {key}={batch_size} must be a positive multiple of the device count {devices} "
            f"(e.g. {max(1, batch_size // devices) * devices or devices})"
        )
