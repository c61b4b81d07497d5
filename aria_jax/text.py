"""Aria's text decoder: Llama-style attention (RoPE, GQA/MHA) with an MoE feed-forward on every layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from aria_jax.config import AriaTextConfig
from aria_jax.layers import LORA, Linear, RMSNorm, lora_delta, masked_softmax, param, project
from aria_jax.moe import MoE

# {"k": (L, B, kv_heads, head_dim, S), "v": (L, B, kv_heads, S, head_dim)}; per layer when unrolled; () for none
KVCache = dict[str, jax.Array] | tuple


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
    """(B, 1, Tq, Tk) boolean: causal (query i at absolute position offset+i) and not a padded key."""
    q_pos = offset + jnp.arange(q_len)
    causal = q_pos[:, None] >= jnp.arange(kv_len)[None, :]
    mask = jnp.broadcast_to(causal, (batch, q_len, kv_len))
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :kv_len].astype(bool)
    return mask[:, None]


def _quantize(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector along ``axis`` (head_dim): (int8 values, float32 scales with that axis kept)."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8), scale


def _cache_write(cache: dict, k: jax.Array, v: jax.Array, index) -> dict:
    """Write keys (B, kv, hd, T) and values (B, kv, T, hd) at slot ``index``; int8 caches also store scales."""
    put = jax.lax.dynamic_update_slice_in_dim
    if "k_scale" not in cache:
        return {"k": put(cache["k"], k.astype(cache["k"].dtype), index, axis=3),
                "v": put(cache["v"], v.astype(cache["v"].dtype), index, axis=2)}
    (qk, sk), (qv, sv) = _quantize(k, axis=2), _quantize(v, axis=3)
    return {"k": put(cache["k"], qk, index, axis=3), "k_scale": put(cache["k_scale"], sk, index, axis=3),
            "v": put(cache["v"], qv, index, axis=2), "v_scale": put(cache["v_scale"], sv, index, axis=2)}


def _cache_read(cache: dict, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    if "k_scale" not in cache:
        return cache["k"].astype(dtype), cache["v"].astype(dtype)
    return ((cache["k"].astype(jnp.float32) * cache["k_scale"]).astype(dtype),
            (cache["v"].astype(jnp.float32) * cache["v_scale"]).astype(dtype))


class Attention(nn.Module):
    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache = (), index=None
    ) -> tuple[jax.Array, KVCache]:
        """Self-attention over ``x``, or, given a KV cache, over the cache with ``x``'s keys written at ``index``."""
        cfg = self.config
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        wq = param(self, "q_kernel", (d, nh, hd), ("embed", "q_heads", "head_dim"), self.dtype)
        wk = param(self, "k_kernel", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), self.dtype)
        wv = param(self, "v_kernel", (d, nkv, hd), ("embed", "kv_heads", "head_dim"), self.dtype)
        wo = param(self, "o_kernel", (nh, hd, d), ("q_heads", "head_dim", "embed"), self.dtype)
        q = apply_rope(project(x, wq) + lora_delta(self, "q_kernel", x, 1), cos, sin)
        k = apply_rope(project(x, wk) + lora_delta(self, "k_kernel", x, 1), cos, sin)
        v = project(x, wv) + lora_delta(self, "v_kernel", x, 1)
        if cache:
            out, cache = _attend_cached(q, k, v, mask, cache, index)
        else:
            out = _attend(q, k, v, mask)
        return project(out, wo, 2) + lora_delta(self, "o_kernel", out, 2), cache


def _attend_cached(q, k, v, mask, cache, index):
    """Attention over the KV cache after writing ``k``, ``v`` at ``index``."""
    # Keys as (B, kv, head_dim, S) and values as (B, kv, S, head_dim): the layouts the two attention matmuls
    # read, so a decode step appends one column / row and never transposes the whole cache.
    cache = _cache_write(cache, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), index)
    k, v = _cache_read(cache, q.dtype)
    b, t, nh, hd = q.shape
    nkv = k.shape[1]
    # Query head n uses kv head n // (nh / nkv), as transformers' repeat_kv.
    q = q.reshape(b, t, nkv, nh // nkv, hd)
    scores = jnp.einsum("btkgh,bkhs->bkgts", q, k) * (hd**-0.5)
    probs = masked_softmax(scores, mask[:, :, None], q.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, nh, hd), cache


def _attend(q, k, v, mask):
    """Attention without a cache (prefill of a whole sequence, training): batch and kv head lead every operand, so
    both matmuls and their gradients are plain batched matmuls (XLA:CPU transposed the mixed layouts per call)."""
    b, t, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv  # query head n uses kv head n // g, as transformers' repeat_kv
    q = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * t, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k) * (hd**-0.5)
    probs = masked_softmax(scores.reshape(b, nkv, g, t, -1), mask[:, :, None], q.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, nkv, g * t, -1), v)
    return out.reshape(b, nkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, nh, hd)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += moe(norm(x))``. Scanned over layers; router logits stack."""

    config: AriaTextConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    split_experts: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache = (), index=None
    ) -> tuple[jax.Array, tuple[jax.Array, KVCache]]:
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="input_layernorm")(x)
        attn, cache = Attention(cfg, self.dtype, name="self_attn")(h, cos, sin, mask, cache, index)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x)
        moe = MoE(cfg, self.moe_backend, self.dtype, self.mesh, split_experts=self.split_experts, name="mlp")
        out, router_logits = moe(h)
        return x + out, (router_logits, cache)


class TextDecoder(nn.Module):
    """Embedded inputs (B, T, D) -> logits (B, T, V) and per-layer router logits (L, B*T, E).

    The layers are one ``nn.scan`` over stacked parameters (``layers``), or, with ``unrolled``, ``layers_0`` ...
    ``layers_{L-1}``, so no layer's weights are sliced out of a stack (XLA copies such slices on CPU): with one array
    per expert (``split_experts``, the inference layout of aria_jax.param_layout) or each layer's (E, ...) expert
    stacks (CPU training, param_layout.unroll_layers).
    """

    config: AriaTextConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    mesh: Mesh | None = None
    unrolled: bool = False
    split_experts: bool = True  # unrolled: one array per expert; False: each layer's (E, ...) expert stacks

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            self.dtype,
        )
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        if self.unrolled:
            self.layer_list = [
                layer(cfg, self.moe_backend, self.dtype, self.mesh, self.split_experts, name=f"layers_{i}")
                for i in range(cfg.num_hidden_layers)
            ]
        else:
            self.layers = nn.scan(
                layer,
                variable_axes={"params": 0, LORA: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.moe_backend, self.dtype, self.mesh)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype)
        self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, self.dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens, input_ids, axis=0)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache = (),
        index: jax.Array | None = None,
        last_only: bool = False,
        hidden: bool = False,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """Logits (B, T or 1, V) (``hidden``: the final-norm hidden states (B, T, D) that lm_head would read), router
        logits (L, B*T, E) and the updated cache.

        Without a cache this is the plain causal forward. With one (``init_cache``), the keys and values of
        ``embeds`` are written at slot ``index`` and ``attention_mask`` covers all cache slots.
        """
        cfg = self.config
        b, t, _ = embeds.shape
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, embeds.dtype)
        kv_len = (cache[0] if self.unrolled else cache)["k"].shape[-1] if cache else t
        mask = causal_mask(attention_mask, b, t, kv_len, 0 if index is None else index)
        if self.unrolled:
            x, router_logits, caches = embeds, [], []
            for i, layer in enumerate(self.layer_list):
                x, (logits_i, cache_i) = layer(x, cos, sin, mask, cache[i] if cache else (), index)
                router_logits.append(logits_i)
                caches.append(cache_i)
            router_logits, cache = jnp.stack(router_logits), tuple(caches) if cache else ()
        else:
            x, (router_logits, cache) = self.layers(embeds, cos, sin, mask, cache, index)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return (x if hidden else self.lm_head(x)), router_logits, cache


def init_cache(
    cfg: AriaTextConfig, batch: int, length: int, dtype: jnp.dtype, unrolled: bool = False, kv_int8: bool = False
) -> KVCache:
    """A zeroed KV cache for every layer: k of shape (L, B, kv_heads, head_dim, length) and v of shape
    (L, B, kv_heads, length, head_dim), or with ``unrolled`` a tuple of L per-layer {"k", "v"} without the L.

    ``kv_int8``: keys and values stored as int8 with a float32 scale per (row, kv head, position), symmetric over
    head_dim (``k_scale`` (.., 1, length), ``v_scale`` (.., length, 1)); a quarter of a float32 cache's bytes plus
    1/head_dim for the scales. The attention reads them dequantized.
    """
    kv, hd, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    shapes = {"k": (batch, kv, hd, length), "v": (batch, kv, length, hd)}
    dtypes = {"k": dtype, "v": dtype}
    if kv_int8:
        shapes.update(k_scale=(batch, kv, 1, length), v_scale=(batch, kv, length, 1))
        dtypes = {"k": jnp.int8, "v": jnp.int8, "k_scale": jnp.float32, "v_scale": jnp.float32}
    if unrolled:
        return tuple({name: jnp.zeros(shape, dtypes[name]) for name, shape in shapes.items()} for _ in range(n))
    return {name: jnp.zeros((n, *shape), dtypes[name]) for name, shape in shapes.items()}
