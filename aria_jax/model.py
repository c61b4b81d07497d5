"""The whole Aria model as one Flax module: vision tower -> projector -> merge into text embeddings -> decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from aria_jax.config import AriaConfig
from aria_jax.projector import Projector
from aria_jax.text import TextDecoder
from aria_jax.vision import VisionTower


def check_image_token_count(input_ids, num_images: int, queries_per_image: int, image_token_id: int) -> None:
    """Raise a ValueError naming both counts when placeholders and image features disagree (concrete inputs only)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_id))
    n_features = num_images * queries_per_image
    if n_tokens != n_features:
        raise ValueError(
            f"Image features and image tokens do not match: {n_tokens} image tokens (id {image_token_id}) in "
            f"input_ids, but {num_images} image(s) x {queries_per_image} tokens = {n_features} features"
        )


def merge_image_features(
    embeds: jax.Array,
    input_ids: jax.Array,
    features: jax.Array,
    image_token_id: int,
    image_offsets: jax.Array | None = None,
) -> jax.Array:
    """Replace image-token embeddings with image features in order: batch-major, image by image, token by token.

    ``image_offsets`` (B,): row b's first image is ``features[image_offsets[b]]`` and its images follow in order
    (a multi-host batch, where each process's images sit in its own padded block); None: rows' images are
    consecutive from image 0.
    """
    b, t, d = embeds.shape
    flat_features = features.reshape(-1, d).astype(embeds.dtype)
    if image_offsets is None:
        is_image = (input_ids == image_token_id).reshape(-1)
        index = jnp.cumsum(is_image) - 1
    else:
        row_image = input_ids == image_token_id
        start = image_offsets.astype(jnp.int32)[:, None] * features.shape[1]
        index = (start + jnp.cumsum(row_image, axis=1, dtype=jnp.int32) - 1).reshape(-1)
        is_image = row_image.reshape(-1)
    index = jnp.clip(index, 0, flat_features.shape[0] - 1)
    merged = jnp.where(is_image[:, None], jnp.take(flat_features, index, axis=0), embeds.reshape(-1, d))
    return merged.reshape(b, t, d)


def default_positions(input_ids: jax.Array) -> jax.Array:
    """0..T-1 for every row, as transformers' ``forward`` does when no position_ids are given."""
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class AriaModel(nn.Module):
    config: AriaConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    mesh: Mesh | None = None  # expert parallelism when it has an "expert" axis of size > 1
    unrolled: bool = False  # the unrolled parameter layout (aria_jax.param_layout), for CPU inference
    split_experts: bool = True  # unrolled: one array per expert; False: per-layer expert stacks (CPU training)

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, cfg.vision_layers_used, self.dtype, self.remat)
        self.projector = Projector(cfg, self.dtype)
        self.language_model = TextDecoder(
            cfg.text, self.moe_backend, self.dtype, self.remat, self.mesh, self.unrolled, self.split_experts
        )

    def image_features(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None) -> jax.Array:
        """(N, 3, S, S) pixels -> (N, Q, D) image tokens for the decoder."""
        features, patch_valid = self.vision_tower(pixel_values.astype(self.dtype), pixel_mask)
        return self.projector(features, None if pixel_mask is None else patch_valid)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        image_features: jax.Array | None = None,
        image_offsets: jax.Array | None = None,
    ) -> jax.Array:
        embeds = self.language_model.embed(input_ids)
        if image_features is None and pixel_values is not None and input_ids.shape[1] != 1:
            image_features = self.image_features(pixel_values, pixel_mask)
        if image_features is not None:
            check_image_token_count(input_ids, *image_features.shape[:2], self.config.image_token_id)
            embeds = merge_image_features(
                embeds, input_ids, image_features, self.config.image_token_id, image_offsets
            )
        return embeds

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        image_features: jax.Array | None = None,
        cache=(),
        index: jax.Array | None = None,
        last_only: bool = False,
        image_offsets: jax.Array | None = None,
        hidden: bool = False,
    ) -> tuple[jax.Array, jax.Array, dict | tuple]:
        """Returns logits (B, T, V) (``hidden``: the hidden states lm_head reads), router logits (L, B*T, E) and the
        updated KV cache (see TextDecoder).

        ``image_offsets``: see ``merge_image_features`` (training batches built per process).
        """
        embeds = self.embed(input_ids, pixel_values, pixel_mask, image_features, image_offsets)
        if positions is None:
            positions = default_positions(input_ids)
        return self.language_model(embeds, positions, attention_mask, cache, index, last_only, hidden)
