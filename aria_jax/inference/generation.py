"""Autoregressive generation: a jitted prefill and a jitted decode loop over a preallocated KV cache.

Prompts are left-padded to a length bucket and the cache to a bucket of prompt + new tokens, so a new prompt
length rarely recompiles. Positions come from the attention mask (``cumsum - 1``, padding at 0) as transformers'
``generate`` builds them; image features are computed once, in the prefill (the vision tower in chunks of frames:
``AriaModel.image_features``). Prompts longer than ``PREFILL_CHUNK`` tokens (video) prefill in chunks over the KV
cache, so the prefill's temporaries are bounded by the chunk, not the prompt; a prompt whose image tokens do not fit
the context fails first, naming the frame count that fits (``inference/budget.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.inference.budget import check_prompt_budget
from aria_jax.inference.sampling import SamplingConfig, select_tokens
from aria_jax.model.aria import AriaModel
from aria_jax.model.kv_cache import KVCache, init_cache
from aria_jax.parallel import distributed

MIN_BUCKET = 16
# Prompts longer than PREFILL_CHUNK tokens prefill in chunks over the KV cache (a lax.fori_loop), so the decoder's
# attention scores and expert activations are (chunk x cache slots) however long the prompt (video): at most
# PREFILL_CHUNK tokens, fewer when one chunk's float32 scores (batch x heads x chunk x slots) would pass
# PREFILL_SCORE_BYTES, never fewer than MIN_PREFILL_CHUNK.
PREFILL_CHUNK = 1024
PREFILL_SCORE_BYTES = 64 << 20
MIN_PREFILL_CHUNK = 128

def prefill_chunk_tokens(batch: int, heads: int, slots: int, limit: int = PREFILL_CHUNK) -> int:
    """The most prompt tokens one prefill chunk takes (see PREFILL_CHUNK above)."""
    return min(limit, max(MIN_PREFILL_CHUNK, PREFILL_SCORE_BYTES // (batch * heads * slots * 4)))


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """``n`` rounded up to a quarter of its power of two (16, 20, 24, 28, 32, 40, ... 128, 160, 192, ...), at least
    ``minimum``: four compiled lengths per octave, at most 25% padding (a power-of-two bucket wastes up to 50%)."""
    n = max(int(n), minimum)
    step = max(1, (1 << (n - 1).bit_length()) // 8)
    return -(-n // step) * step


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second over the whole batch, excluding the prefill."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return (f"prefill {self.prefill_ms:.1f} ms ({self.prompt_tokens} prompt tokens), "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_s:.1f} tok/s")


@dataclasses.dataclass(frozen=True)
class StopRule:
    """What ends a row: an eos id (after ``min_new`` tokens), or ``max_new`` tokens."""

    eos_ids: tuple[int, ...]
    pad_id: int
    max_new: int
    min_new: int = 0


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes, as one pytree (donated to the compiled loop)."""

    cache: KVCache  # the keys and values of every layer (aria_jax.model.kv_cache)
    mask: jax.Array  # (B, S) int32: which cache slots hold a (non-padding) token
    position: jax.Array  # (B,) the last token's position (RoPE), counted without left padding
    index: jax.Array  # () the next cache slot
    token: jax.Array  # (B,) the last chosen token
    done: jax.Array  # (B,) bool: rows that stopped (eos, or a stop string seen by the host)
    step: jax.Array  # () tokens generated so far
    out: jax.Array  # (B, max_new) the generated tokens, pad after a row stops
    key: jax.Array  # the sampling PRNG key (folded with the step)


class Decoder:
    """Compiled prefill / decode functions for one model; reused across calls (compiles once per bucket). The decode
    loop compiles with the runtime's XLA options (``Runtime.decode_options``)."""

    def __init__(self, module: AriaModel, prefill_chunk: int = PREFILL_CHUNK):
        self.module = module
        self.prefill_chunk = prefill_chunk
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "sampling", "rule", "kv_int8"))
        options = dict(module.runtime.decode_options)
        self._step = jax.jit(self._step_impl, static_argnames=("sampling", "rule"), donate_argnums=(1,),
                             compiler_options=options)
        self._loop = jax.jit(self._loop_impl, static_argnames=("sampling", "rule"), donate_argnums=(1,),
                             compiler_options=options)

    # -- pure pieces ---------------------------------------------------------------------------------------
    def _emit(self, state: DecodeState, logits: jax.Array, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        """Pick the next token from (B, V) logits, record it, update which rows are done."""
        step = state.step
        if rule.eos_ids and rule.min_new:
            eos = jnp.asarray(rule.eos_ids)
            logits = jnp.where(step < rule.min_new, logits.at[:, eos].set(-jnp.inf), logits)
        token = select_tokens(logits, jax.random.fold_in(state.key, step), sampling)
        token = jnp.where(state.done, rule.pad_id, token)
        done = state.done | jnp.isin(token, jnp.asarray(rule.eos_ids or (-1,)))
        out = jax.lax.dynamic_update_index_in_dim(state.out, token, step, axis=1)
        return state.replace(token=token, done=done, out=out, step=step + 1)

    def _advance(self, params, state: DecodeState) -> tuple[jax.Array, DecodeState]:
        """Feed the last token through the decoder at the next cache slot; returns its logits."""
        index = state.index
        mask = jax.lax.dynamic_update_index_in_dim(state.mask, jnp.ones_like(state.token), index, axis=1)
        position = state.position + 1
        output = self.module.apply(
            {"params": params}, state.token[:, None], mask, positions=position[:, None],
            cache=state.cache, index=index, last_only=True,
        )
        state = state.replace(cache=output.cache, mask=mask, position=position, index=index + 1)
        return output.logits[:, 0], state

    def _prefill_impl(self, params, input_ids, attention_mask, pixel_values, pixel_mask, key, *,
                      cache_len: int, sampling: SamplingConfig, rule: StopRule, kv_int8: bool = False) -> DecodeState:
        b, p = input_ids.shape
        positions = jnp.where(attention_mask > 0, jnp.cumsum(attention_mask, axis=1) - 1, 0)
        per_layer = self.module.layout != "stacked"
        cache = init_cache(self.module.config.text, b, cache_len, self.module.dtype, per_layer, kv_int8)
        mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(attention_mask)
        most = prefill_chunk_tokens(b, self.module.config.text.num_attention_heads, cache_len, self.prefill_chunk)
        if p <= most:
            output = self.module.apply(
                {"params": params}, input_ids, mask, pixel_values, pixel_mask, positions=positions,
                cache=cache, index=0, last_only=True,  # a Python int: a kernel may skip the cache
            )
            cache, logits = output.cache, output.logits
        else:  # ceil(p / most) equal chunks: all but the last in a loop, then the last one, ending at p (when
            # they do not divide p, it overlaps the one before and rewrites its keys with the same values)
            count = -(-p // most)
            chunk = -(-p // count)
            embeds = self.module.apply({"params": params}, input_ids, pixel_values, pixel_mask, method="embed")

            def decode(start, cache, last_only: bool):
                piece = jax.lax.dynamic_slice_in_dim(embeds, start, chunk, axis=1)
                where = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
                return self.module.apply(
                    {"params": params}, piece, where, mask, cache, start, last_only, last_only,
                    method=lambda module, *args: module.language_model(*args),
                )

            cache = jax.lax.fori_loop(
                0, count - 1, lambda i, cache: decode(i * chunk, cache, False)[3], cache
            )
            _, logits, _, cache = decode(p - chunk, cache, True)
        state = DecodeState(
            cache=cache, mask=mask, position=positions[:, -1], index=jnp.int32(p),
            token=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), step=jnp.int32(0),
            out=jnp.full((b, rule.max_new), rule.pad_id, jnp.int32), key=key,
        )
        return self._emit(state, logits[:, 0], sampling, rule)

    def _step_impl(self, params, state: DecodeState, *, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        logits, state = self._advance(params, state)
        return self._emit(state, logits, sampling, rule)

    def _loop_impl(self, params, state: DecodeState, *, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        def running(s):
            return (s.step < rule.max_new) & ~jnp.all(s.done)

        return jax.lax.while_loop(running, lambda s: self._step_impl(params, s, sampling=sampling, rule=rule), state)

    # -- host <-> devices ----------------------------------------------------------------------------------
    def _put(self, x):
        """A host value (the same on every process) onto a multi-host mesh, replicated; else as it is."""
        mesh = self.module.mesh
        if x is None or not distributed.spans_processes(mesh):
            return x
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(distributed.replicate(mesh, jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return distributed.replicate(mesh, x)

    @staticmethod
    def _get(x) -> np.ndarray:
        """A device value as numpy on every process (gathered when it spans processes)."""
        return distributed.to_host(x)

    # -- driver --------------------------------------------------------------------------------------------
    def iterate(
        self,
        params,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray | None,
        pixel_mask: np.ndarray | None,
        sampling: SamplingConfig,
        rule: StopRule,
        seed: int = 0,
        stop_check: Callable[[np.ndarray], bool] | None = None,
        stream: bool = False,
        kv_cache: str = "float",
    ) -> Generator[np.ndarray, None, tuple[np.ndarray, GenerationStats]]:
        """Yields each step's (B,) tokens when ``stream``; returns (new tokens (B, n), stats).

        ``kv_cache``: "float" (the model's dtype) or "int8" (``init_cache(kv_int8=True)``).

        Without ``stream`` or ``stop_check`` the whole decode runs in one compiled while-loop; otherwise the host
        looks at every token (``stop_check(row_tokens) -> bool`` marks a row done, e.g. on a stop string).
        """
        b, t = input_ids.shape
        cfg = self.module.config
        check_prompt_budget(cfg, input_ids, pixel_values, rule.max_new)  # before anything is traced
        p = bucket(t)
        pad = p - t  # extra left padding up to the bucket: masked, so the result is unchanged
        ids = np.concatenate([np.full((b, pad), rule.pad_id, np.int32), input_ids.astype(np.int32)], axis=1)
        mask = np.concatenate([np.zeros((b, pad), np.int32), attention_mask.astype(np.int32)], axis=1)
        stats = GenerationStats(prompt_tokens=int(attention_mask.sum()))
        start = time.perf_counter()
        inputs = [self._put(x) for x in (ids, mask, pixel_values, pixel_mask, jax.random.key(seed))]
        state = self._prefill(params, *inputs, cache_len=bucket(p + rule.max_new), sampling=sampling, rule=rule,
                              kv_int8=kv_cache == "int8")
        jax.block_until_ready(state.token)
        stats.prefill_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        if stop_check is None and not stream:
            state = self._loop(params, state, sampling=sampling, rule=rule)
        else:
            while True:
                step = int(self._get(state.step))
                if stream:
                    yield self._get(state.token)
                done = self._get(state.done)
                if stop_check is not None:
                    out = self._get(state.out)[:, :step]
                    stopped = done | np.array([stop_check(out[i]) for i in range(b)])
                    if (stopped != done).any():
                        multi = distributed.spans_processes(self.module.mesh)
                        state = state.replace(done=self._put(stopped) if multi else jnp.asarray(stopped))
                        done = stopped
                if step >= rule.max_new or done.all():
                    break
                state = self._step(params, state, sampling=sampling, rule=rule)
        out = self._get(state.out)[:, : int(self._get(state.step))]
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = int(sum(generated_length(row, rule) for row in out))
        return out, stats

    def run(self, *args, **kwargs) -> tuple[np.ndarray, GenerationStats]:
        """``iterate`` without streaming: (new tokens (B, n), stats)."""
        it = self.iterate(*args, **kwargs)
        while True:
            try:
                next(it)
            except StopIteration as finished:
                return finished.value


def generated_length(row: np.ndarray, rule: StopRule) -> int:
    """Tokens a row really generated: up to and including its first eos, else all of them."""
    hits = np.flatnonzero(np.isin(row, rule.eos_ids)) if rule.eos_ids else []
    return int(hits[0]) + 1 if len(hits) else len(row)


def stop_string_checker(decode: Callable[[Sequence[int]], str], stop_strings: Sequence[str]):
    """``new_tokens -> bool``: True once a stop string ends inside the newest token's text."""
    stops = [s for s in stop_strings if s]

    def check(tokens: np.ndarray) -> bool:
        tokens = [int(t) for t in tokens]
        if not tokens:
            return False
        text = decode(tokens)
        before = len(decode(tokens[:-1])) if len(tokens) > 1 else 0
        return any(text.find(s, max(0, before - len(s) + 1)) >= 0 for s in stops)

    return check

