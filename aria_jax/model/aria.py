"""The whole Aria model as one Flax module: vision tower -> projector -> merge into text embeddings -> decoder."""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from aria_jax.config import AriaConfig
from aria_jax.model.decoder import TextDecoder
from aria_jax.model.kv_cache import KVCache
from aria_jax.model.projector import Projector
from aria_jax.model.vision import VisionTower
from aria_jax.runtime import Runtime


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


def example_inputs(cfg: AriaConfig) -> dict[str, jax.Array]:
    """The smallest image + text batch that touches every parameter (for init and shape inference)."""
    patches, queries = cfg.projector_patch_to_query[0]
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"projector_patch_to_query_dict key {patches} is not a square number of patches")
    pixels = side * cfg.vision.patch_size
    return {
        "input_ids": jnp.full((1, queries), cfg.image_token_id, jnp.int32),
        "pixel_values": jnp.zeros((1, cfg.vision.num_channels, pixels, pixels), jnp.float32),
    }


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # (B, T, V) (T = 1 with last_only); None with compute_logits=False
    hidden: jax.Array  # (B, T, D): the final-norm hidden states lm_head reads
    router_logits: jax.Array  # (L, B*T, E): for the router's auxiliary losses
    cache: KVCache | None  # the KV cache with this call's keys and values written, when one was given


class AriaModel(nn.Module):
    """Vision tower -> projector -> image features merged into the text embeddings -> decoder.

    ``layout``: the parameter layout (``stacked``, ``per_layer``, ``unrolled``: see ``TextDecoder``); ``runtime``: the
    platform's kernel choices (aria_jax.runtime), read here and never guessed; ``mesh``: expert parallelism when it
    has an ``expert`` axis of size > 1.
    """

    config: AriaConfig
    moe_backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    mesh: Mesh | None = None
    layout: str = "stacked"
    runtime: Runtime = Runtime()

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, cfg.vision_layers_used, self.dtype, self.remat)
        self.projector = Projector(cfg, self.dtype)
        self.language_model = TextDecoder(
            cfg.text, self.moe_backend, self.dtype, self.remat, self.mesh, self.layout, self.runtime
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
        cache: KVCache | None = None,
        index: jax.Array | None = None,
        last_only: bool = False,
        image_offsets: jax.Array | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """The forward pass in transformers' conventions (left padding, NCHW pixels); see ``ModelOutput``.

        ``cache``/``index``: decode over a KV cache (``TextDecoder``); ``image_offsets``: see
        ``merge_image_features`` (training batches built per process); ``compute_logits=False`` leaves lm_head to the
        caller (the training loss fuses it).
        """
        embeds = self.embed(input_ids, pixel_values, pixel_mask, image_features, image_offsets)
        if positions is None:
            positions = default_positions(input_ids)
        hidden, logits, router_logits, cache = self.language_model(
            embeds, positions, attention_mask, cache, index, last_only, compute_logits
        )
        return ModelOutput(logits, hidden, router_logits, cache)
