"""``AriaProcessor``: tokenizer + chat template + image processor, the same arrays as transformers' ``AriaProcessor``.

The tokenizer is ``tokenizer.json`` loaded with the ``tokenizers`` library, with the special tokens of
``tokenizer_config.json`` / ``special_tokens_map.json`` (the latter wins, as in transformers). The chat template is
rendered as transformers renders it (``chat_template.py``). Every ``<|img|>`` is expanded to
``num_crops * tokens_per_image`` image tokens, with ``tokens_per_image`` read from ``processor_config.json``
(``size_conversion``) or ``config.json`` (``projector_patch_to_query_dict``). Batches are left-padded. The keyword
arguments of the original rhymes-ai/Aria processor (``split_ratio``, ``min_image_size``, ``padding``,
``truncation``, ``max_length``, ``return_tensors``, ``return_final_prompts``) are checked and applied by
``processor_options.py``. ``chat_inputs`` takes a conversation with ``{"type": "video"}`` items and their videos
(``video.py``): each expands into timestamped frames at 490 px, as the original's video notebook.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors

from aria_jax.errors import InputError, one_line
from aria_jax.files import TOKENIZER_FILES, ModelNotFoundError, read_json, resolve_model
from aria_jax.inference.chat_template import (
    ChatTemplateError,
    ChatTemplateRejected,
    compile_chat_template,
    find_chat_template,
    render_chat,
)
from aria_jax.inference.image_processor import AriaImageProcessor
from aria_jax.inference.processor_options import (
    ProcessorOptionError,
    as_tensors,
    check_image_tokens,
    check_split_mode,
    encode,
    split_ratio_resolutions,
    text_options,
)
from aria_jax.inference.video import DEFAULT_NUM_FRAMES, VIDEO_IMAGE_SIZE, expand_videos, has_video_items

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    content = read_json(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object")
    return content


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
        return [images]
    flat = []
    for item in images:
        flat.extend(_flatten_images(item) if isinstance(item, (list, tuple)) else [item])
    return flat


@contextlib.contextmanager
def _values_of(*files: Path) -> Iterator[None]:
    """Values read from ``files`` that have the wrong type or range become one ``InputError`` naming them."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # wrong types or values (TypeError, KeyError, ...; the tokenizers library's Exception)
        names = " / ".join(str(f) for f in files)
        raise InputError(f"{names}: unusable value ({type(e).__name__}: {one_line(e)})") from None


def _add_special_tokens(tokenizer: Tokenizer, tok_cfg: dict, special_map: dict) -> tuple[dict, str]:
    """The named special tokens and the image token, added to ``tokenizer`` where missing, as transformers does
    (the special-tokens map wins over tokenizer_config.json); the post-processor rebuilt for add_bos/eos_token."""
    merged = {**tok_cfg, **special_map}
    extra = merged.get("extra_special_tokens") or merged.get("model_specific_special_tokens") or {}
    extra = extra if isinstance(extra, dict) else {}
    special = {k: _token_str(merged.get(k)) for k in _NAMED_SPECIAL}
    image_token = _token_str(merged.get("image_token")) or _token_str(extra.get("image_token")) or "<|img|>"

    # tokens transformers adds when missing: added_tokens_decoder entries, named and extra special tokens
    have = set(tokenizer.get_vocab(with_added_tokens=True))
    for entry in (tok_cfg.get("added_tokens_decoder") or {}).values():
        if entry.get("content") and entry["content"] not in have:
            props = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            tokenizer.add_tokens([AddedToken(entry["content"], **props)])
    wanted = [t for t in special.values() if t] + [image_token]
    wanted += [_token_str(v) for v in extra.values()]
    have = set(tokenizer.get_vocab(with_added_tokens=True))
    missing = [t for t in dict.fromkeys(wanted) if t and t not in have]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # transformers rebuilds the post-processor when add_bos/eos_token are explicit or there is none
    if "add_bos_token" in tok_cfg or "add_eos_token" in tok_cfg or tokenizer.post_processor is None:
        add_bos = bool(tok_cfg.get("add_bos_token", False)) and special["bos_token"] is not None
        add_eos = bool(tok_cfg.get("add_eos_token", False)) and special["eos_token"] is not None
        bos, eos = special["bos_token"], special["eos_token"]
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        pairs = [(bos, tokenizer.token_to_id(bos))] if add_bos else []
        pairs += [(eos, tokenizer.token_to_id(eos))] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pairs)
    return special, image_token


class AriaProcessor:
    """Aria text + image preprocessing with transformers' semantics, returning numpy arrays."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: AriaImageProcessor | None = None,
        chat_template: str | dict[str, str] | None = None,
        size_conversion: Mapping[int | str, int] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        image_token: str = "<|img|>",
        clean_up_tokenization_spaces: bool = False,
        vocab_size: int | None = None,
        chat_template_origin: str = "chat template",
        model_max_length: int | None = None,
        truncation_side: str = "right",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or AriaImageProcessor()
        self.chat_template = chat_template
        self.chat_template_origin = chat_template_origin  # the file it came from, for error messages
        self.size_conversion = None if size_conversion is None else {int(k): int(v) for k, v in size_conversion.items()}
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        if self.special_tokens.get("pad_token") is None and self.special_tokens.get("unk_token") is not None:
            self.special_tokens["pad_token"] = self.special_tokens["unk_token"]  # as transformers' AriaProcessor
        self.image_token = image_token
        self.image_token_id = self._require_id(image_token)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length  # tokenizer_config.json's: truncation's default max_length
        self.truncation_side = truncation_side

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, revision: str | None = None
    ) -> AriaProcessor:
        """Load from a directory (or a hub id: only its tokenizer and config files are fetched, ``revision``
        honoured) with tokenizer.json, configs, chat template and processor/preprocessor configs.

        ``tokenizer_path`` (a directory or hub id), as in the original ``AriaProcessor.from_pretrained``: the
        tokenizer files and its chat template come from there (the template from ``path`` when it has none); the
        image settings and tokens per image from ``path``.
        """
        root = Path(resolve_model(path, revision, TOKENIZER_FILES))
        tok_root = root
        if tokenizer_path is not None:
            try:
                tok_root = Path(resolve_model(tokenizer_path, revision, TOKENIZER_FILES))
            except ModelNotFoundError as e:
                raise ModelNotFoundError(f"tokenizer_path {e}") from None
        if not (tok_root / "tokenizer.json").is_file():
            raise InputError(f"no tokenizer.json in {str(tok_root)!r}")
        try:
            tokenizer = Tokenizer.from_file(str(tok_root / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise InputError(f"{tok_root / 'tokenizer.json'}: cannot read ({one_line(e)})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tok_cfg = _read_json(tok_root / "tokenizer_config.json")
        special_file = tok_root / "special_tokens_map.json"
        with _values_of(tok_root / "tokenizer_config.json", special_file):
            special, image_token = _add_special_tokens(tokenizer, tok_cfg, _read_json(special_file))
            max_len = tok_cfg.get("model_max_length")
            if isinstance(max_len, float) and math.isfinite(max_len):
                max_len = int(max_len)
            if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
                max_len = None  # absent or unusable: no limit, as transformers' VERY_LARGE_INTEGER default
            side = tok_cfg.get("truncation_side", "right")
            if side not in ("left", "right"):
                raise ValueError(f"truncation_side must be 'left' or 'right', got {side!r}")

        proc_cfg = _read_json(root / "processor_config.json")
        model_cfg = _read_json(root / "config.json")
        with _values_of(root / "processor_config.json", root / "config.json"):
            size_conversion = proc_cfg.get("size_conversion")
            if size_conversion is None and model_cfg.get("projector_patch_to_query_dict"):
                patch = int((model_cfg.get("vision_config") or {}).get("patch_size", 14))
                by_patches = {int(k): int(v) for k, v in model_cfg["projector_patch_to_query_dict"].items()}
                size_conversion = {
                    s: by_patches[(s // patch) ** 2] for s in (490, 980) if (s // patch) ** 2 in by_patches
                }
            if size_conversion is not None:
                size_conversion = {int(k): int(v) for k, v in size_conversion.items()}
            vocab_size = (model_cfg.get("text_config") or {}).get("vocab_size") or model_cfg.get("vocab_size")
            vocab_size = None if vocab_size is None else operator.index(vocab_size)

        chat_template, origin = find_chat_template(*dict.fromkeys([tok_root, root]))
        image_cfg = _read_json(root / "preprocessor_config.json")
        try:
            image_processor = AriaImageProcessor.from_dict(image_cfg)
        except InputError as e:
            raise InputError(f"{root / 'preprocessor_config.json'}: {e}") from None
        return cls(
            tokenizer,
            image_processor,
            chat_template=chat_template,
            chat_template_origin=origin,
            size_conversion=size_conversion,
            special_tokens=special,
            image_token=image_token,
            clean_up_tokenization_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
            vocab_size=vocab_size,
            model_max_length=max_len,
            truncation_side=side,
        )

    # ---------------------------------------------------------------- tokens
    def _require_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def _id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    def tokens_per_image(self, image_size: int) -> int:
        if self.size_conversion is None:
            raise ValueError(
                "no size_conversion (processor_config.json) or projector_patch_to_query_dict (config.json)"
            )
        if image_size not in self.size_conversion:
            raise ValueError(f"no tokens-per-image entry for image size {image_size} in {self.size_conversion}")
        return self.size_conversion[image_size]

    # ---------------------------------------------------------------- chat template
    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[str]:
        """Render ``messages`` (or a batch of conversations) to text, as transformers' ``apply_chat_template``."""
        template = chat_template if chat_template is not None else self.chat_template
        origin = "chat template" if chat_template is not None else self.chat_template_origin
        if isinstance(template, dict):
            if chat_template is None and "default" not in template:
                raise ValueError(f"several chat templates and none named 'default': {sorted(template)}")
            template = template[chat_template or "default"]
        elif chat_template is not None and isinstance(self.chat_template, dict) and chat_template in self.chat_template:
            template = self.chat_template[chat_template]
        if template is None:
            raise ValueError("this processor has no chat template")
        batched = bool(messages) and (isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages"))
        conversations = messages if batched else [messages]
        if any(has_video_items(getattr(c, "messages", c)) for c in conversations):
            raise InputError('{"type": "video"} items must be expanded into frames first: processor.chat_inputs('
                             "messages, videos=[...]) or aria_jax.inference.video.expand_videos")
        context = {**{k: v for k, v in self.special_tokens.items() if k in _NAMED_SPECIAL}, **kwargs}
        rendered = render_chat(template, origin, conversations, add_generation_prompt, context)
        return rendered if batched else rendered[0]

    def chat_inputs(
        self,
        messages: Sequence[Any],
        images: Any = None,
        videos: Sequence[Any] | None = None,
        *,
        timestamps: bool = True,
        num_frames: int | None = DEFAULT_NUM_FRAMES,
        fps: float | None = None,
        max_frames: int | None = None,
        add_generation_prompt: bool = True,
        max_image_size: int | None = None,
        split_image: bool | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """One conversation -> model inputs: its ``{"type": "video"}`` items expanded into timestamped frames
        (``aria_jax.inference.video.expand_videos``: ``videos`` are file paths, ``Video`` s or lists of frames,
        ``num_frames`` / ``fps`` / ``max_frames`` sample the files, ``timestamps=False`` the plain form), the chat
        template, then ``__call__`` with the images in order and the other ``options``. With video, images are
        ``max_image_size`` 490 (the original's video frames: 128 tokens each) unless given, and never split."""
        images = _flatten_images(images)
        if videos is not None or has_video_items(messages):
            if split_image:
                raise ProcessorOptionError("split_image=True would split video frames; video frames are not split")
            messages, images = expand_videos(messages, images, videos, timestamps=timestamps, num_frames=num_frames,
                                             fps=fps, max_frames=max_frames)
            max_image_size = VIDEO_IMAGE_SIZE if max_image_size is None else max_image_size
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self(text=[prompt], images=images or None, max_image_size=max_image_size, split_image=split_image,
                    **options)

    def expand_image_tokens(self, text: str, counts: Iterable[int]) -> str:
        """Each image placeholder in ``text`` -> as many image tokens as the next of ``counts`` says (an iterator may
        go on to the next text's images); a ValueError when ``counts`` runs out first."""
        counts = iter(counts)
        parts = text.split(self.image_token)
        pieces = [parts[0]]
        for i, part in enumerate(parts[1:]):
            count = next(counts, None)
            if count is None:
                raise ValueError(f"the text has {len(parts) - 1} {self.image_token} placeholder(s) but only {i} "
                                 "image(s) were given for it")
            pieces.append(self.image_token * count)
            pieces.append(part)
        return "".join(pieces)

    # ---------------------------------------------------------------- main call
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        max_image_size: int | None = None,
        split_image: bool | None = None,
        split_mode: str = "hf",
        add_special_tokens: bool = True,
        *,
        min_image_size: int | None = None,
        split_ratio: Sequence[Sequence[int]] | None = None,
        padding: bool | str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_final_prompts: bool = False,
    ) -> dict[str, Any] | tuple[dict[str, Any], list[str]]:
        """Tokenise ``text`` (expanding ``<|img|>``) and preprocess ``images`` -> numpy dict, left-padded.

        ``split_mode="hf"`` is transformers' split, every image given its ``num_crops`` (the maximum over the call);
        ``split_mode="original"`` is the original Aria split with each image's own crop count, and splits unless
        ``split_image=False``. The original processor's keywords: ``split_ratio`` ([width, height] grid pairs to
        choose from), ``min_image_size`` (the floor of a crop's short side), ``padding`` / ``truncation`` /
        ``max_length`` (a transformers tokenizer's meaning; padding is ``"longest"`` unless given),
        ``return_tensors`` (``"np"`` default, ``"jax"``, ``"pt"``) and ``return_final_prompts`` (also return the
        texts after image-token expansion, as ``(batch, prompts)``). Bad values raise ``ProcessorOptionError``.
        """
        if text is None:
            raise ValueError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        split_mode = check_split_mode(split_mode)
        resolutions = split_ratio_resolutions(split_ratio)
        options = text_options(padding, truncation, max_length, self.model_max_length)
        if not isinstance(return_final_prompts, bool):
            raise ProcessorOptionError(f"return_final_prompts must be True or False, got {return_final_prompts!r}")
        images = _flatten_images(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(
                f"the text has {n_placeholders} {self.image_token} placeholder(s) but {len(images)} image(s) were given"
            )
        out: dict[str, np.ndarray] = {}
        if images:
            proc = self.image_processor(
                images, max_image_size=max_image_size, split_image=split_image, split_mode=split_mode,
                min_image_size=min_image_size, split_resolutions=resolutions,
            )
            per_image = self.tokens_per_image(int(proc["pixel_values"].shape[2]))
            crops = proc["crops"] if split_mode == "original" else [proc["num_crops"]] * len(images)
            counts = iter(c * per_image for c in crops)
            texts = [self.expand_image_tokens(t, counts) for t in texts]
            out["pixel_values"] = proc["pixel_values"]
            out["pixel_mask"] = proc["pixel_mask"]
        input_ids, attention_mask = encode(self.tokenizer, texts, options, self.pad_token_id, add_special_tokens,
                                           self.truncation_side)
        if options.truncate and images:
            check_image_tokens(texts, input_ids, self.image_token, self.image_token_id, options)
        if self.vocab_size is not None and input_ids.size and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is >= the model's vocab_size {self.vocab_size}")
        batch = as_tensors({"input_ids": input_ids, "attention_mask": attention_mask, **out}, return_tensors)
        return (batch, texts) if return_final_prompts else batch

    # ---------------------------------------------------------------- decoding
    def decode(
        self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Token ids -> text (as transformers' fast-tokenizer ``decode``)."""
        seq = np.asarray(ids).reshape(-1).tolist()
        text = self.tokenizer.decode(seq, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        if clean and type(self.tokenizer.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """A batch of id sequences -> list of texts."""
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in sequences]


__all__ = ["AriaProcessor", "ChatTemplateError", "ChatTemplateRejected", "ProcessorOptionError",
           "compile_chat_template"]
