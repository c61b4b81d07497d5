"""Expert parallelism: routed experts spread over a mesh axis, run inside ``jax.shard_map``.

Two dropless schedules (jax-anchors.md §1.4); both run on CPU, GPU and TPU:
- ``"replicated"``: every expert shard sees all of its data shard's tokens, runs only its own experts
  (other shards' (token, slot) pairs are skipped), and the partial outputs are summed with ``psum``. Best for
  decode and small batches: no token exchange, one all-reduce.
- ``"all_to_all"``: tokens are also split over the expert axis; each shard sends every (token, slot) pair to the
  shard owning its expert with a dense ``all_to_all`` into a fixed buffer (worst case: dropless; or
  ``capacity_factor`` x the even share, dropping overflow), computes, and sends results back. Best for prefill
  and training, where the replicated schedule would repeat each token's work on every shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

EP_SCHEDULES = ("auto", "replicated", "all_to_all")
REPLICATED_MAX_TOKENS = 64  # per data shard: below this, exchanging tokens costs more than repeating them

Backend = Callable[..., jax.Array]


def _token_spec(mesh: Mesh, token_axes: tuple[str, ...], tokens: int, extra: tuple[str, ...] = ()) -> tuple:
    """Mesh axes the token dimension can be split over (those present, > 1, and dividing the token count)."""
    axes = tuple(a for a in (*token_axes, *extra) if a in mesh.shape and mesh.shape[a] > 1)
    return axes if axes and tokens % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _local_ids(ids: jax.Array, axis: str, experts_per_shard: int) -> jax.Array:
    """Global expert ids -> this shard's local ids; other shards' experts become the out-of-range sentinel."""
    local = ids - jax.lax.axis_index(axis) * experts_per_shard
    return jnp.where((local >= 0) & (local < experts_per_shard), local, experts_per_shard)


def replicated(x, weights, ids, gate_up, down, *, mesh: Mesh, axis: str, token_axes, backend: Backend):
    tok = _token_spec(mesh, token_axes, x.shape[0])
    tspec = P(tok or None, None)

    def local(x, weights, ids, gate_up, down):
        ids = _local_ids(ids, axis, gate_up.shape[0])
        return jax.lax.psum(backend(x, weights, ids, gate_up, down), axis)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(tspec, tspec, tspec, P(axis), P(axis)), out_specs=tspec, check_vma=False
    )(x, weights, ids, gate_up, down)


def all_to_all(x, weights, ids, gate_up, down, *, mesh: Mesh, axis: str, token_axes, backend: Backend,
               capacity_factor: float | None = None):
    tok = _token_spec(mesh, token_axes, x.shape[0], extra=(axis,))
    if axis not in tok:  # tokens do not split over the expert axis: fall back to the replicated schedule
        return replicated(x, weights, ids, gate_up, down, mesh=mesh, axis=axis, token_axes=token_axes, backend=backend)
    tspec = P(tok, None)
    shards = mesh.shape[axis]

    def local(x, weights, ids, gate_up, down):
        t, k = ids.shape
        per_shard = gate_up.shape[0]
        pairs = t * k
        capacity = pairs if capacity_factor is None else max(1, math.ceil(capacity_factor * pairs / shards))
        flat = ids.reshape(-1)
        target = flat // per_shard
        order = jnp.argsort(target, stable=True)
        counts = jnp.bincount(target, length=shards)
        rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[target[order]]
        kept = rank < capacity  # always true when dropless
        slot = jnp.where(kept, target[order] * capacity + rank, shards * capacity)  # overflow -> spare row
        send_x = jnp.zeros((shards * capacity + 1, x.shape[1]), x.dtype).at[slot].set(jnp.take(x, order // k, axis=0))
        send_id = jnp.full((shards * capacity + 1,), per_shard, ids.dtype).at[slot].set(flat[order] % per_shard)
        exchange = lambda a: jax.lax.all_to_all(a, axis, 0, 0, tiled=True)  # noqa: E731
        recv_x, recv_id = exchange(send_x[:-1]), exchange(send_id[:-1])
        y = backend(recv_x, jnp.ones((recv_x.shape[0], 1), weights.dtype), recv_id[:, None], gate_up, down)
        back = jnp.concatenate([exchange(y), jnp.zeros((1, y.shape[1]), y.dtype)])
        ys = jnp.take(back, slot, axis=0)
        out = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(t, k, -1)
        return jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype))

    return jax.shard_map(
        local, mesh=mesh, in_specs=(tspec, tspec, tspec, P(axis), P(axis)), out_specs=tspec, check_vma=False
    )(x, weights, ids, gate_up, down)


def experts_expert_parallel(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    mesh: Mesh,
    backend: Backend,
    axis: str = "expert",
    token_axes: tuple[str, ...] = ("data",),
    schedule: str = "auto",
    capacity_factor: float | None = None,
) -> jax.Array:
    """Routed experts with ``gate_up``/``down`` split over ``axis``; ``backend`` runs each shard's local experts."""
    if schedule not in EP_SCHEDULES:
        raise ValueError(f"unknown expert-parallel schedule '{schedule}'; choose one of {', '.join(EP_SCHEDULES)}")
    shards = mesh.shape[axis]
    if gate_up.shape[0] % shards:
        raise ValueError(f"{gate_up.shape[0]} experts do not split evenly over {shards} '{axis}' shards")
    if schedule == "auto":
        data = math.prod(mesh.shape[a] for a in token_axes if a in mesh.shape)
        schedule = "replicated" if x.shape[0] // max(1, data) <= REPLICATED_MAX_TOKENS else "all_to_all"
    if schedule == "replicated":
        return replicated(x, weights, ids, gate_up, down, mesh=mesh, axis=axis, token_axes=token_axes, backend=backend)
    return all_to_all(x, weights, ids, gate_up, down, mesh=mesh, axis=axis, token_axes=token_axes, backend=backend,
                      capacity_factor=capacity_factor)
