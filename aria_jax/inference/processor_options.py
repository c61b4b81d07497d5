"""The keyword arguments of the original rhymes-ai/Aria ``AriaProcessor`` and of transformers', checked and applied.

``padding``, ``truncation`` and ``max_length`` mean what they mean to a transformers tokenizer
(``_get_padding_truncation_strategies``): ``max_length`` alone turns truncation on; ``truncation`` True,
``"longest_first"`` or ``"only_first"`` cuts each text to ``max_length`` tokens (special tokens included) on the
tokenizer's ``truncation_side``; without ``max_length`` the tokenizer's ``model_max_length`` is used, or nothing is
cut when it has none. ``padding`` is ``"longest"`` (True) by default here, since the result is one array; left
padding always (generation needs it). What cannot be honoured is refused with one line naming the argument: no
padding for texts of different lengths, ``"max_length"`` padding without a length, ``"only_second"`` (there are no
text pairs), a truncation that would cut through an image's tokens (as transformers refuses it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from aria_jax.errors import InputError, one_line

SPLIT_MODES = ("hf", "original")
RATIO_UNIT = 490  # split_ratio [a, b] <-> split_resolutions [a * 490, b * 490], as transformers ported the list
LARGE_INTEGER = 10**20  # transformers' bound above which model_max_length means "no limit"
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: "do_not_pad",
            "do_not_pad": "do_not_pad"}
_TRUNCATION = {True: True, "longest_first": True, "only_first": True, False: False, "do_not_truncate": False}


class ProcessorOptionError(InputError):
    """A processor keyword argument whose value aria-jax cannot honour; the one-line message names the argument."""


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """Resolved tokenizer options: ``padding`` in longest / max_length / do_not_pad; ``max_length`` None = no cut."""

    padding: str = "longest"
    truncate: bool = False
    max_length: int | None = None


def _enum_value(value: Any) -> Any:
    """The string of a transformers ``PaddingStrategy`` / ``TruncationStrategy`` / ``TensorType`` (str enums)."""
    return value.value if isinstance(value, str) and hasattr(value, "value") else value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text_options(padding: Any, truncation: Any, max_length: Any, model_max_length: int | None) -> TextOptions:
    """transformers' resolution of ``padding`` / ``truncation`` / ``max_length`` (None: our default, longest)."""
    padding, truncation = _enum_value(padding), _enum_value(truncation)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int | np.integer)
                                   or max_length < 1):
        raise ProcessorOptionError(f"max_length must be a positive integer, got {_shown(max_length)}")
    if max_length is not None and padding in (None, False) and truncation is None:
        truncation = "longest_first"  # transformers: max_length alone truncates
    if padding is not None and (not isinstance(padding, bool | str) or padding not in _PADDING):
        raise ProcessorOptionError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got "
                                   f"{_shown(padding)}")
    if truncation == "only_second":
        raise ProcessorOptionError("truncation='only_second' cuts the second text of text pairs, and the processor "
                                   "takes single texts; use truncation=True")
    if truncation is not None and (not isinstance(truncation, bool | str) or truncation not in _TRUNCATION):
        raise ProcessorOptionError(f"truncation must be True, False, 'longest_first', 'only_first' or "
                                   f"'do_not_truncate', got {_shown(truncation)}")
    pad = "longest" if padding is None else _PADDING[padding]
    truncate = bool(truncation is not None and _TRUNCATION[truncation])
    known = model_max_length if model_max_length is not None and model_max_length <= LARGE_INTEGER else None
    length = int(max_length) if max_length is not None else known
    if pad == "max_length" and length is None:
        raise ProcessorOptionError("padding='max_length' needs max_length (the tokenizer sets no model_max_length)")
    if truncate and length is None:
        truncate = False  # transformers: nothing to truncate to
    return TextOptions(pad, truncate, length)


def encode(
    tokenizer: Tokenizer, texts: list[str], options: TextOptions, pad_id: int | None, add_special_tokens: bool,
    truncation_side: str = "right",
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask (int64, left-padded) of ``texts`` under ``options``."""
    previous = tokenizer.truncation
    try:
        if options.truncate:
            tokenizer.enable_truncation(options.max_length, strategy="longest_first", direction=truncation_side)
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
    except Exception as e:  # the tokenizers library raises plain Exceptions (a max_length below the special tokens)
        if not options.truncate:
            raise
        raise ProcessorOptionError(f"max_length={options.max_length}: cannot truncate ({one_line(e)})") from None
    finally:
        if previous is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**previous)
    lengths = sorted({len(x) for x in ids})
    if options.padding == "do_not_pad" and len(lengths) > 1:
        raise ProcessorOptionError(f"padding=False: the texts are {lengths[0]} to {lengths[-1]} tokens long and one "
                                   "array needs one length; use padding=True (left padding)")
    longest = max(lengths)
    if options.padding == "max_length":
        if longest > options.max_length:
            row = next(i for i, x in enumerate(ids) if len(x) == longest)
            raise ProcessorOptionError(f"padding='max_length': text {row} has {longest} tokens, more than max_length="
                                       f"{options.max_length}; pass truncation=True or a larger max_length")
        longest = options.max_length
    if pad_id is None and any(len(x) != longest for x in ids):
        raise ValueError("cannot pad a batch: the tokenizer has no pad or unk token")
    input_ids = np.full((len(ids), longest), pad_id if pad_id is not None else 0, dtype=np.int64)
    attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, longest - len(seq):] = seq
            attention_mask[row, longest - len(seq):] = 1
    return input_ids, attention_mask


def check_image_tokens(texts: list[str], input_ids: np.ndarray, image_token: str, image_token_id: int,
                       options: TextOptions) -> None:
    """Every image keeps all its tokens (a truncation that cuts one is refused, as transformers refuses it)."""
    for row, text in enumerate(texts):
        want, have = text.count(image_token), int((input_ids[row] == image_token_id).sum())
        if want != have:
            raise ProcessorOptionError(f"max_length={options.max_length}: truncation cuts text {row}'s image tokens "
                                       f"({have} of {want} kept); raise max_length or pass truncation=False")


def check_split_mode(split_mode: Any) -> str:
    if not isinstance(split_mode, str) or split_mode not in SPLIT_MODES:
        raise ProcessorOptionError(f"split_mode must be 'hf' (transformers' split) or 'original' (rhymes-ai/Aria's "
                                   f"training-time split), got {_shown(split_mode)}")
    return split_mode


def split_ratio_resolutions(split_ratio: Any) -> list[list[int]] | None:
    """The original's ``split_ratio`` ([width, height] grid pairs) as ``split_resolutions`` pixel pairs
    ([a * 490, b * 490], the list transformers derived from the original's); None stays None."""
    if split_ratio is None:
        return None
    ok = isinstance(split_ratio, Sequence) and not isinstance(split_ratio, str) and len(split_ratio) > 0 and all(
        isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and 1 <= v <= 64 for v in pair)
        for pair in split_ratio
    )
    if not ok:
        raise ProcessorOptionError("split_ratio must be a non-empty list of [width, height] pairs of integers in "
                                   f"1..64, like [[1, 2], [2, 1], [2, 2]]; got {_shown(split_ratio)}")
    return [[int(a) * RATIO_UNIT, int(b) * RATIO_UNIT] for a, b in split_ratio]


def check_min_image_size(min_image_size: Any, max_image_size: int) -> int | None:
    if min_image_size is None:
        return None
    if (isinstance(min_image_size, bool) or not isinstance(min_image_size, int | np.integer)
            or not 1 <= min_image_size <= max_image_size):
        raise ProcessorOptionError(f"min_image_size must be an integer in 1..max_image_size ({max_image_size}), got "
                                   f"{_shown(min_image_size)}")
    return int(min_image_size)


def as_tensors(batch: dict[str, np.ndarray], return_tensors: Any) -> dict[str, Any]:
    """``return_tensors``: None or ``"np"`` numpy (the default), ``"jax"`` jax arrays, ``"pt"`` torch tensors."""
    kind = _enum_value(return_tensors)
    if kind is None or kind == "np":
        return batch
    if kind == "jax":
        return {k: jnp.asarray(v) for k, v in batch.items()}
    if kind == "pt":
        try:
            import torch
        except ImportError:
            raise ProcessorOptionError("return_tensors='pt' needs torch, which is not installed; aria-jax's model "
                                       "takes the numpy arrays (return_tensors='np')") from None
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    raise ProcessorOptionError(f"return_tensors must be 'np' (the default), 'jax' or 'pt', got {_shown(kind)}")


__all__ = ["ProcessorOptionError", "SPLIT_MODES", "TextOptions", "as_tensors", "check_image_tokens",
           "check_min_image_size", "check_split_mode", "encode", "split_ratio_resolutions", "text_options"]
