"""Aria's vision tower: a SigLIP-style NaViT encoder (transformers' Idefics3VisionTransformer).

Aria uses ``hidden_states[vision_feature_layer]``, the encoder output *before* ``post_layernorm`` (whose
converted weights are zeros), so that norm does not exist here (aria-spec.md §2.5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.config import AriaVisionConfig
from aria_jax.kernels.activations import gelu_tanh
from aria_jax.kernels.attention import attention
from aria_jax.model.layers import LORA, LayerNorm, Linear, lora_delta, param


def patch_attention_mask(pixel_mask: jax.Array, patch_size: int) -> jax.Array:
    """(N, S, S) pixel mask -> (N, S/p, S/p): a patch is valid when any of its pixels is."""
    n, h, w = pixel_mask.shape
    blocks = pixel_mask.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
    return blocks.any(axis=(2, 4))


def bucket_boundaries(patches_per_side: int) -> np.ndarray:
    """float32 ``torch.arange(1/n, 1.0, 1/n)``: length and values computed in float64 as torch does on CPU."""
    step = 1.0 / patches_per_side
    length = int(np.ceil((1.0 - step) / step))
    return (step + np.arange(length, dtype=np.float64) * step).astype(np.float32)


def position_ids(patch_mask: jax.Array, patches_per_side: int) -> jax.Array:
    """NaViT fractional position ids exactly as transformers 5.x computes them (aria-spec.md §2.3).

    Valid rows/columns are spread over the whole ``patches_per_side``² table; padded patches get id 0.
    """
    n, rows, cols = patch_mask.shape
    n_h = patch_mask[:, :, 0].sum(axis=1).astype(jnp.float32)
    n_w = patch_mask[:, 0, :].sum(axis=1).astype(jnp.float32)
    boundaries = jnp.asarray(bucket_boundaries(patches_per_side))

    def buckets(count: jax.Array, size: int) -> jax.Array:
        frac = jnp.arange(size, dtype=jnp.float32)[None, :] * (1.0 / count)[:, None]
        frac = jnp.minimum(frac, jnp.float32(1.0 - 1e-6))
        return jnp.searchsorted(boundaries, frac, side="right").astype(jnp.int32)

    ids = buckets(n_h, rows)[:, :, None] * patches_per_side + buckets(n_w, cols)[:, None, :]
    return jnp.where(patch_mask, ids, 0).reshape(n, rows * cols)


class VisionEmbeddings(nn.Module):
    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, patch_mask: jax.Array) -> jax.Array:
        cfg = self.config
        n, c, h, w = pixel_values.shape
        p = cfg.patch_size
        # Conv2d(kernel=stride=p) as a matmul over patches flattened in (C, kh, kw) order, the torch weight order.
        patches = pixel_values.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, (h // p) * (w // p), c * p * p).astype(self.dtype)
        kernel = param(self, "patch_kernel", (c * p * p, cfg.hidden_size), ("vision_patch", "vision_embed"), self.dtype)
        bias = param(self, "patch_bias", (cfg.hidden_size,), ("vision_embed",), self.dtype, nn.initializers.zeros)
        table = param(
            self,
            "position_embedding",
            (cfg.patches_per_side**2, cfg.hidden_size),
            ("vision_pos", "vision_embed"),
            self.dtype,
        )
        x = jnp.einsum("npk,kd->npd", patches, kernel) + bias
        return x + jnp.take(table, position_ids(patch_mask, cfg.patches_per_side), axis=0)


# Attention scores are computed in query chunks only when one (batch, heads, patches, patches) block would exceed
# SCORE_BLOCK_BYTES: one block has no per-chunk ops and runs the key/value products once (faster: bench/HISTORY.md,
# session 9), while 16 heads at 980 px (4900 patches) would be 1.5 GB per image in one block.
SCORE_BLOCK_BYTES = 64 << 20
MIN_QUERY_CHUNK = 256


def query_chunk(batch: int, heads: int, patches: int) -> int:
    """Query rows per attention block: all of them when the scores fit SCORE_BLOCK_BYTES, else the multiple of
    128 (at least MIN_QUERY_CHUNK) that does."""
    rows = SCORE_BLOCK_BYTES // (batch * heads * patches * 4)
    return patches if rows >= patches else max(MIN_QUERY_CHUNK, rows // 128 * 128)


class VisionAttention(nn.Module):
    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"  # Runtime.attention (aria_jax.kernels.attention)

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        cfg = self.config
        nh, hd, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size

        def proj(name: str) -> jax.Array:
            w = param(
                self, f"{name}_kernel", (d, nh, hd), ("vision_embed", "vision_heads", "vision_head_dim"), self.dtype
            )
            b = param(
                self, f"{name}_bias", (nh, hd), ("vision_heads", "vision_head_dim"), self.dtype, nn.initializers.zeros
            )
            return jnp.einsum("bpd,dnh->bpnh", x, w) + b + lora_delta(self, f"{name}_kernel", x, 1)

        q = proj("q")
        b, p = q.shape[:2]
        out = attention(q, proj("k"), proj("v"), key_mask, implementation=self.attention,
                        query_chunk=query_chunk(b, nh, p))
        wo = param(self, "out_kernel", (nh, hd, d), ("vision_heads", "vision_head_dim", "vision_embed"), self.dtype)
        bo = param(self, "out_bias", (d,), ("vision_embed",), self.dtype, nn.initializers.zeros)
        return jnp.einsum("bqnh,nhd->bqd", out, wo) + bo + lora_delta(self, "out_kernel", out, 2)


class VisionEncoderLayer(nn.Module):
    """Pre-LN transformer block; called under ``nn.scan`` with the key mask broadcast to every layer."""

    config: AriaVisionConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "einsum"  # Runtime.attention

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.config
        eps = cfg.layer_norm_eps
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + VisionAttention(cfg, self.dtype, self.attention, name="self_attn")(h, key_mask)
        h = LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x)
        h = Linear(cfg.intermediate_size, ("vision_embed", "vision_mlp"), True, self.dtype, name="fc1")(h)
        h = Linear(cfg.hidden_size, ("vision_mlp", "vision_embed"), True, self.dtype, name="fc2")(gelu_tanh(h))
        return x + h, None


class VisionTower(nn.Module):
    """pixel_values (N, C, S, S), pixel_mask (N, S, S) or None -> features (N, P, D) and patch validity (N, P)."""

    config: AriaVisionConfig
    num_layers: int  # layers to run: hidden_states[k] is the output of the first k layers
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention: str = "einsum"  # Runtime.attention

    @nn.compact
    def __call__(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        n, _, h, w = pixel_values.shape
        if pixel_mask is None:
            patch_mask = jnp.ones((n, h // cfg.patch_size, w // cfg.patch_size), bool)
        else:
            patch_mask = patch_attention_mask(pixel_mask.astype(bool), cfg.patch_size)
        x = VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values, patch_mask)
        key_mask = patch_mask.reshape(n, -1)
        layer = nn.remat(VisionEncoderLayer) if self.remat else VisionEncoderLayer
        if self.num_layers:
            x, _ = nn.scan(
                layer,
                variable_axes={"params": 0, LORA: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.attention, name="layers")(x, key_mask)
        return x, key_mask
