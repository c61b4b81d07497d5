"""The routed experts' kernels, and the one place that picks which runs (``run_experts``).

Backends over (token, slot) pairs routed to experts, interchangeable by name:
- ``ragged``: sort the pairs by expert and run a grouped matmul with ``jax.lax.ragged_dot`` (GPU/TPU);
- ``gather``: gather each pair's expert weights and run batched matvecs; reads only the selected experts, the
  choice for decode and other small token counts;
- ``blocked``: sort, then each expert's contiguous rows through its own weights in chunks, with a hand-written VJP
  (``grouped_mlp``); few wasted FLOPs where ``ragged_dot`` lowers to an E-times dense matmul (CPU);
- ``dense``: every expert on every token; a simple reference for tests;
- ``pallas``, ``megablox``, ``tokamax`` (``kernels.grouped_experts``): the accelerators' grouped matmuls: this project's
  Pallas kernel (``kernels.pallas_gmm``; GPU without tokamax), Pallas megablox ``gmm`` (TPU), ``tokamax.ragged_dot``
  (GPU, the optional ``gpu`` extra); the Pallas ones run anywhere in interpret mode (``Runtime.pallas_interpret``);
- ``split`` (``experts_split``): one array per expert (the ``unrolled`` parameter layout): XLA reads each in place,
  where any slice of a stacked (E, ...) array is copied first on CPU.

Quantized expert weights (``kernels.quantized.QWeight``: (E, N, K) int8 or packed int4, scales per expert and
channel) run through every backend: ``ragged`` with ``qwix.ragged_dot_general`` on qwix's QArray, ``gather`` as one
fused int8 matvec per (token, slot) pair reading only the chosen experts' bytes, ``blocked`` and ``split`` through
``kernels.matmul.project`` per expert, ``dense`` on the dequantized weights (the reference).

``run_experts`` takes the expert weights in whichever layout they come (``ExpertWeights``: stacked arrays or one
array per expert, with their LoRA pairs) and a mesh, and picks the kernel: per-expert arrays run ``split``; on a
mesh with an ``expert`` axis the experts run expert-parallel (``expert_parallel``); otherwise the backend asked
for, where ``auto`` is ``gather`` for a few rows and the platform's choice (``Runtime.experts``) for more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from aria_jax.kernels import grouped_mlp
from aria_jax.kernels.activations import swiglu
from aria_jax.kernels.expert_parallel import experts_expert_parallel
from aria_jax.kernels.grouped_experts import combine as _combine
from aria_jax.kernels.grouped_experts import experts_megablox, experts_pallas, experts_tokamax, tokamax_installed
from aria_jax.kernels.matmul import project
from aria_jax.kernels.quantized import QWeight, as_float, values

Pair = tuple[jax.Array, jax.Array] | None


class ExpertLora(NamedTuple):
    """Per-expert LoRA: gate_up (a (E, D, r), b (E, r, 2F)) and down (a (E, F, r), b (E, r, D)); either may be None."""

    gate_up: Pair = None
    down: Pair = None
    dropout: Callable[[jax.Array], jax.Array] = lambda x: x


LoraArg = ExpertLora | None


def merge_expert_lora(w: jax.Array | QWeight, pair: Pair, dtype: jnp.dtype | None = None) -> jax.Array:
    """``w + a @ b`` per expert; a quantized ``w`` is dequantized to ``dtype`` first (the reference paths)."""
    if isinstance(w, QWeight):
        w = as_float(w, dtype or jnp.float32)
    return w if pair is None else w + jnp.einsum("eir,ero->eio", pair[0], pair[1]).astype(w.dtype)


def _ragged_dot(x: jax.Array, w: jax.Array | QWeight, group_sizes: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot`` over (E, K, N) weights; quantized (E, N, K) ones through ``qwix.ragged_dot_general``
    (qwix's QArray: the int8 values and their per-channel or per-group scales; float32 accumulation)."""
    if not isinstance(w, QWeight):
        return jax.lax.ragged_dot(x, w, group_sizes)
    import qwix  # noqa: PLC0415  (only the ragged kernel on quantized weights needs it)

    scale = w.scale if w.scale.ndim == w.q.ndim else w.scale[..., None]  # per group of K, or one per channel
    rhs = qwix.QArray(qvalue=values(w), scale=scale.astype(jnp.float32), zero_point=None, qtype=jnp.int8)
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    out = qwix.ragged_dot_general(x, rhs, group_sizes, numbers, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


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
    h = _ragged_dot(xs, gate_up, group_sizes) + _ragged_lora(xs, lora.gate_up, group_sizes, lora.dropout)
    act = swiglu(h)
    ys = _ragged_dot(act, down, group_sizes) + _ragged_lora(act, lora.down, group_sizes, lora.dropout)
    return _combine(ys, order, weights)


def experts_dense(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Reference: run every expert on every token and keep each token's k outputs (E times the work)."""
    lora = lora or ExpertLora()  # LoRA merged into the expert weights (no LoRA dropout on this backend)
    gate_up, down = merge_expert_lora(gate_up, lora.gate_up, x.dtype), merge_expert_lora(down, lora.down, x.dtype)
    h = jnp.einsum("td,edf->tef", x, gate_up)
    y = jnp.einsum("tef,efd->ted", swiglu(h), down)
    y = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # (T, k, D)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def experts_gather(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Per (token, slot): gather that expert's weights and apply them; no sort, no wasted expert."""
    if isinstance(gate_up, QWeight):
        return _experts_gather_quantized(x, weights, ids, gate_up, down, lora)
    if lora is not None:  # LoRA merged into the expert weights (no LoRA dropout on this backend)
        gate_up, down = merge_expert_lora(gate_up, lora.gate_up), merge_expert_lora(down, lora.down)
    h = jnp.einsum("td,tkdf->tkf", x, jnp.take(gate_up, ids, axis=0))
    y = jnp.einsum("tkf,tkfd->tkd", swiglu(h), jnp.take(down, ids, axis=0))
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def _experts_gather_quantized(x, weights, ids, gate_up: QWeight, down: QWeight, lora: LoraArg) -> jax.Array:
    """One (token, slot) pair at a time: its expert's int8 bytes through ``project``'s one-row form, which XLA
    fuses with the conversion (a gathered (T, k, ...) copy would be float); LoRA pairs added unmerged."""
    t, k = ids.shape
    lora = lora or ExpertLora()

    def branch(row, pair, e):
        if pair is None:
            return 0
        a, b = (jax.lax.dynamic_index_in_dim(m, e, keepdims=False).astype(row.dtype) for m in pair)
        return (lora.dropout(row) @ a) @ b

    def one(inputs):
        row, e = inputs
        h = project(row[None], gate_up.index(e))[0] + branch(row, lora.gate_up, e)
        act = swiglu(h)
        return project(act[None], down.index(e))[0] + branch(act, lora.down, e)

    ys = jax.lax.map(one, (jnp.repeat(x, k, axis=0), ids.reshape(-1))).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", ys, weights.astype(ys.dtype))


def experts_blocked(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array, lora: LoraArg = None
) -> jax.Array:
    """Sorted rows, each expert's rows through its own weights with no wasted expert (aria_jax.kernels.grouped_mlp).

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
        out = project(rows, w.index(expert) if isinstance(w, QWeight) else pick(w))
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


# An expert whose weights pass this many bytes runs a few rows (2-4) as one matmul rather than a loop of matvecs: a
# matvec loop re-reads the expert once per row, which costs nothing while the expert stays in the CPU's cache and ~8%
# of a batch-8 decode step when it does not (measured on the shape sweep, bench/README: 16 experts of 768 x 1024,
# 9.4 MB, gain; 1.2-3.9 MB experts lose 5-20% the other way).
MATVEC_LOOP_MAX_BYTES = 6 << 20


def split_block(rows: int, num_experts: int, expert_bytes: int = 0) -> int:
    """Rows per matmul in ``experts_split``: 1 (a loop of matvecs, the fastest kernel on CPU for a few rows of a
    small expert) up to four rows per expert on average, else the power of two that holds them (at most 256); 4 for
    up to four rows of an expert of more than MATVEC_LOOP_MAX_BYTES. One block size: each size is a loop per expert
    to compile (grouped_mlp's four sizes tripled the first prefill's compile time)."""
    per_expert = -(-rows // num_experts)
    if per_expert <= 4:
        return 4 if expert_bytes > MATVEC_LOOP_MAX_BYTES and rows > num_experts else 1
    return int(min(256, 1 << (per_expert - 1).bit_length()))


def experts_split(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Sequence[jax.Array], down: Sequence[jax.Array],
    matvec_split: int = 1,
) -> jax.Array:
    """Routed experts with one (D, 2F) / (F, D) array per expert: no weight is copied, no expert is wasted, and
    the gradient of each expert is its own array. The (token, slot) pairs are sorted by expert and each expert runs
    its own rows in blocks of ``split_block`` rows (``grouped_mlp.grouped_mlp_split``)."""
    t, k = ids.shape
    d = x.shape[-1]
    expert_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((gate_up[0], down[0])))  # QWeight too
    chunks = (split_block(t * k, len(gate_up), expert_bytes),)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=len(gate_up)).astype(jnp.int32)
    rows = jnp.concatenate([jnp.take(x, order // k, axis=0), jnp.zeros((chunks[0], d), x.dtype)])
    out = grouped_mlp.grouped_mlp_split(rows, sizes, tuple(gate_up), tuple(down), chunks, matvec_split)
    return _combine(out[: t * k], order, weights)


EXPERT_BACKENDS: dict[str, Callable[..., jax.Array]] = {
    "ragged": experts_ragged,
    "gather": experts_gather,
    "blocked": experts_blocked,
    "dense": experts_dense,
    "pallas": experts_pallas,
    "megablox": experts_megablox,
    "tokamax": experts_tokamax,
}
PALLAS_BACKENDS = ("pallas", "megablox", "tokamax")  # take ``interpret``; under expert parallelism run ``ragged``


def available_backends() -> tuple[str, ...]:
    """The EXPERT_BACKENDS this installation runs: all but ``tokamax`` where tokamax is not installed."""
    return tuple(name for name in EXPERT_BACKENDS if name != "tokamax" or tokamax_installed())


class ExpertWeights(NamedTuple):
    """The routed experts' weights as a layer holds them: stacked (E, D, 2F) / (E, F, D) arrays, or (the ``unrolled``
    layout) a tuple of one (D, 2F) / (F, D) array per expert; and the LoRA pairs of the stacked ones, if any."""

    gate_up: jax.Array | tuple[jax.Array, ...]
    down: jax.Array | tuple[jax.Array, ...]
    lora: ExpertLora | None = None

    @property
    def count(self) -> int:
        return len(self.gate_up) if isinstance(self.gate_up, tuple) else self.gate_up.shape[0]


def choose_backend(requested: str, pairs: int, num_experts: int, platform_default: str, quantized: bool = False
                   ) -> str:
    """``requested``, or for ``auto``: ``gather`` when the (token, slot) pairs are no more than the experts (decode:
    it reads only the chosen experts and has no inner loop; quantized: up to four pairs per expert, as its fused
    int8 matvecs beat a dequantized copy of every expert), else the platform's choice."""
    if requested != "auto":
        return requested
    return "gather" if pairs <= num_experts * (4 if quantized else 1) else platform_default


def run_experts(x: jax.Array, weights: jax.Array, ids: jax.Array, experts: ExpertWeights, backend: str = "auto",
                platform_default: str = "ragged", mesh=None, ep_schedule: str = "auto",
                matvec_split: int = 1, interpret: bool | None = None) -> jax.Array:
    """The routed experts' output (T, D) for tokens ``x`` (T, D) routed to ``ids`` (T, k) with ``weights`` (T, k):
    the one entry point, whatever the weights' layout, the mesh or the LoRA pairs (see the module docstring).
    ``interpret``: run the Pallas backends in interpret mode (``Runtime.pallas_interpret``; None: ``detect()``'s)."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"unknown MoE backend '{backend}'; choose one of {', '.join(MOE_BACKENDS)}")
    if isinstance(experts.gate_up, tuple):
        if experts.lora is not None:
            raise ValueError("LoRA pairs for per-expert arrays: merge them, or run the stacked layout")
        return experts_split(x, weights, ids, experts.gate_up, experts.down, matvec_split)
    gate_up, down, lora = experts
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
        # Each shard runs its own experts with a backend that skips other shards' pairs: ragged or blocked. LoRA is
        # merged into the weights there (no LoRA dropout under expert parallelism).
        asked = platform_default if backend == "auto" else backend
        ragged = asked in ("ragged", *PALLAS_BACKENDS)
        local = experts_ragged if ragged else experts_blocked
        if lora is not None:  # quantized weights are dequantized to merge
            gate_up, down = (merge_expert_lora(gate_up, lora.gate_up, x.dtype),
                             merge_expert_lora(down, lora.down, x.dtype))
        return experts_expert_parallel(x, weights, ids, gate_up, down, mesh=mesh, backend=local, schedule=ep_schedule)
    chosen = choose_backend(backend, ids.size, experts.count, platform_default, isinstance(gate_up, QWeight))
    kernel = EXPERT_BACKENDS[chosen]
    if chosen in PALLAS_BACKENDS:
        kernel = functools.partial(kernel, interpret=interpret)
    return kernel(x, weights, ids, gate_up, down, lora)


MOE_BACKENDS = ("auto", *EXPERT_BACKENDS)
