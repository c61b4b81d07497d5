"""``AriaProcessor``: tokenizer + chat template + image processor, the same arrays as transformers' ``AriaProcessor``.

The tokenizer is ``tokenizer.json`` loaded with the ``tokenizers`` library, with the special tokens of
``tokenizer_config.json`` / ``special_tokens_map.json`` (the latter wins, as in transformers). The chat template is
rendered with jinja2 in the sandboxed environment transformers uses (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, ``raise_exception``, ``tojson``, ``strftime_now``). Every ``<|img|>`` is expanded to
``num_crops * tokens_per_image`` image tokens, with ``tokens_per_image`` read from ``processor_config.json``
(``size_conversion``) or ``config.json`` (``projector_patch_to_query_dict``). Batches are left-padded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors

from aria_jax.errors import InputError, one_line
from aria_jax.files import read_json
from aria_jax.inference.image_processor import AriaImageProcessor

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(InputError):
    """A chat template that does not compile, or that breaks the sandbox's rules while rendering."""


class ChatTemplateRejected(ChatTemplateError):
    """The template itself refused the conversation (its ``raise_exception``, e.g. roles that do not alternate)."""


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


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks assistant spans here)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What a template's ``raise_exception(message)`` raises."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses for ``apply_chat_template``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def checked_template(template: Any, origin: str) -> jinja2.Template:
    """``compile_chat_template``, with a template that is not a string or does not parse as ``ChatTemplateError``."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"{origin}: a chat template must be a string, got {type(template).__name__}")
    try:
        return compile_chat_template(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except (jinja2.exceptions.TemplateError, RecursionError, ValueError) as e:
        raise ChatTemplateError(f"{origin}: cannot compile the chat template ({one_line(e)})") from None


def _plain(value: Any) -> Any:
    """Rebuild template data from plain JSON types; anything else becomes ``"<TypeName>"`` (as transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Drop None-valued keys, turn OpenAI ``image_url`` blocks into ``image`` blocks, alias reasoning fields."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            content = []
            for block in message["content"]:
                if isinstance(block, Mapping) and block.get("type") == "image_url" and "image_url" in block:
                    info = block["image_url"]
                    url = info.get("url") if isinstance(info, Mapping) else info
                    block = {"type": "image", "url": url}
                content.append(block)
            message["content"] = content
        message = _plain(message)
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k)), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


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

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AriaProcessor:
        """Load from a directory with tokenizer.json (+ configs, chat template, processor/preprocessor configs)."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise InputError(f"no tokenizer.json in {str(root)!r}")
        try:
            tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise InputError(f"{root / 'tokenizer.json'}: cannot read ({one_line(e)})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tok_cfg = _read_json(root / "tokenizer_config.json")
        with _values_of(root / "tokenizer_config.json", root / "special_tokens_map.json"):
            special, image_token = _add_special_tokens(tokenizer, tok_cfg, _read_json(root / "special_tokens_map.json"))

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

        chat_template, origin = proc_cfg.get("chat_template"), root / "processor_config.json"
        if chat_template is None and (root / "chat_template.json").is_file():
            origin = root / "chat_template.json"
            chat_template = _read_json(origin).get("chat_template")
        if chat_template is None and (root / "chat_template.jinja").is_file():
            origin = root / "chat_template.jinja"
            try:
                chat_template = origin.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"{origin}: cannot read ({one_line(e)})") from None
        if chat_template is None:
            chat_template, origin = tok_cfg.get("chat_template"), root / "tokenizer_config.json"
        if isinstance(chat_template, list):  # tokenizer_config's named-template list
            if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t
                       for t in chat_template):
                raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of "
                                        "{name, template} objects")
            chat_template = {t["name"]: t["template"] for t in chat_template}
        for template in chat_template.values() if isinstance(chat_template, dict) else [chat_template]:
            if template is not None:
                checked_template(template, str(origin))  # a syntax error fails on load, not at the first message

        image_cfg = _read_json(root / "preprocessor_config.json")
        try:
            image_processor = AriaImageProcessor.from_dict(image_cfg)
        except InputError as e:
            raise InputError(f"{root / 'preprocessor_config.json'}: {e}") from None
        return cls(
            tokenizer,
            image_processor,
            chat_template=chat_template,
            chat_template_origin=str(origin),
            size_conversion=size_conversion,
            special_tokens=special,
            image_token=image_token,
            clean_up_tokenization_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
            vocab_size=vocab_size,
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
        compiled = checked_template(template, origin)
        context = _plain({**{k: v for k, v in self.special_tokens.items() if k in _NAMED_SPECIAL}, **kwargs})
        rendered = []
        for conversation in conversations:
            chat = _normalize_messages(getattr(conversation, "messages", conversation))
            try:
                rendered.append(compiled.render(
                    messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **context
                ))
            except _TemplateRaised as e:
                raise ChatTemplateRejected(f"{origin}: the template refuses this conversation: {one_line(e)}") from None
            except jinja2.exceptions.SecurityError as e:
                raise ChatTemplateError(f"{origin}: breaks the template sandbox: {one_line(e)}") from None
            except (jinja2.exceptions.TemplateError, ArithmeticError, LookupError, TypeError, ValueError,
                    AttributeError, RecursionError) as e:  # errors of the template's own code while rendering
                why = f"{type(e).__name__}: {one_line(e)}"
                raise ChatTemplateError(f"{origin}: the chat template fails while rendering ({why})") from None
        return rendered if batched else rendered[0]

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
    ) -> dict[str, np.ndarray]:
        """Tokenise ``text`` (expanding ``<|img|>``) and preprocess ``images`` -> numpy dict, left-padded.

        ``split_mode="hf"`` gives every image transformers' ``num_crops`` (the maximum over the call);
        ``split_mode="original"`` uses each image's own crop count, as the original Aria processor did.
        """
        if text is None:
            raise ValueError("text is required")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        images = _flatten_images(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(
                f"the text has {n_placeholders} {self.image_token} placeholder(s) but {len(images)} image(s) were given"
            )
        out: dict[str, np.ndarray] = {}
        if images:
            proc = self.image_processor(
                images, max_image_size=max_image_size, split_image=split_image, split_mode=split_mode
            )
            per_image = self.tokens_per_image(int(proc["pixel_values"].shape[2]))
            crops = proc["crops"] if split_mode == "original" else [proc["num_crops"]] * len(images)
            counts = iter(c * per_image for c in crops)
            texts = [self.expand_image_tokens(t, counts) for t in texts]
            out["pixel_values"] = proc["pixel_values"]
            out["pixel_mask"] = proc["pixel_mask"]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        pad_id = self.pad_token_id
        longest = max(len(x) for x in ids)
        if pad_id is None and any(len(x) != longest for x in ids):
            raise ValueError("cannot pad a batch: the tokenizer has no pad or unk token")
        input_ids = np.full((len(ids), longest), pad_id if pad_id is not None else 0, dtype=np.int64)
        attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
        for row, seq in enumerate(ids):
            if seq:
                input_ids[row, longest - len(seq) :] = seq
                attention_mask[row, longest - len(seq) :] = 1
        if self.vocab_size is not None and input_ids.size and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is >= the model's vocab_size {self.vocab_size}")
        return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

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


__all__ = ["AriaProcessor", "ChatTemplateError", "ChatTemplateRejected", "compile_chat_template"]
