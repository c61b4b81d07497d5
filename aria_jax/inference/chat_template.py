"""Chat templates as transformers renders them: jinja2's sandbox with transformers' options and globals.

``compile_chat_template`` builds the environment of transformers' ``apply_chat_template`` (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, the ``{% generation %}`` tag, ``raise_exception``, ``tojson``, ``strftime_now``);
``find_chat_template`` reads a directory's template from the files transformers reads, in its order;
``render_chat`` renders conversations, every failure one ``ChatTemplateError`` line naming the template's file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aria_jax.errors import InputError, one_line
from aria_jax.files import read_json


class ChatTemplateError(InputError):
    """A chat template that does not compile, or that breaks the sandbox's rules while rendering."""


class ChatTemplateRejected(ChatTemplateError):
    """The template itself refused the conversation (its ``raise_exception``, e.g. roles that do not alternate)."""


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




def _object(path: Path) -> dict[str, Any]:
    content = read_json(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object")
    return content


def find_chat_template(*roots: Path) -> tuple[str | dict[str, str] | None, str]:
    """(template, the file it came from) from the first of ``roots`` that has one, each searched as transformers
    does: processor_config.json, chat_template.json, chat_template.jinja, then tokenizer_config.json (whose
    named-template list becomes a dict). Every template found is compiled here, so a syntax error fails on load."""
    template: Any = None
    origin = Path(roots[0]) / "tokenizer_config.json"
    for root in map(Path, roots):
        for name in ("processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json"):
            path = root / name
            if not path.is_file():
                continue
            if name == "chat_template.jinja":
                try:
                    template = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise ChatTemplateError(f"{path}: cannot read ({one_line(e)})") from None
            else:
                template = _object(path).get("chat_template")
            if template is not None:
                origin = path
                break
        if template is not None:
            break
    if isinstance(template, list):  # tokenizer_config's named-template list
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and "template" in t for t in template):
            raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of {{name, template}} objects")
        template = {t["name"]: t["template"] for t in template}
    for one in template.values() if isinstance(template, dict) else [template]:
        if one is not None:
            checked_template(one, str(origin))
    return template, str(origin)


def render_chat(
    template: str, origin: str, conversations: Sequence[Any], add_generation_prompt: bool, context: dict[str, Any]
) -> list[str]:
    """Each conversation rendered with ``template``; a failure is one ``ChatTemplateError`` line naming ``origin``
    (``ChatTemplateRejected`` when the template's own ``raise_exception`` refuses the conversation)."""
    compiled = checked_template(template, origin)
    context = _plain(context)
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
    return rendered


__all__ = ["ChatTemplateError", "ChatTemplateRejected", "checked_template", "compile_chat_template",
           "find_chat_template", "render_chat"]
