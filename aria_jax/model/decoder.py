"""Aria's text decoder: Llama-style attention (RoPE, GQA/MHA) with an MoE feed-forward on every layer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from aria_jax.config import AriaTextConfig
from aria_jax.model.attention import Attention, causal_mask, rope_tables
from aria_jax.model.kv_cache import KVCache, LayerCache, cache_length
from aria_jax.model.layers import LORA, Linear, RMSNorm
from aria_jax.model.moe import MoE
from aria_jax.runtime import Runtime

PARAM_LAYOUTS = ("stacked", "per_layer", "unrolled")


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += moe(norm(x))``. Scanned over layers; router logits stack."""

    config: AriaTextConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    split_experts: bool = False
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
        index=None,
    ) -> tuple[jax.Array, tuple[jax.Array, LayerCache | None]]:
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="input_layernorm")(x)
        rt = self.runtime
        attention = Attention(cfg, self.dtype, rt.matvec_split, rt.holding(), rt.attention, name="self_attn")
        attn, cache = attention(h, cos, sin, mask, cache, index)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="post_attention_layernorm")(x)
        moe = MoE(cfg, self.moe_backend, self.dtype, self.mesh, split_experts=self.split_experts,
                  runtime=self.runtime, name="mlp")
        out, router_logits = moe(h)
        return x + out, (router_logits, cache)


class TextDecoder(nn.Module):
    """Embedded inputs (B, T, D) -> final hidden states (B, T, D), logits (B, T, V) and per-layer router logits
    (L, B*T, E).

    ``layout`` (aria_jax.parallel.layout converts parameters between them): ``stacked``: the layers are one
    ``nn.scan`` over parameters with a leading layer axis (``layers``); ``per_layer``: ``layers_0`` ...
    ``layers_{L-1}``, so no layer's weights are sliced out of a stack (XLA copies such slices on CPU), each with its
    (E, ...) expert stacks (CPU training); ``unrolled``: per layer and one array per expert (CPU inference).
    """

    config: AriaTextConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    mesh: Mesh | None = None
    layout: str = "stacked"
    runtime: Runtime = Runtime()

    def setup(self):
        cfg = self.config
        if self.layout not in PARAM_LAYOUTS:
            raise ValueError(f"unknown parameter layout '{self.layout}'; choose one of {', '.join(PARAM_LAYOUTS)}")
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            self.dtype,
        )
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        if self.layout != "stacked":
            split = self.layout == "unrolled"
            self.layer_list = [
                layer(cfg, self.moe_backend, self.dtype, self.mesh, split, self.runtime, name=f"layers_{i}")
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
            )(cfg, self.moe_backend, self.dtype, self.mesh, False, self.runtime)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype)
        self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, self.dtype, self.runtime.matvec_split,
                              self.runtime.holding(lm_head=True))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens, input_ids, axis=0)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        index: jax.Array | None = None,
        last_only: bool = False,
        compute_logits: bool = True,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array, KVCache | None]:
        """(final-norm hidden states (B, T or 1, D), logits (B, T or 1, V) or None without ``compute_logits``, router
        logits (L, B*T, E), the updated cache).

        Without a cache this is the plain causal forward. With one (``init_cache``), the keys and values of
        ``embeds`` are written at slot ``index`` and ``attention_mask`` covers all cache slots.
        """
        cfg = self.config
        b, t, _ = embeds.shape
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, embeds.dtype)
        kv_len = cache_length(cache) if cache is not None else t
        mask = causal_mask(attention_mask, b, t, kv_len, 0 if index is None else index)
        if self.layout != "stacked":
            x, router_logits, caches = embeds, [], []
            for i, layer in enumerate(self.layer_list):
                x, (logits_i, cache_i) = layer(x, cos, sin, mask, None if cache is None else cache[i], index)
                router_logits.append(logits_i)
                caches.append(cache_i)
            router_logits, cache = jnp.stack(router_logits), None if cache is None else tuple(caches)
        else:
            x, (router_logits, cache) = self.layers(embeds, cos, sin, mask, cache, index)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x, (self.lm_head(x) if compute_logits else None), router_logits, cache
