"""Text self-attention: RoPE, causal + padding masks, GQA/MHA, over the whole sequence (the kernel
``Runtime.attention`` picks: aria_jax.kernels.attention) or a KV cache (einsums over the cache's layouts)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.kernels.attention import attention, masked_softmax
from aria_jax.kernels.matmul import project
from aria_jax.model.kv_cache import LayerCache, cache_read, cache_write
from aria_jax.model.layers import lora_delta, weight
from aria_jax.quant import Holding


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin (B, T, head_dim) computed in float32, then cast to the activation dtype as transformers does."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponent)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved rotary embedding on (B, T, N, H): ``x*cos + rotate_half(x)*sin``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def causal_mask(attention_mask: jax.Array | None, batch: int, q_len: int, kv_len: int, offset: int = 0) -> jax.Array:
    """(B, 1, Tq, Tk) boolean: causal (query i at absolute position offset+i) and not a padded key. ``offset``: a
    scalar, or one per row (B,) (rows written at their own cache slots: ``cache_write``)."""
    q_pos = jnp.asarray(offset)[..., None] + jnp.arange(q_len)  # (Tq) or (B, Tq)
    causal = q_pos[..., None] >= jnp.arange(kv_len)
    mask = jnp.broadcast_to(causal, (batch, q_len, kv_len))
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :kv_len].astype(bool)
    return mask[:, None]


class Attention(nn.Module):
    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    matvec_split: int = 1  # Runtime.matvec_split (kernels.matmul.project)
    quant: Holding | None = None  # quantized q/k/v/o kernels (Runtime.holding)
    attention: str = "einsum"  # Runtime.attention: the kernel without a KV cache (aria_jax.kernels.attention)

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
        index=None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Self-attention over ``x``, or, given a KV cache, over the cache with ``x``'s keys written at ``index``."""
        cfg = self.config
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qt = self.quant
        wq = weight(self, "q_kernel", (d, nh, hd), ("embed", "q_heads", "head_dim"), self.dtype, qt)
        wk = weight(self, "k_kernel", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), self.dtype, qt)
        wv = weight(self, "v_kernel", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), self.dtype, qt)
        wo = weight(self, "o_kernel", (nh, hd, d), ("q_heads", "head_dim", "embed"), self.dtype, qt, n_in=2)
        split = self.matvec_split
        q = apply_rope(project(x, wq, split=split) + lora_delta(self, "q_kernel", x, 1), cos, sin)
        k = apply_rope(project(x, wk, split=split) + lora_delta(self, "k_kernel", x, 1), cos, sin)
        v = project(x, wv, split=split) + lora_delta(self, "v_kernel", x, 1)
        if cache is not None and _prefill_from_start(cache, index, self.attention):
            # its queries read only its own keys (the cache's later slots are later than every query): the kernel
            # runs over them, rounded to the cache's dtype as the cached path reads them
            cache = cache_write(cache, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), 0)
            k, v = k.astype(cache.k.dtype).astype(q.dtype), v.astype(cache.v.dtype).astype(q.dtype)
            out = _attend(q, k, v, mask[..., : x.shape[1]], self.attention)
        elif cache is not None:
            out, cache = _attend_cached(q, k, v, mask, cache, index)
        else:
            out = _attend(q, k, v, mask, self.attention)
        return project(out, wo, 2, split=split) + lora_delta(self, "o_kernel", out, 2), cache


def _prefill_from_start(cache: LayerCache, index, implementation: str) -> bool:
    """A prefill written from slot 0 (``index`` the Python int 0, known when tracing) into a float cache, with a
    kernel other than ``einsum`` (which keeps the cached form below, tuned on CPU)."""
    return implementation != "einsum" and cache.k_scale is None and isinstance(index, int) and index == 0


def _attend_cached(q, k, v, mask, cache, index):
    """Attention over the KV cache after writing ``k``, ``v`` at ``index``."""
    cache = cache_write(cache, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), index)  # the cache's layouts
    k, v = cache_read(cache, q.dtype)
    b, t, nh, hd = q.shape
    nkv = k.shape[1]
    # Query head n uses kv head n // (nh / nkv), as transformers' repeat_kv.
    q = q.reshape(b, t, nkv, nh // nkv, hd)
    scores = jnp.einsum("btkgh,bkhs->bkgts", q, k) * (hd**-0.5)
    probs = masked_softmax(scores, mask[:, :, None], q.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, nh, hd), cache


def _attend(q, k, v, mask, implementation: str = "einsum"):
    """Attention without a cache (prefill of a whole sequence, training) through the kernel ``Runtime.attention``
    picks. The decoder's mask is causal & padding: its last query row reads every key the padding allows."""
    return attention(q, k, v, mask[:, 0, -1, :], causal=True, implementation=implementation)
