"""The context budget of a prompt with images or video frames: how many frames fit, and one line when they do not."""

from __future__ import annotations

import numpy as np

from aria_jax.config import AriaConfig
from aria_jax.errors import InputError


class ContextBudgetError(InputError):
    """A prompt (text + image tokens) plus the tokens to generate does not fit the model's context."""


def frames_that_fit(context: int, text_tokens: int, tokens_per_frame: int, max_new_tokens: int) -> int:
    """The most frames (images) of ``tokens_per_frame`` tokens that fit ``context`` next to ``text_tokens`` of
    text and ``max_new_tokens`` to generate (0 when not even the text fits)."""
    return max(0, (context - text_tokens - max_new_tokens) // tokens_per_frame)


def check_context_budget(
    input_ids: np.ndarray, image_token_id: int, tokens_per_frame: int, max_new_tokens: int, context: int
) -> None:
    """Raise ContextBudgetError, one line naming the frame count that fits, when a row of ``input_ids`` (its
    length, padding included: the cache holds it) plus ``max_new_tokens`` exceeds ``context``. Rows without image
    tokens are left to the caller's plain length check."""
    ids = np.asarray(input_ids)
    length = ids.shape[1]
    if length + max_new_tokens <= context or tokens_per_frame < 1:
        return
    image_tokens = (ids == image_token_id).sum(axis=1)
    row = int(np.argmax(image_tokens))
    if not image_tokens[row]:
        return
    frames = int(image_tokens[row]) // tokens_per_frame
    text = length - int(image_tokens[row])
    # Text between image runs (a video's "[MM:SS]" and "\n" per frame) grows with the frame count too: spread it
    # over the frames, so the count named below fits.
    where = np.flatnonzero(ids[row] == image_token_id)
    between = int(where[-1] - where[0] + 1 - where.size)
    per_frame = tokens_per_frame + -(-between // max(frames - 1, 1))
    fit = frames_that_fit(context, text - between, per_frame, max_new_tokens)
    raise ContextBudgetError(
        f"prompt of {length} tokens ({frames} images/frames x {tokens_per_frame} tokens + {text} other) + "
        f"max_new_tokens {max_new_tokens} exceeds the context length {context}; the frames that fit: {fit} "
        f"(num_frames={fit} or fewer, or a smaller max_new_tokens)"
    )


def check_prompt_budget(config: AriaConfig, input_ids: np.ndarray, pixel_values, max_new_tokens: int) -> None:
    """``check_context_budget`` for a model's prompt: the tokens per image from the pixels' size (no-op without
    pixels). Run by ``Aria.generate`` (before its plain length check) and ``Decoder.iterate``."""
    if pixel_values is None:
        return
    per_image = config.queries_for_patches((np.shape(pixel_values)[-1] // config.vision.patch_size) ** 2)
    check_context_budget(input_ids, config.image_token_id, per_image, max_new_tokens,
                         config.text.max_position_embeddings)
