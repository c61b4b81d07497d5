"""``aria-jax plan --frames N``: what a video prompt adds to the inference plan (``cli/plan.py``)."""

from __future__ import annotations

import dataclasses

from aria_jax import runtime
from aria_jax.config import AriaConfig
from aria_jax.model.aria import image_chunk_size, vision_chunk_bytes

FRAME_SIZE = 490  # video frames' max_image_size (the original's video notebook): 128 tokens per frame on Aria


@dataclasses.dataclass(frozen=True)
class Frames:
    """A video prompt's frames per row, their size and tokens, and the vision tower's chunk."""

    count: int
    size: int
    tokens: int  # image tokens per frame
    chunk: int  # frames per vision-tower chunk

    @classmethod
    def of(cls, cfg: AriaConfig, count: int, itemsize: int, images: int) -> Frames:
        patches = (FRAME_SIZE // cfg.vision.patch_size) ** 2
        chunk = image_chunk_size(cfg, patches, itemsize, runtime.detect().image_chunk_bytes, images)
        return cls(count, FRAME_SIZE, cfg.queries_for_patches(patches), chunk)


def frame_bytes(cfg: AriaConfig, s, frames: Frames, seq: int) -> dict[str, int]:
    """Per-device bytes a video prompt adds (``s``: plan.Shape, its rows per device x frames): pixels, features,
    prompt embeddings and the vision tower's activations on one chunk."""
    images = s.rows * frames.count
    patches = (frames.size // cfg.vision.patch_size) ** 2
    return {
        "pixels": images * cfg.vision.num_channels * frames.size**2 * 4,
        "image_features": images * frames.tokens * cfg.text.hidden_size * s.c,
        "embeddings": s.rows * seq * cfg.text.hidden_size * s.c,
        "vision_chunk": vision_chunk_bytes(cfg, patches, s.c, frames.chunk),
    }
