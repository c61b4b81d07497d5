"""Aria's mixture of experts: top-k router, dropless routed experts, shared experts (aria-spec.md §4.3).

The routed experts have interchangeable backends selected by name:
- ``"ragged"``: sort the (token, slot) pairs by expert and run a grouped matmul with ``jax.lax.ragged_dot``;
- ``"gather"``: gather each (token, slot)'s expert weights and run batched matvecs; reads only the selected
  experts, the right choice for decode and other small token counts;
- ``"blocked"``: sort, then each expert's contiguous rows through its own weights in chunks, with a hand-written
  VJP (aria_jax.grouped_mlp); with LoRA, rows padded per expert to whole blocks and a scan over the blocks. Few
  wasted expert FLOPs (``ragged_dot`` lowers to an E-times dense matmul on CPU); the CPU training path;
- ``"dense"``: every expert on every token, combined with the routing weights; a simple reference for tests;
- ``"auto"``: ``gather`` when tokens x top-k <= experts (decode); otherwise ``blocked`` on CPU, ``ragged`` elsewhere.

With ``split_experts`` (the unrolled inference layout, aria_jax.param_layout) every expert's weights are their own
arrays and ``experts_split`` runs them: XLA reads a separate parameter in place, while any slice of a stacked
(E, ...) array, static or dynamic, is copied first on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from aria_jax import grouped_mlp
from aria_jax.config import AriaTextConfig
from aria_jax.expert_parallel import experts_expert_parallel
from aria_jax.layers import Linear, lora_input, lora_pair, param, silu, softmax, swiglu


def route(x: jax.Array, router_kernel: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k on the raw router logits, then softmax over the k selected logits only.

    Returns (logits (T, E), weights (T, k), expert ids (T, k)).
    """
    logits = jnp.einsum("td,de->te", x, router_kernel)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    return logits, softmax(top_logits), top_ids


def _combine(ys: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Outputs of the expert-sorted (token, slot) rows back in (token, slot) order, summed with the routing weights."""
    t, k = weights.shape
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


Pair = tuple[jax.Array, jax.Array] | None


class ExpertLora(NamedTuple):
    """Per-expert LoRA: gate_up (a (E, D, r), b (E, r, 2F)) and down (a (E, F, r), b (E, r, D)); either may be None."""

    gate_up: Pair = None
    down: Pair = None
    dropout: Callable[[jax.Array], jax.Array] = lambda x: x


LoraArg = ExpertLora | None


def merge_expert_lora(w: jax.Array, pair: Pair) -> jax.Array:
    return w if pair is None else w + jnp.einsum("eir,ero->eio", pair[0], pair[1]).astype(w.dtype)


def _ragged_lora(x: jax.Array, pair: Pair, group_sizes: jax.Array, dropout) -> jax.Array | int:
    """The LoRA branch through the same grouped matmul: ``ragged_dot(ragged_dot(x, a), b)``."""
    if pair is None:
        return 0
    a, b = pair
    h = jax.lax.ragged_dot(dropout(x), a.astype(x.dtype), group_sizes)
    return jax.lax.ragged_dot(h, b.astype(x.dtype), group_sizes)


def experts_ragged(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Dropless routed experts: sort (token, slot) pairs by expert, grouped matmul, unsort, weighted sum over k."""
    t, k = ids.shape
    num_experts = gate_up.shape[0]
    lora = lora or ExpertLora()
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    h = jax.lax.ragged_dot(xs, gate_up, group_sizes) + _ragged_lora(xs, lora.gate_up, group_sizes, lora.dropout)
    act = swiglu(h)
    ys = jax.lax.ragged_dot(act, down, group_sizes) + _ragged_lora(act, lora.down, group_sizes, lora.dropout)
    return _combine(ys, order, weights)


def experts_dense(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Reference: run every expert on every token and keep each token's k outputs (E times the work)."""
    if lora is not None:  # LoRA merged into the expert weights (no LoRA dropout on this backend)
        gate_up, down = merge_expert_lora(gate_up, lora.gate_up), merge_expert_lora(down, lora.down)
    h = jnp.einsum("td,edf->tef", x, gate_up)
    y = jnp.einsum("tef,efd->ted", swiglu(h), down)
    y = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # (T, k, D)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def experts_gather(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Per (token, slot): gather that expert's weights and apply them; no sort, no wasted expert."""
    if lora is not None:  # LoRA merged into the expert weights (no LoRA dropout on this backend)
        gate_up, down = merge_expert_lora(gate_up, lora.gate_up), merge_expert_lora(down, lora.down)
    h = jnp.einsum("td,tkdf->tkf", x, jnp.take(gate_up, ids, axis=0))
    y = jnp.einsum("tkf,tkfd->tkd", swiglu(h), jnp.take(down, ids, axis=0))
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def experts_blocked(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Sorted rows, each expert's rows through its own weights with no wasted expert (aria_jax.grouped_mlp).

    Ids >= E (another shard's experts under expert parallelism) contribute zero. With LoRA the rows are padded per
    expert to whole blocks and a scan runs each block through its expert and LoRA pair.
    """
    if lora is not None:
        return _experts_blocked_lora(x, weights, ids, gate_up, down, lora)
    t, k = ids.shape
    num_experts, d = gate_up.shape[0], x.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(jnp.where(flat < num_experts, flat, num_experts), length=num_experts + 1)[:num_experts]
    rows = jnp.concatenate([jnp.take(x, order // k, axis=0), jnp.zeros((grouped_mlp.SLACK, d), x.dtype)])
    return _combine(grouped_mlp.grouped_mlp(rows, sizes.astype(jnp.int32), gate_up, down)[: t * k], order, weights)


def _experts_blocked_lora(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: ExpertLora
) -> jax.Array:
    """Sorted rows padded per expert to whole blocks; a scan runs each block through its expert and LoRA pair.

    At most ``ceil(T*k / block) + E`` blocks exist; unused ones are skipped with ``lax.cond``. The expert weights
    are frozen under LoRA, so autodiff only accumulates the small A/B cotangents.
    """
    t, k = ids.shape
    num_experts, d = gate_up.shape[0], x.shape[-1]
    n = t * k
    block = int(min(128, max(8, 1 << max(0, (n // num_experts) - 1).bit_length())))  # ~ rows per expert
    num_blocks = -(-n // block) + num_experts
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_of_row = flat[order]
    valid = expert_of_row < num_experts
    local = jnp.minimum(expert_of_row, num_experts - 1)
    sizes = jnp.bincount(jnp.where(flat < num_experts, flat, num_experts), length=num_experts + 1)[:num_experts]
    padded = -(-sizes // block) * block
    padded_end = jnp.cumsum(padded)
    rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[local]
    trash = num_blocks * block  # one spare row for the (token, slot) pairs this call does not own
    dest = jnp.where(valid, (padded_end - padded)[local] + rank, trash)
    buffer = jnp.zeros((trash + 1, d), x.dtype).at[dest].set(jnp.take(x, order // k, axis=0))
    block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")

    def expert_matmul(rows, w, pair, expert):
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, expert, keepdims=False)  # noqa: E731
        out = rows @ pick(w)
        if pair is not None:  # the LoRA branch through the same block: (dropout(x) @ A[e]) @ B[e]
            out = out + (lora.dropout(rows) @ pick(pair[0]).astype(rows.dtype)) @ pick(pair[1]).astype(rows.dtype)
        return out

    def run_block(_, inputs):
        rows, expert = inputs

        def compute(rows, expert):
            h = expert_matmul(rows, gate_up, lora.gate_up, expert)
            return expert_matmul(swiglu(h), down, lora.down, expert)

        out = jax.lax.cond(expert < num_experts, compute, lambda r, e: jnp.zeros_like(r), rows, expert)
        return None, out

    _, out = jax.lax.scan(run_block, None, (buffer[:trash].reshape(num_blocks, block, d), block_expert))
    out = jnp.concatenate([out.reshape(-1, d), jnp.zeros((1, d), out.dtype)])
    return _combine(jnp.take(out, dest, axis=0), order, weights)


def split_block(rows: int, num_experts: int) -> int:
    """Rows per matmul in ``experts_split``: 1 (a loop of matvecs, the fastest kernel on CPU for a few rows) up to
    four rows per expert on average, else the power of two that holds them (at most 256). One block size: each
    size is a loop per expert to compile (grouped_mlp's four sizes tripled the first prefill's compile time)."""
    per_expert = -(-rows // num_experts)
    return 1 if per_expert <= 4 else int(min(256, 1 << (per_expert - 1).bit_length()))


def experts_split(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Sequence[jax.Array], down: Sequence[jax.Array]
) -> jax.Array:
    """Routed experts with one (D, 2F) / (F, D) array per expert: no weight is copied, no expert is wasted, and
    the gradient of each expert is its own array. The (token, slot) pairs are sorted by expert and each expert runs
    its own rows in blocks of ``split_block`` rows (``grouped_mlp.grouped_mlp_split``)."""
    t, k = ids.shape
    d = x.shape[-1]
    chunks = (split_block(t * k, len(gate_up)),)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=len(gate_up)).astype(jnp.int32)
    rows = jnp.concatenate([jnp.take(x, order // k, axis=0), jnp.zeros((chunks[0], d), x.dtype)])
    out = grouped_mlp.grouped_mlp_split(rows, sizes, tuple(gate_up), tuple(down), chunks)
    return _combine(out[: t * k], order, weights)


def experts_auto(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    # Static choices, from shapes and the platform at trace time. gather reads only the selected experts and has
    # no inner loop (an inner loop over a layer's experts makes XLA copy that layer's expert weights first).
    if ids.size <= gate_up.shape[0]:
        return experts_gather(x, weights, ids, gate_up, down, lora)
    if jax.default_backend() == "cpu":
        return experts_blocked(x, weights, ids, gate_up, down, lora)
    return experts_ragged(x, weights, ids, gate_up, down, lora)


EXPERT_BACKENDS: dict[str, Callable[..., jax.Array]] = {
    "auto": experts_auto,
    "ragged": experts_ragged,
    "gather": experts_gather,
    "blocked": experts_blocked,
    "dense": experts_dense,
}


class SharedExperts(nn.Module):
    """The ``moe_num_shared_experts`` shared experts, folded into one SwiGLU MLP of width I * n_shared."""

    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, d = self.config.shared_intermediate_size, self.config.hidden_size
        gate = Linear(f, ("embed", "mlp"), False, self.dtype, name="gate_proj")(x)
        up = Linear(f, ("embed", "mlp"), False, self.dtype, name="up_proj")(x)
        return Linear(d, ("mlp", "embed"), False, self.dtype, name="down_proj")(silu(gate) * up)


class MoE(nn.Module):
    """(B, T, D) -> (B, T, D): routed experts + shared experts, no capacity limit and no dropped tokens.

    With a ``mesh`` whose ``expert`` axis has more than one device, the routed experts run expert-parallel
    (aria_jax.expert_parallel) with ``ep_schedule``.
    """

    config: AriaTextConfig
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    ep_schedule: str = "auto"
    split_experts: bool = False  # one array per expert (``gate_up_{e}``, ``down_{e}``): the unrolled inference layout

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the layer output and the router logits (B*T, E) for the auxiliary losses."""
        cfg = self.config
        if self.backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown MoE backend '{self.backend}'; choose one of {', '.join(EXPERT_BACKENDS)}")
        e, d, f = cfg.moe_num_experts, cfg.hidden_size, cfg.intermediate_size
        router = param(self, "router_kernel", (d, e), ("embed", "expert_router"), self.dtype)
        tokens = x.reshape(-1, d)
        logits, weights, ids = route(tokens, router, cfg.moe_topk)
        if self.split_experts:
            gate_up = [param(self, f"gate_up_{i}", (d, 2 * f), ("expert_embed", "expert_mlp"), self.dtype)
                       for i in range(e)]
            down = [param(self, f"down_{i}", (f, d), ("expert_mlp", "expert_embed"), self.dtype) for i in range(e)]
            routed = experts_split(tokens, weights, ids, gate_up, down)
            shared = SharedExperts(cfg, self.dtype, name="shared_experts")(x)
            return routed.reshape(x.shape) + shared, logits
        gate_up = param(self, "gate_up", (e, d, 2 * f), ("expert", "expert_embed", "expert_mlp"), self.dtype)
        down = param(self, "down", (e, f, d), ("expert", "expert_mlp", "expert_embed"), self.dtype)
        pairs = lora_pair(self, "gate_up"), lora_pair(self, "down")
        lora = None if pairs == (None, None) else ExpertLora(*pairs, lambda v: lora_input(self, v))
        if self.mesh is not None and self.mesh.shape.get("expert", 1) > 1:
            # Local experts need a backend that skips other shards' (token, slot) pairs: blocked or ragged.
            ragged = self.backend == "ragged" or (self.backend == "auto" and jax.default_backend() != "cpu")
            local = experts_ragged if ragged else experts_blocked
            if lora is not None:  # LoRA merged into the expert weights under expert parallelism (no dropout)
                gate_up, down = merge_expert_lora(gate_up, lora.gate_up), merge_expert_lora(down, lora.down)
            routed = experts_expert_parallel(
                tokens, weights, ids, gate_up, down, mesh=self.mesh, backend=local, schedule=self.ep_schedule
            )
        else:
            routed = EXPERT_BACKENDS[self.backend](tokens, weights, ids, gate_up, down, lora)
        routed = routed.reshape(x.shape)
        shared = SharedExperts(cfg, self.dtype, name="shared_experts")(x)
        return routed + shared, logits

MOE_BACKENDS = tuple(EXPERT_BACKENDS)
