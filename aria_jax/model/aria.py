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
from aria_jax.model.vision import VisionTower, query_chunk
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


def vision_chunk_bytes(cfg: AriaConfig, patches: int, itemsize: int, images: int) -> int:
    """Activation bytes of the vision tower and projector on a chunk of ``images`` images: one encoder layer's
    working set (layers run one after another), that is residual, norms, q/k/v/attention output and the MLP hidden
    in the compute dtype (``images * patches * (6 * D + 2 * I) * itemsize``) plus one float32 score block and its
    probabilities, as big as ``vision.query_chunk`` makes it. An upper bound: XLA may fuse some of these away."""
    v = cfg.vision
    heads = v.num_attention_heads
    scores = images * heads * query_chunk(images, heads, patches) * patches * 4
    return images * patches * (6 * v.hidden_size + 2 * v.intermediate_size) * itemsize + 2 * scores


def image_chunk_size(cfg: AriaConfig, patches: int, itemsize: int, budget_bytes: int, images: int) -> int:
    """Images per chunk of the vision tower (at most ``images``): as many as ``budget_bytes`` of activations hold
    (``vision_chunk_bytes``), at least one."""
    chunk = 1
    while chunk < images and vision_chunk_bytes(cfg, patches, itemsize, chunk + 1) <= budget_bytes:
        chunk += 1
    return chunk


def chunk_starts(n: int, chunk: int) -> tuple[int, np.ndarray]:
    """(size, starts): ``ceil(n / chunk)`` equal chunks of ``size <= chunk`` images covering 0..n-1, the last one
    moved back to end at ``n`` (it may overlap the one before; no padding, no copy of the pixels)."""
    count = -(-n // chunk)
    size = -(-n // count)
    return size, np.minimum(np.arange(count) * size, n - size).astype(np.int32)


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
        attention = self.runtime.attention
        self.vision_tower = VisionTower(cfg.vision, cfg.vision_layers_used, self.dtype, self.remat, attention)
        self.projector = Projector(cfg, self.dtype, attention)
        self.language_model = TextDecoder(
            cfg.text, self.moe_backend, self.dtype, self.remat, self.mesh, self.layout, self.runtime
        )

    def _encode(self, pixel_values: jax.Array, pixel_mask: jax.Array | None) -> jax.Array:
        """One chunk: (C, 3, S, S) pixels -> (C, Q, D) image tokens."""
        features, patch_valid = self.vision_tower(pixel_values.astype(self.dtype), pixel_mask)
        return self.projector(features, None if pixel_mask is None else patch_valid)

    def image_features(self, pixel_values: jax.Array, pixel_mask: jax.Array | None = None) -> jax.Array:
        """(N, 3, S, S) pixels -> (N, Q, D) image tokens for the decoder, in chunks of at most
        ``image_chunk_size`` images (``Runtime.image_chunk_bytes``) under one ``scan``: the tower's activations
        exist for one chunk at a time, the (N, Q, D) features for all. The pixels stay one (N, 3, S, S) argument
        (each chunk is a slice of it, cast to the compute dtype chunk by chunk: no padding, no copy); the last
        chunk may overlap the one before, and its repeated images are dropped. All frames' pixels exist at once
        only as that input: the processor's float32 array on the host (128 frames at 490 px: 369 MB) and its
        device copy."""
        n, _, side, _ = pixel_values.shape
        patches = (side // self.config.vision.patch_size) ** 2
        itemsize = jnp.dtype(self.dtype).itemsize
        chunk = image_chunk_size(self.config, patches, itemsize, self.runtime.image_chunk_bytes, n)
        if n <= chunk or self.is_initializing():
            return self._encode(pixel_values, pixel_mask)
        size, starts = chunk_starts(n, chunk)

        def one_chunk(module: AriaModel, carry: None, start: jax.Array) -> tuple[None, jax.Array]:
            pixels = jax.lax.dynamic_slice_in_dim(pixel_values, start, size)
            mask = None if pixel_mask is None else jax.lax.dynamic_slice_in_dim(pixel_mask, start, size)
            return carry, module._encode(pixels, mask)

        scan = nn.scan(one_chunk, variable_broadcast=True, split_rngs={"params": False, "dropout": True},
                       length=len(starts))
        _, chunks = scan(self, None, jnp.asarray(starts))  # (chunks, size, Q, D)
        repeated = len(starts) * size - n  # the last chunk's images that the one before already has
        if not repeated:
            return chunks.reshape(n, *chunks.shape[2:])
        return jnp.concatenate([chunks[:-1].reshape(-1, *chunks.shape[2:]), chunks[-1, repeated:]])

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
