"""Autoregressive generation: a jitted prefill and a jitted decode loop over a preallocated KV cache.

Prompts are left-padded to a length bucket and the cache to a bucket of prompt + a power-of-two bucket of the new
tokens; ``max_new_tokens`` and ``min_new_tokens`` are traced values, so a new prompt length or a new token budget
rarely recompiles (``GenerationStats.compiles`` counts the programs a call compiled). Positions come from the
attention mask (``cumsum - 1``, padding at 0) as transformers' ``generate`` builds them; image features are computed
once, in the prefill (the vision tower in chunks of frames: ``AriaModel.image_features``).

Prompts longer than one prefill chunk (``prefill_chunk_tokens``) prefill chunk by chunk from the host: the vision
tower once (one program per image shape), then one compiled chunk program per cache length that merges the chunk's
image features and appends its keys and values to the cache, whatever the prompt's length (a chat whose prompt
grows turn by turn reuses it). A prompt whose image tokens do not fit the context fails first, naming the frame
count that fits (``inference/budget.py``).
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
from aria_jax.inference.compile_clock import compile_clock
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

def prefill_chunk_tokens(batch: int, heads: int, slots: int, limit: int = PREFILL_CHUNK, blockwise: bool = False
                         ) -> int:
    """The most prompt tokens one prefill chunk takes (see PREFILL_CHUNK above); ``blockwise``: the attention
    kernel holds no score array (``Runtime.attention`` ``flash``), so ``limit``."""
    if blockwise:
        return limit
    return min(limit, max(MIN_PREFILL_CHUNK, PREFILL_SCORE_BYTES // (batch * heads * slots * 4)))


def prefill_cache(module: AriaModel, params, input_ids: jax.Array, attention_mask: jax.Array, pixel_values,
                  pixel_mask, *, cache_len: int, prefill_chunk: int = PREFILL_CHUNK, kv_int8: bool = False
                  ) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """A prompt (B, P) run into a fresh cache of ``cache_len`` slots, inside one program: (cache, the last prompt
    token's logits (B, V), the cache mask (B, cache_len), the last prompt position (B,)). A prompt longer than
    ``prefill_chunk_tokens`` allows runs in ceil(P / most) equal chunks: all but the last in a loop, then the last,
    ending at P (when they do not divide P, it overlaps the one before and rewrites its keys with the same values)."""
    b, p = input_ids.shape
    positions = jnp.where(attention_mask > 0, jnp.cumsum(attention_mask, axis=1) - 1, 0)
    cache = init_cache(module.config.text, b, cache_len, module.dtype, module.layout != "stacked", kv_int8)
    mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(attention_mask)
    most = prefill_chunk_tokens(b, module.config.text.num_attention_heads, cache_len, prefill_chunk,
                                module.runtime.attention == "flash")
    if p <= most:
        output = module.apply({"params": params}, input_ids, mask, pixel_values, pixel_mask, positions=positions,
                              cache=cache, index=0, last_only=True)  # index a Python int: a kernel may skip the cache
        return output.cache, output.logits[:, 0], mask, positions[:, -1]
    count = -(-p // most)
    chunk = -(-p // count)
    embeds = module.apply({"params": params}, input_ids, pixel_values, pixel_mask, method="embed")

    def decode(start, cache, last_only: bool):
        piece = jax.lax.dynamic_slice_in_dim(embeds, start, chunk, axis=1)
        where = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
        return module.apply({"params": params}, piece, where, mask, cache, start, last_only, last_only,
                            method=lambda module, *args: module.language_model(*args))

    cache = jax.lax.fori_loop(0, count - 1, lambda i, cache: decode(i * chunk, cache, False)[3], cache)
    _, logits, _, cache = decode(p - chunk, cache, True)
    return cache, logits[:, 0], mask, positions[:, -1]


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """``n`` rounded up to a quarter of its power of two (16, 20, 24, 28, 32, 40, ... 128, 160, 192, ...), at least
    ``minimum``: four compiled lengths per octave, at most 25% padding (a power-of-two bucket wastes up to 50%)."""
    n = max(int(n), minimum)
    step = max(1, (1 << (n - 1).bit_length()) // 8)
    return -(-n // step) * step


MIN_NEW_BUCKET = 32


def new_tokens_bucket(n: int) -> int:
    """The decode loop's output buffer (and the cache's room for new tokens): ``n`` rounded up to a power of two,
    at least MIN_NEW_BUCKET, so ``max_new_tokens`` 1 and 32 share one compiled loop and cache length."""
    return max(MIN_NEW_BUCKET, 1 << (max(int(n), 1) - 1).bit_length())


def cache_slots(prompt_bucket: int, max_new: int) -> int:
    """KV cache slots for a prompt padded to ``prompt_bucket`` tokens and up to ``max_new`` new ones: a quarter
    octave bucket, so a prompt growing by chat turns keeps its cache length (and with it the compiled chunk and
    decode programs) within 25%. (A power of two kept them longer but made a decode step read up to twice the
    slots: at 4,096 tokens of context 2.3x transformers' speed instead of ~3x; a decode that reads only the filled
    blocks was slower still on CPU: model/attention.py.)"""
    return bucket(prompt_bucket + new_tokens_bucket(max_new))


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    compiles: int = 0  # programs this call compiled (prefill, chunk, vision, decode): 0 once warm
    compile_s: float = 0.0  # seconds this call spent tracing, lowering and compiling (included in the times above)
    prefill_chunks: int = 0  # 0: the prompt prefilled in one program

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second over the whole batch, excluding the prefill."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return (f"prefill {self.prefill_ms:.1f} ms ({self.prompt_tokens} prompt tokens), "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_s:.1f} tok/s, "
                f"{self.compiles} compiled ({self.compile_s:.1f} s)")


@dataclasses.dataclass(frozen=True)
class StopRule:
    """What ends a row: an eos id (after ``min_new`` tokens), or ``max_new`` tokens. The compiled programs take
    ``compiled_rule()`` (static) and the two counts as traced values (``DecodeState.limit`` / ``min_new``)."""

    eos_ids: tuple[int, ...]
    pad_id: int
    max_new: int
    min_new: int = 0

    def compiled_rule(self) -> StopRule:
        """The static part: eos and pad ids, and the output buffer's length (``new_tokens_bucket``)."""
        return StopRule(self.eos_ids, self.pad_id, new_tokens_bucket(self.max_new))


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
    out: jax.Array  # (B, rule.max_new) the generated tokens, pad after a row stops (a bucket: ``limit`` is used)
    key: jax.Array  # the sampling PRNG key (folded with the step)
    limit: jax.Array  # () int32: the new tokens asked for (max_new_tokens <= out's length)
    min_new: jax.Array  # () int32: no eos before this many tokens


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
        self._chunk = jax.jit(self._chunk_impl, donate_argnums=(1,))
        self._features = jax.jit(self._features_impl)
        self._begin = jax.jit(self._begin_impl, static_argnames=("sampling", "rule"), donate_argnums=(0,))
        self._init_cache = jax.jit(init_cache, static_argnums=(0, 1, 2, 3, 4, 5))

    def programs(self) -> int:
        """Compiled programs held (every jitted function's cache entries): what ``GenerationStats.compiles``
        counts the growth of."""
        jitted = (self._prefill, self._step, self._loop, self._chunk, self._features, self._begin, self._init_cache)
        return sum(f._cache_size() for f in jitted if hasattr(f, "_cache_size"))  # (a test may wrap one)

    # -- pure pieces ---------------------------------------------------------------------------------------
    def _emit(self, state: DecodeState, logits: jax.Array, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        """Pick the next token from (B, V) logits, record it, update which rows are done."""
        step = state.step
        if rule.eos_ids:
            eos = jnp.asarray(rule.eos_ids)
            logits = jnp.where(step < state.min_new, logits.at[:, eos].set(-jnp.inf), logits)
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

    def _prefill_impl(self, params, input_ids, attention_mask, pixel_values, pixel_mask, key, limit=None,
                      min_new=None, *, cache_len: int, sampling: SamplingConfig, rule: StopRule,
                      kv_int8: bool = False) -> DecodeState:
        cache, logits, mask, position = prefill_cache(
            self.module, params, input_ids, attention_mask, pixel_values, pixel_mask, cache_len=cache_len,
            prefill_chunk=self.prefill_chunk, kv_int8=kv_int8)
        return self._begin_impl(cache, mask, position, jnp.int32(input_ids.shape[1]), logits, key, limit, min_new,
                                sampling=sampling, rule=rule)

    def _begin_impl(self, cache, mask, position, index, logits, key, limit=None, min_new=None, *,
                    sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        """The decode state after a prefill, with its first token chosen from the last prompt token's ``logits``."""
        b = mask.shape[0]
        state = DecodeState(
            cache=cache, mask=mask, position=position, index=index,
            token=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), step=jnp.int32(0),
            out=jnp.full((b, rule.max_new), rule.pad_id, jnp.int32), key=key,
            limit=jnp.int32(rule.max_new) if limit is None else jnp.asarray(limit, jnp.int32),
            min_new=jnp.int32(rule.min_new) if min_new is None else jnp.asarray(min_new, jnp.int32),
        )
        return self._emit(state, logits, sampling, rule)

    def _chunk_impl(self, params, cache, mask, input_ids, positions, start, features, before):
        """One prefill chunk from the host: ``input_ids`` (B, C) at cache slot ``start`` (traced), their image
        tokens taking rows ``before[b]``, ``before[b] + 1``, ... of ``features`` (F, D) (None: no image); returns
        the cache and the chunk's last logits (B, V). One program per cache length, whatever the prompt length."""

        def run(module: AriaModel):
            embeds = module.language_model.embed(input_ids)
            if features is not None:
                is_image = input_ids == module.config.image_token_id
                row = jnp.clip(before[:, None] + jnp.cumsum(is_image, axis=1, dtype=jnp.int32) - 1, 0,
                               features.shape[0] - 1)
                embeds = jnp.where(is_image[..., None], jnp.take(features, row, axis=0).astype(embeds.dtype), embeds)
            _, logits, _, new_cache = module.language_model(embeds, positions, mask, cache, start, True, True)
            return new_cache, logits[:, 0]

        return self.module.apply({"params": params}, method=run)

    def _features_impl(self, params, pixel_values, pixel_mask):
        """Every image's features, flattened (N * Q, D): one program per image shape."""
        features = self.module.apply({"params": params}, pixel_values, pixel_mask, method="image_features")
        return features.reshape(-1, features.shape[-1])

    def _step_impl(self, params, state: DecodeState, *, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        logits, state = self._advance(params, state)
        return self._emit(state, logits, sampling, rule)

    def _loop_impl(self, params, state: DecodeState, *, sampling: SamplingConfig, rule: StopRule) -> DecodeState:
        def running(s):
            return (s.step < s.limit) & ~jnp.all(s.done)

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
        stats = GenerationStats(prompt_tokens=int(attention_mask.sum()))
        programs, clock = self.programs(), compile_clock()
        compiled = rule.compiled_rule()
        chunk = self._chunk_tokens(b, bucket(t), rule.max_new)
        p = bucket(t) if t <= chunk else -(-t // chunk) * chunk  # chunked: whole chunks
        pad = p - t  # extra left padding: masked, so the result is unchanged
        ids = np.concatenate([np.full((b, pad), rule.pad_id, np.int32), input_ids.astype(np.int32)], axis=1)
        mask = np.concatenate([np.zeros((b, pad), np.int32), attention_mask.astype(np.int32)], axis=1)
        cache_len = cache_slots(p, rule.max_new)
        start = time.perf_counter()
        counts = (np.int32(rule.max_new), np.int32(rule.min_new))
        if p <= chunk:
            inputs = [self._put(x) for x in (ids, mask, pixel_values, pixel_mask, jax.random.key(seed), *counts)]
            state = self._prefill(params, *inputs, cache_len=cache_len, sampling=sampling, rule=compiled,
                                  kv_int8=kv_cache == "int8")
        else:
            state = self._prefill_chunks(params, ids, mask, pixel_values, pixel_mask, seed, counts, chunk,
                                         cache_len, sampling, compiled, kv_cache == "int8")
            stats.prefill_chunks = p // chunk
        jax.block_until_ready(state.token)
        stats.prefill_ms = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        if stop_check is None and not stream:
            state = self._loop(params, state, sampling=sampling, rule=compiled)
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
                state = self._step(params, state, sampling=sampling, rule=compiled)
        out = self._get(state.out)[:, : int(self._get(state.step))]
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = int(sum(generated_length(row, rule) for row in out))
        stats.compiles, stats.compile_s = self.programs() - programs, clock()
        return out, stats

    def _chunk_tokens(self, batch: int, prompt_bucket: int, max_new: int) -> int:
        """Prompt tokens per prefill chunk (``prefill_chunk_tokens`` for the cache this prompt takes)."""
        slots = cache_slots(prompt_bucket, max_new)
        return prefill_chunk_tokens(batch, self.module.config.text.num_attention_heads, slots, self.prefill_chunk,
                                    self.module.runtime.attention == "flash")

    def _prefill_chunks(self, params, ids, mask, pixel_values, pixel_mask, seed, counts, chunk, cache_len,
                        sampling, rule, kv_int8) -> DecodeState:
        """The prompt (B, P), P a multiple of ``chunk``, through one compiled chunk program chunk by chunk."""
        b, p = ids.shape
        cfg = self.module.config
        features, before = None, np.zeros((b, p // chunk), np.int32)
        if pixel_values is not None:
            features = self._features(params, *(self._put(x) for x in (pixel_values, pixel_mask)))
            # the feature row each chunk's first image token takes: rows' images are consecutive from image 0
            is_image = (ids == cfg.image_token_id).astype(np.int32)
            taken = np.cumsum(is_image.reshape(-1)).reshape(b, p) - is_image  # image tokens before each token
            before = taken[:, ::chunk]
        positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        full = np.zeros((b, cache_len), np.int32)
        full[:, :p] = mask
        full = self._put(full)
        cache = self._init_cache(cfg.text, b, cache_len, self.module.dtype, self.module.layout != "stacked", kv_int8)
        for i in range(p // chunk):
            piece = slice(i * chunk, (i + 1) * chunk)
            cache, logits = self._chunk(params, cache, full, self._put(ids[:, piece]), self._put(positions[:, piece]),
                                        self._put(np.int32(i * chunk)), features, self._put(before[:, i]))
        return self._begin(cache, full, self._put(positions[:, -1]), self._put(np.int32(p)), logits,
                           self._put(jax.random.key(seed)), *(self._put(c) for c in counts),
                           sampling=sampling, rule=rule)

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

