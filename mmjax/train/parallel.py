"""Device mesh, shardings and multi-process start-up.

The mesh is 2-D, `(data, fsdp)` = `(D / F, F)` over all D devices of all processes (in `jax.devices()` order).
The batch is split over both axes, so every device holds B / D examples whatever F is. With F = 1 (the default)
this is plain data parallelism: parameters and optimizer state are replicated and `jax.jit` averages gradients
with an all-reduce, as `pmap` did, in the form that also spans hosts. With F > 1 (FSDP / ZeRO-3 style) each large
parameter and optimizer-state leaf is split over the `fsdp` axis (see `fsdp_spec`): every device stores 1 / F of
it, and XLA (GSPMD) inserts the all-gathers before use and the reduce-scatters of the gradients.

Multi-process: the flattened `(data, fsdp)` batch axis enumerates devices in `jax.devices()` order, exactly as the
1-D mesh did, so each process's devices still own one contiguous block of rows of the global batch (the rows its
data pipeline reads, see `mmjax.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Leaves with fewer elements stay replicated under FSDP: biases and norm scales are tiny, and gathering each of
# them would cost a collective's latency for almost no memory. 2**12 float32 = 16 KiB per leaf.
DEFAULT_FSDP_MIN_SIZE = 2**12

# Environment variables that launch one process of a multi-process run (flags take precedence).
ENV_COORDINATOR = "MMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MMJAX_PROCESS_ID"

# Failure detection of multi-process runs (`jax.distributed.initialize`; each overridable by its variable). A process
# that stops sending heartbeats for HEARTBEAT seconds (killed, crashed, its host gone) is declared dead, and every
# other process then terminates with "Terminating process because the JAX distributed service detected fatal
# errors ... tasks are unhealthy (stopped sending heartbeats)" (status 134, SIGABRT) instead of waiting forever in a
# collective (gloo on CPU has no timeout of its own). JAX's default is 100 s; heartbeats come from a background
# thread, so long compilations or steps do not miss them. At exit, a process waits up to SHUTDOWN seconds for the
# others (JAX: 300 s), and start-up waits up to INIT seconds for every process to connect (JAX: 300 s).
ENV_HEARTBEAT_TIMEOUT = "MMJAX_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN_TIMEOUT = "MMJAX_SHUTDOWN_TIMEOUT_S"
ENV_INIT_TIMEOUT = "MMJAX_INIT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_SHUTDOWN_TIMEOUT_S = 60
DEFAULT_INIT_TIMEOUT_S = 300


def _timeout_from_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"${name}={value!r} must be a positive whole number of seconds")
    return int(value)


# JAX's cluster environments (`jax.distributed.initialize()` detects them) and the name printed for each.
CLUSTER_NAMES = {"slurm": "SLURM", "ompi": "Open MPI", "gcetpu": "TPU pod (GCE)", "gketpu": "TPU pod (GKE)",
                 "tpu": "TPU pod", "k8s": "Kubernetes"}


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How this process joins a multi-process run: from flags, MMJAX_* variables or a detected cluster."""

    source: str  # "command-line flags", "MMJAX_* environment variables", or the detected cluster's name.
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None  # None: every local device (one process per host).

    def describe(self) -> str:
        devices = "every local device" if self.local_device_ids is None else f"local devices {self.local_device_ids}"
        return (f"multi-process run from {self.source}: process {self.process_id} of {self.num_processes}, "
                f"coordinator {self.coordinator_address}, {devices}")


def detect_cluster():
    """The cluster environment JAX's auto-detection would use here (SLURM, Open MPI, TPU pods, Kubernetes), or
    None. Opt-in-only detectors (mpi4py) are left out, as `jax.distributed.initialize()` leaves them out."""
    from jax._src import clusters  # JAX's own detectors (ClusterEnv subclasses); not exported publicly.

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def _tasks_on_this_node() -> int:
    """How many processes the cluster started on this host (1 when it does not say)."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        digits = "".join(itertools.takewhile(str.isdigit, value))
        if digits:
            return int(digits)
    return 1


def process_group(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None) -> ProcessGroup | None:
    """This process's place in a multi-process run, or None for a single process.

    Explicit values (the command line's flags) win, then the MMJAX_* variables, then a cluster environment
    detected the way `jax.distributed.initialize()` does. A detected cluster of one process is a single process.
    mmjax runs one process per host with every local device; where the cluster started several processes on a
    host, each takes the device of its local rank (as JAX's own detection does).
    """
    explicit = (coordinator_address, num_processes, process_id)
    source = "command-line flags" if any(v is not None for v in explicit) else "MMJAX_* environment variables"
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a multi-process run needs --num_processes and --process_id with --coordinator_address")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        return ProcessGroup(source, coordinator_address, num_processes, process_id)
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError("a multi-process run needs a coordinator address (--coordinator_address HOST:PORT)")
    if num_processes == 1:
        return None  # Asked for one process: a cluster environment around it is not joined.
    env = detect_cluster()
    if env is None or env.get_process_count() <= 1:
        return None
    port = os.environ.get("JAX_COORDINATOR_PORT")
    coordinator = env.get_coordinator_address(timeout_secs=_timeout_from_env(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S),
                                              override_coordinator_port=port)
    local = env.get_local_process_id() if _tasks_on_this_node() > 1 else None
    return ProcessGroup(CLUSTER_NAMES.get(env.name, env.name), coordinator, env.get_process_count(),
                        env.get_process_id(), None if local is None else (int(local),))


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Calls `jax.distributed.initialize` when this process is one of several (see `process_group`); returns
    whether it did, after printing the line that says how the run was joined.

    On CPU the cross-process collectives use gloo. If a process dies, the others exit within about
    `DEFAULT_HEARTBEAT_TIMEOUT_S` seconds with an error naming the dead process (see the constants above).
    """
    group = process_group(coordinator_address, num_processes, process_id)
    if group is None:
        return False
    print(group.describe(), flush=True)
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        group.coordinator_address,
        num_processes=group.num_processes,
        process_id=group.process_id,
        local_device_ids=None if group.local_device_ids is None else list(group.local_device_ids),
        cluster_detection_method="deactivate",  # Resolved above; JAX would otherwise pick one device per process.
        initialization_timeout=_timeout_from_env(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S),
        heartbeat_timeout_seconds=_timeout_from_env(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=_timeout_from_env(ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT_S),
    )
    return True


def check_fsdp(fsdp: Any, device_count: int | None = None, key: str = "mesh.fsdp") -> None:
    """The FSDP axis size must be a positive integer dividing the device count (of all processes)."""
    devices = jax.device_count() if device_count is None else device_count
    if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or fsdp <= 0:
        raise ValueError(f"config {key}={fsdp!r} must be a positive integer (1 = no parameter sharding)")
    if devices % fsdp:
        divisors = [d for d in range(1, devices + 1) if devices % d == 0]
        raise ValueError(f"config {key}={fsdp} must divide the device count {devices}; valid: {divisors}")


def check_config(mesh_config: Any) -> None:
    """`config.mesh`: `fsdp` divides the device count, `fsdp_min_size` is a non-negative number of elements."""
    mesh_config = mesh_config or {}
    check_fsdp(mesh_config.get("fsdp", 1), key="mesh.fsdp")
    min_size = mesh_config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"config mesh.fsdp_min_size={min_size!r} must be a non-negative integer (elements)")


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The `(data, fsdp)` mesh of shape `(D / fsdp, fsdp)` over `devices` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else list(devices))
    check_fsdp(fsdp, devices.size)
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def batch_axes(mesh: Mesh) -> str | tuple[str, ...]:
    """The mesh axes the batch axis is split over: all of them (row-major, i.e. in the mesh's device order)."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis: each device holds batch / device-count rows."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars, RNG keys, batch-norm statistics, small parameters)."""
    return NamedSharding(mesh, PartitionSpec())


def fsdp_size(mesh: Mesh) -> int:
    """Size of the mesh's `fsdp` axis (1 for a mesh without one)."""
    return dict(mesh.shape).get(FSDP_AXIS, 1)


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PartitionSpec:
    """Where a parameter-like leaf of `shape` is split: its largest dimension divisible by `fsdp` (the first of
    equal ones) over the `fsdp` axis, if it has at least `min_size` elements; otherwise replicated (`P()`).

    The rule depends only on the shape, so Adam's `mu`/`nu` get the same layout as their parameters.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """Shardings of a `TrainState` (same tree): `params` and `opt_state` leaves per `fsdp_spec` over the mesh's
    `fsdp` axis; `step`, `rng` and `model_state` replicated. With an `fsdp` axis of size 1, all replicated."""
    fsdp = fsdp_size(mesh)

    def sharded(tree):
        return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), tree)

    replicate = lambda tree: jax.tree_util.tree_map(lambda _: replicated(mesh), tree)  # noqa: E731
    return abstract_state.replace(
        step=replicate(abstract_state.step),
        params=sharded(abstract_state.params),
        model_state=replicate(abstract_state.model_state),
        opt_state=sharded(abstract_state.opt_state),
        rng=replicate(abstract_state.rng),
    )


def check_batch_size(batch_size: int, key: str = "data.batch_size") -> None:
    """The global batch must split evenly over every device (and so over every process)."""
    devices = jax.device_count()
    if batch_size <= 0 or batch_size % devices:
        raise ValueError(
            f"config {key}={batch_size} must be a positive multiple of the device count {devices} "
            f"(e.g. {max(1, batch_size // devices) * devices or devices})"
        )
