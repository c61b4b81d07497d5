"""Aria's projector: learned queries cross-attend to the vision features, then a GELU-tanh FFN (aria-spec.md §3)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.config import AriaConfig
from aria_jax.kernels.activations import gelu_tanh
from aria_jax.kernels.attention import attention
from aria_jax.model.layers import LayerNorm, Linear, lora_delta, param

PROJECTOR_LN_EPS = 1e-5  # torch nn.LayerNorm's default, not the vision tower's 1e-6


class CrossAttention(nn.Module):
    """Aria's q/k/v projections followed by ``torch.nn.MultiheadAttention``'s own in-projections (with bias).

    No residual connection; the query is scaled *before* the score matmul (the kernel's scale is 1) and the
    probabilities are rounded to the input dtype, both as torch's MultiheadAttention does.
    """

    config: AriaConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"  # Runtime.attention (aria_jax.kernels.attention)

    @nn.compact
    def __call__(self, features: jax.Array, queries: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        d = self.config.vision.hidden_size
        nh = self.config.vision.num_attention_heads
        hd = d // nh
        axes = ("vision_embed", "vision_embed_out")
        q = Linear(d, axes, False, self.dtype, name="q_proj")(
            LayerNorm(PROJECTOR_LN_EPS, dtype=self.dtype, name="layer_norm")(queries)
        )
        kv = LayerNorm(PROJECTOR_LN_EPS, dtype=self.dtype, name="layer_norm_kv")(features)
        k = Linear(d, axes, False, self.dtype, name="k_proj")(kv)
        v = Linear(d, axes, False, self.dtype, name="v_proj")(kv)

        def in_proj(name: str, x: jax.Array) -> jax.Array:
            w = param(
                self, f"in_{name}_kernel", (d, nh, hd), ("vision_embed", "vision_heads", "vision_head_dim"), self.dtype
            )
            b = param(
                self,
                f"in_{name}_bias",
                (nh, hd),
                ("vision_heads", "vision_head_dim"),
                self.dtype,
                nn.initializers.zeros,
            )
            return jnp.einsum("bsd,dnh->bsnh", x, w) + b

        q2 = in_proj("q", q) * jnp.asarray(hd**-0.5, self.dtype)
        k2, v2 = in_proj("k", k), in_proj("v", v)
        out = attention(q2, k2, v2, key_mask, implementation=self.attention, scale=1.0)
        wo = param(self, "out_kernel", (nh, hd, d), ("vision_heads", "vision_head_dim", "vision_embed"), self.dtype)
        bo = param(self, "out_bias", (d,), ("vision_embed",), self.dtype, nn.initializers.zeros)
        out = jnp.einsum("bqnh,nhd->bqd", out, wo) + bo + lora_delta(self, "out_kernel", out, 2)
        return Linear(d, axes, True, self.dtype, name="linear")(out)


class Projector(nn.Module):
    """(N, P, Dv) vision features + (N, P) patch validity -> (N, Q, D_text) image tokens, Q chosen by P."""

    config: AriaConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"  # Runtime.attention

    @nn.compact
    def __call__(self, features: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        n, p, dv = features.shape
        nq = cfg.queries_for_patches(p)
        table = param(self, "query", (cfg.num_queries, dv), ("queries", "vision_embed"), self.dtype)
        queries = jnp.broadcast_to(table[:nq], (n, nq, dv))
        x = CrossAttention(cfg, self.dtype, self.attention, name="cross_attn")(features, queries, key_mask)
        x = LayerNorm(PROJECTOR_LN_EPS, dtype=self.dtype, name="layer_norm")(x)
        dt = cfg.text.hidden_size
        x = Linear(dt, ("vision_embed", "mlp"), False, self.dtype, name="linear_in")(x)
        return Linear(dt, ("mlp", "embed"), False, self.dtype, name="linear_out")(gelu_tanh(x))
