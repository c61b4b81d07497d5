"""The slot pool's compiled programs: ``rows`` KV-cache rows of ``slots`` slots each, every row at its own slot.

Three kinds of program, and no others:

- ``admit``: ``n`` prompts prefilled together (an n-row cache of the pool's length, left-padded to one bucket with
  positions from the mask, by the Decoder's own ``inference.generation.prefill_cache``: image features computed
  once, prompts over the prefill chunk in chunks over the cache), their first tokens chosen, and the rows copied
  into the pool at the given rows (the batch axis, -4 of every cache leaf). One compilation per (prompt bucket, n)
  (and image batch shape): the engine batches text prompts in powers of two.
- ``step``: every row advances up to ``count`` tokens (``count`` traced, at most ``max_steps``: several tokens per
  host round trip) at its own slot (``index`` one per row: ``model.kv_cache.cache_write``), each with its own
  temperature / top-p / seed (``serve.sampling``). A row stops inside the program at an eos id or at its token
  budget (``limit``), exactly where the host's ``Generated`` ends it, so no row writes past its room. Idle rows
  rewrite their current slot and stay put. Compiled twice: for the pool's rows, and for a one-row pool where a lone
  running row decodes (``small``).
- ``move``: one row's state copied between the pool and the one-row pool (one compilation each way).

``traces`` counts the traces of each (a trace is a compilation): tests hold it after warm-up.
"""

from __future__ import annotations

import collections
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.inference.generation import PREFILL_CHUNK, prefill_cache
from aria_jax.model.aria import AriaModel
from aria_jax.model.kv_cache import KVCache, init_cache
from aria_jax.serve.sampling import select_rows


@flax.struct.dataclass
class PoolState:
    """Every row's decode state (donated to each program)."""

    cache: KVCache  # (..., rows, kv, *, slots)
    mask: jax.Array  # (rows, slots) int32: which slots of a row hold a token
    position: jax.Array  # (rows,) the last token's position
    index: jax.Array  # (rows,) the row's next slot
    token: jax.Array  # (rows,) the row's last token


@flax.struct.dataclass
class RowSampling:
    """One row's sampling: temperature (0: greedy), top_p, and its ``jax.random.key(seed)`` data (2,) uint32."""

    temperature: jax.Array
    top_p: jax.Array
    key: jax.Array


class SlotPool:
    """The compiled programs over one model's params and the pool state they advance (see the module docstring)."""

    def __init__(self, module: AriaModel, params, rows: int, slots: int, kv_int8: bool = False,
                 prefill_chunk: int = PREFILL_CHUNK, max_steps: int = 1, eos_ids: tuple[int, ...] = ()):
        self.module, self.params, self.rows, self.slots = module, params, rows, slots
        self.kv_int8, self.prefill_chunk, self.max_steps = kv_int8, prefill_chunk, max_steps
        self.eos_ids = tuple(eos_ids)
        self.traces: collections.Counter = collections.Counter()
        options = dict(module.runtime.decode_options)
        self._admit = jax.jit(self._admit_impl, donate_argnums=(1,))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,), compiler_options=options)
        self._move = jax.jit(self._move_impl, donate_argnums=(0,))
        self.reset()

    def reset(self) -> None:
        """Every row empty (and the one-row pool)."""
        self.state = self.empty()
        self.small = self.empty(1) if self.rows > 1 else None
        self.single: int | None = None  # the row whose state is in ``small`` (its row in ``state`` is stale)

    def empty(self, rows: int | None = None) -> PoolState:
        m, rows = self.module, self.rows if rows is None else rows
        cache = init_cache(m.config.text, rows, self.slots, m.dtype, m.layout != "stacked", self.kv_int8)
        zeros = lambda: jnp.zeros((rows,), jnp.int32)  # noqa: E731 (one buffer each: all are donated)
        return PoolState(cache, jnp.zeros((rows, self.slots), jnp.int32), zeros(), zeros(), zeros())

    def lost(self) -> bool:
        """Whether a failed program took the donated state with it (then every row must start again)."""
        return any(x.is_deleted() for x in jax.tree.leaves((self.state, self.small)))

    # -- programs ------------------------------------------------------------------------------------------
    def _admit_impl(self, params, state: PoolState, rows, ids, attention_mask, pixel_values, pixel_mask,
                    sampling: RowSampling):
        self.traces["admit"] += 1
        cache, logits, mask, position = prefill_cache(self.module, params, ids, attention_mask, pixel_values,
                                                      pixel_mask, cache_len=self.slots,
                                                      prefill_chunk=self.prefill_chunk, kv_int8=self.kv_int8)
        token = select_rows(logits, sampling.key, jnp.zeros((ids.shape[0],), jnp.int32), sampling.temperature,
                            sampling.top_p)
        index = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
        new = PoolState(cache, mask, position.astype(jnp.int32), index, token)
        for i in range(ids.shape[0]):  # prompt i into pool row rows[i]
            state = jax.tree.map(functools.partial(_copy_row, src_row=i, dst_row=rows[i]), state, new)
        return state, token

    def _one_step(self, params, state: PoolState, active, steps, sampling: RowSampling):
        mask = jax.vmap(lambda row, i: row.at[i].set(1))(state.mask, state.index)
        position = state.position + 1
        out = self.module.apply({"params": params}, state.token[:, None], mask, positions=position[:, None],
                                cache=state.cache, index=state.index, last_only=True)
        token = select_rows(out.logits[:, 0], sampling.key, steps, sampling.temperature, sampling.top_p)
        state = PoolState(
            cache=out.cache, mask=jnp.where(active[:, None], mask, state.mask),
            position=jnp.where(active, position, state.position),
            index=jnp.where(active, state.index + 1, state.index), token=jnp.where(active, token, state.token),
        )
        return state, token

    def _step_impl(self, params, state: PoolState, active, steps, limit, count, sampling: RowSampling):
        self.traces["step"] += 1
        eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        tokens = jnp.zeros((self.max_steps, state.index.shape[0]), jnp.int32)

        def body(j, carry):
            state, active, tokens = carry
            state, token = self._one_step(params, state, active, steps + j, sampling)
            tokens = tokens.at[j].set(token)
            ended = jnp.isin(token, eos) | (steps + j + 1 >= limit)
            return state, active & ~ended, tokens

        state, _, tokens = jax.lax.fori_loop(0, count, body, (state, active, tokens))
        return state, tokens

    def _move_impl(self, dst: PoolState, src: PoolState, dst_row, src_row) -> PoolState:
        self.traces["move"] += 1
        return jax.tree.map(functools.partial(_copy_row, src_row=src_row, dst_row=dst_row), dst, src)

    # -- host side -----------------------------------------------------------------------------------------
    def admit(self, rows, ids, attention_mask, pixel_values, pixel_mask, sampling: RowSampling) -> list[int]:
        """Prefill ``n`` prompts ((n, P) left-padded ids and mask, P a bucket; pixels of all their images) into pool
        rows ``rows`` (n ints), one program; ``sampling`` has (n,) fields. Returns their first tokens."""
        if self.single in list(rows):
            self.single = None  # its copy in the one-row pool is of a request that has gone
        self.state, tokens = self._admit(self.params, self.state, jnp.asarray(rows, jnp.int32), ids, attention_mask,
                                         pixel_values, pixel_mask, sampling)
        return [int(t) for t in jax.device_get(tokens)]

    def step(self, active, steps, limit, sampling: RowSampling, count: int = 1):
        """``count`` (<= ``max_steps``) tokens for every row ((rows,) numpy ``active``, ``steps``: tokens generated,
        ``limit``: the row's budget; per-row ``sampling``); returns (count, rows) tokens as numpy (a row's tokens
        after it ended, and those of idle rows, mean nothing).

        One running row runs in a pool of one row: a step of all rows costs several times a one-row step (every
        row's experts are read), so a lone request decodes as fast as ``Aria.chat``. The row's state moves there
        when it is the only one left, and back when another joins (one copy of a row each way)."""
        if not 1 <= count <= self.max_steps:
            raise ValueError(f"count {count} outside 1..{self.max_steps}")
        active, steps, limit = np.asarray(active), np.asarray(steps), np.asarray(limit)
        live = np.flatnonzero(active)
        if self.small is not None and len(live) == 1:
            row = int(live[0])
            if self.single != row:
                self._back()
                self.small = self._move(self.small, self.state, jnp.int32(0), jnp.int32(row))
                self.single = row
            pick = lambda x: np.asarray(x)[row:row + 1]  # noqa: E731
            self.small, tokens = self._step(self.params, self.small, pick(active), pick(steps), pick(limit),
                                            jnp.int32(count), jax.tree.map(pick, sampling))
            out = np.zeros((count, self.rows), np.int32)
            out[:, row] = jax.device_get(tokens)[:count, 0]
            return out
        self._back()
        self.state, tokens = self._step(self.params, self.state, active, steps, limit, jnp.int32(count), sampling)
        return jax.device_get(tokens)[:count]

    def _back(self) -> None:
        """The one-row pool's row back into its place in the pool."""
        if self.single is not None:
            self.state = self._move(self.state, self.small, jnp.int32(self.single), jnp.int32(0))
            self.single = None

def _copy_row(to: jax.Array, source: jax.Array, src_row, dst_row) -> jax.Array:
    """``to`` with its row ``dst_row`` set to row ``src_row`` of ``source`` (static or traced): the batch axis is -4
    of a cache leaf, else 0."""
    axis = to.ndim - 4 if to.ndim >= 4 else 0
    row = jax.lax.dynamic_slice_in_dim(source, src_row, 1, axis=axis).astype(to.dtype)
    return jax.lax.dynamic_update_slice_in_dim(to, row, dst_row, axis=axis)
