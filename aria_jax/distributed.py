"""Multi-host: join ``jax.distributed`` from the usual environment and build global arrays from per-process data."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ENV_COORDINATOR = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("JAX_NUM_PROCESSES", "NUM_PROCESSES")
ENV_PROCESS_ID = ("JAX_PROCESS_ID", "PROCESS_ID")


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Join the multi-process job once; returns True when running multi-process.

    Explicit arguments win; otherwise ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are
    read. With neither, TPU pods and SLURM/Open MPI clusters are auto-detected by ``jax.distributed``; on a plain
    machine nothing happens (single process).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address = coordinator_address or _env(ENV_COORDINATOR)
    if num_processes is None and _env(ENV_NUM_PROCESSES):
        num_processes = int(_env(ENV_NUM_PROCESSES))
    if process_id is None and _env(ENV_PROCESS_ID):
        process_id = int(_env(ENV_PROCESS_ID))
    explicit = coordinator_address is not None
    cluster = any(os.environ.get(v) for v in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if not explicit and not cluster:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("a coordinator address needs the number of processes and this process's id as well "
                         "(JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)
    return jax.process_count() > 1


def global_batch(mesh: Mesh, local: np.ndarray, axes: tuple[str, ...] = ("data",)) -> jax.Array:
    """This process's rows -> one global array, rows split over ``axes`` (every process passes its own share).

    Axes absent from the mesh are ignored; with one process this is a plain sharded ``device_put``.
    """
    axes = tuple(a for a in axes if a in mesh.shape)
    sharding = NamedSharding(mesh, P(axes or None, *([None] * (np.ndim(local) - 1))))
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def is_main_process() -> bool:
    """True on process 0: the one that prints, shows progress and writes shared files."""
    return jax.process_index() == 0
