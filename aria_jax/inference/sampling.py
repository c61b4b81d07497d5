"""Next-token selection from logits: greedy, or temperature / top-k / top-p sampling (transformers' order)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not 0 < self.temperature < math.inf:  # NaN fails too
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus), as transformers' logits warpers; removed entries get -inf."""
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)  # ascending
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Drop the low tail whose total probability is <= 1 - top_p, but always keep the most likely token.
        remove = cumulative <= 1.0 - cfg.top_p
        remove = remove.at[..., -1].set(False)
        threshold = jnp.max(jnp.where(remove, sorted_logits, -jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits <= threshold, -jnp.inf, logits)
    return logits


def select_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """(B, V) logits -> (B,) token ids."""
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
