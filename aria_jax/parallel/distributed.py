"""Multi-host: join ``jax.distributed`` from the usual environment and build global arrays from per-process data."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def global_batch(
    mesh: Mesh, local: np.ndarray, axes: tuple[str, ...] = ("data",), global_rows: int | None = None
) -> jax.Array:
    """This process's rows -> one global array, rows split over ``axes`` (every process passes its own share).

    Axes absent from the mesh are ignored; with one process this is a plain sharded ``device_put``.
    ``global_rows``: the global row count (default: inferred, rows split evenly over the processes).
    """
    axes = tuple(a for a in axes if a in mesh.shape)
    local = np.asarray(local)
    sharding = NamedSharding(mesh, P(axes or None, *([None] * (local.ndim - 1))))
    shape = None if global_rows is None else (global_rows, *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


def is_main_process() -> bool:
    """True on process 0: the one that prints, shows progress and writes shared files."""
    return jax.process_index() == 0


def spans_processes(mesh: Mesh | None) -> bool:
    """True when ``mesh`` has devices of other processes (arrays on it are not fully addressable here)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def batch_axes(mesh: Mesh, n_rows: int, axes: tuple[str, ...] = ("data",)) -> tuple[str, ...]:
    """The mesh axes a batch of ``n_rows`` rows is split over: ``axes`` when they divide it, else none (replicated)."""
    axes = tuple(a for a in axes if a in mesh.shape)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if n_rows % ways == 0 else ()


def row_block(mesh: Mesh, n_rows: int, axes: tuple[str, ...] = ("data",)) -> tuple[int, int]:
    """(index, count): with rows split over ``axes``, this process holds block ``index`` of ``count`` equal
    contiguous blocks of the ``n_rows`` rows (processes on the same block hold the same rows; no split: (0, 1))."""
    axes = tuple(a for a in axes if a in mesh.shape)
    sharding = NamedSharding(mesh, P(axes or None))
    spans = sorted({idx[0].indices(n_rows)[:2] for idx in sharding.addressable_devices_indices_map((n_rows,)).values()})
    lo, hi = spans[0][0], spans[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    size = hi - lo
    if not contiguous or n_rows % size or lo % size:
        raise ValueError(f"the mesh gives this process rows {spans} of {n_rows}: not one of equal contiguous blocks "
                         "(order the mesh's data axis by process)")
    return lo // size, n_rows // size


def replicate(mesh: Mesh, value) -> jax.Array:
    """A host value that is the same on every process -> one array replicated over ``mesh`` (no cross-host check)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda index: value[index])


def place(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also takes host-local values (the same on every process) onto
    shardings spanning other processes: each process then fills only its own devices."""

    def put(x, sharding):
        local = not isinstance(x, jax.Array) or x.is_fully_addressable
        if sharding.is_fully_addressable or not local:
            return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, shardings)


def to_host(x) -> np.ndarray:
    """The whole value of ``x`` as numpy on every process (a global array is gathered: every process must call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
