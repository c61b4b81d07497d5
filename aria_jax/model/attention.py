"""Text self-attention: RoPE, causal + padding masks, GQA/MHA, over the whole sequence (the kernel
``Runtime.attention`` picks: aria_jax.kernels.attention) or a KV cache (einsums over the cache's layouts)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig
from aria_jax.kernels.attention import attention, masked_softmax
from aria_jax.kernels.flash_attention import flash_attention
from aria_jax.kernels.matmul import project
from aria_jax.model.kv_cache import LayerCache, cache_read, cache_round, cache_write
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
        if cache is not None and isinstance(index, int) and index == 0:
            # a prefill written from slot 0 (``index`` the Python int 0, known when tracing): its queries read only
            # its own keys (the cache's later slots are later than every query), rounded to the cache's storage as
            # the cached path reads them, through the attention kernel
            k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
            k_seen, v_seen = cache_round(cache, k_new, v_new, q.dtype)
            cache = cache_write(cache, k_new, v_new, 0)
            out = _attend(q, k_seen.transpose(0, 2, 1, 3), v_seen.transpose(0, 3, 1, 2), mask[..., : x.shape[1]],
                          self.attention)
        elif cache is not None and self.attention == "flash" and x.shape[1] > 1 and jnp.ndim(index) == 0:
            out, cache = _attend_chunk(q, k, v, mask, cache, index)
        elif cache is not None:
            out, cache = _attend_cached(q, k, v, mask, cache, index)
        else:
            out = _attend(q, k, v, mask, self.attention)
        return project(out, wo, 2, split=split) + lora_delta(self, "o_kernel", out, 2), cache


def _attend_cached(q, k, v, mask, cache, index):
    """Attention over the KV cache and the new keys ``k``, ``v`` (B, T, K, H) at slots ``index`` .. ``index + T``;
    returns the output and the cache with them written.

    The scores are computed over the cache as it was (its slots before ``index``) and over the new keys, each in its
    own matmul: the written cache is then only the step's output, so XLA writes it in place. Reading the written
    cache instead made XLA:CPU fuse the write into both of its users, with two private copies of every layer's
    cache per step (most of a long-context decode step). The new keys and values are rounded to the cache's
    storage (dtype, int8) first, so a later step reads exactly what this one used.

    Every slot is read, filled or not (masked): on XLA:CPU a loop over only the filled blocks of the cache ran
    2.5x slower per token than this one read of all of them (4,096-token context, 8,192 slots), so the cache's
    length follows the prompt in quarter-octave buckets instead (inference/generation.py ``cache_slots``)."""
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # the cache's layouts: (B,K,T,H), (B,K,H,T)
    old_k, old_v = cache_read(cache, q.dtype)
    k_seen, v_seen = cache_round(cache, k_new, v_new, q.dtype)
    slots = mask.shape[-1]
    index = jnp.asarray(index)
    rows = index.reshape(-1, 1, 1, 1)  # (1 or B, 1, 1, 1)
    old_mask = mask & (jnp.arange(slots) < rows)  # slots written before this call
    if index.ndim:
        new_mask = jax.vmap(lambda m, i: jax.lax.dynamic_slice_in_dim(m, i, t, axis=2))(mask, index)
    else:
        new_mask = jax.lax.dynamic_slice_in_dim(mask, index, t, axis=3)
    # Query head n uses kv head n // (nh / nkv), as transformers' repeat_kv.
    q = q.reshape(b, t, nkv, nh // nkv, hd)
    scale = hd**-0.5
    scores = jnp.concatenate([jnp.einsum("btkgh,bksh->bkgts", q, old_k) * scale,
                              jnp.einsum("btkgh,bkuh->bkgtu", q, k_seen) * scale], axis=-1)
    probs = masked_softmax(scores, jnp.concatenate([old_mask, new_mask], axis=-1)[:, :, None], q.dtype)
    out = (jnp.einsum("bkgts,bkhs->btkgh", probs[..., :slots], old_v)
           + jnp.einsum("bkgtu,bkhu->btkgh", probs[..., slots:], v_seen))
    # The write must follow every read of the old cache for XLA to do it in place; with no data dependency between
    # them XLA:CPU copies the cache (twice) instead. An optimization barrier does not order them (it is gone before
    # copy insertion); a dependency on the output does: + 0 * one output value (finite: the probabilities' convex
    # combination of cached values), which XLA keeps (it does not fold x * 0 for floats).
    after = (out.reshape(-1)[0] * 0).astype(k_new.dtype)
    return out.reshape(b, t, nh, hd), cache_write(cache, k_new + after, v_new + after, index)


def _attend_chunk(q, k, v, mask, cache, index):
    """A prefill chunk (T > 1 queries at slot ``index``, traced) over the KV cache with the blockwise kernel: the
    chunk's keys are written first, then its queries read the cache's key blocks up to ``index + T`` only (causal),
    so each chunk costs its share of the causal work, not the whole cache's. One program for every offset."""
    t = q.shape[1]
    cache = cache_write(cache, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1), index)
    keys, values = cache_read(cache, q.dtype)  # (B, K, S, H), (B, K, H, S)
    out = flash_attention(q, keys.transpose(0, 2, 1, 3), values.transpose(0, 3, 1, 2), mask[:, 0, -1, :],
                          causal=True, q_offset=index, kv_len=index + t)
    return out, cache


def _attend(q, k, v, mask, implementation: str = "einsum"):
    """Attention without a cache (prefill of a whole sequence, training) through the kernel ``Runtime.attention``
    picks. The decoder's mask is causal & padding: its last query row reads every key the padding allows."""
    return attention(q, k, v, mask[:, 0, -1, :], causal=True, implementation=implementation)
