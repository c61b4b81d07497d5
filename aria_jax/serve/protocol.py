"""The OpenAI chat-completions format: a request body checked into a ``ChatRequest`` (every bad value one
``RequestError`` naming its field), and the response, chunk and error objects."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from aria_jax.serve import media

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_VIDEO_FRAMES = 128  # the most frames a video_url may ask for (the original's longest recipe)
# fields that change what comes back and that this server does not do: refused rather than ignored
UNSUPPORTED = {"tools": None, "tool_choice": "none", "functions": None, "function_call": "none", "logprobs": False,
               "top_logprobs": None, "logit_bias": None, "frequency_penalty": 0, "presence_penalty": 0,
               "audio": None, "prediction": None}


class RequestError(ValueError):
    """A bad request: HTTP 400 with an OpenAI-style error naming ``param``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass
class Defaults:
    """What a request leaves out (from the server's flags)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    video_frames: int = 8  # frames sampled from a video_url that does not say


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]  # aria_jax chat messages ({"type": "image"} / {"type": "video"} items, in order with
    images: list  # ``images`` and ``videos`` (aria_jax.inference.video.Video)
    max_tokens: int | None  # None: the server's default (what fits)
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    videos: list = dataclasses.field(default_factory=list)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    return value


def parse(raw: bytes, defaults: Defaults, policy: media.MediaPolicy) -> ChatRequest:
    """A request body -> ``ChatRequest``; images are loaded here (by ``policy``)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(f"the body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", None, "invalid_json")
    if not isinstance(body.get("model"), str):
        raise RequestError("model must be a string (the served model's id: GET /v1/models)", "model")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None):
            raise RequestError(f"{name} is not supported by this server", name, "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise RequestError(f"n must be 1, got {body.get('n')!r}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _integer(body, name)
        if value is not None and value < 1:
            raise RequestError(f"{name} must be >= 1, got {value}", name)
        max_tokens = value if value is not None else max_tokens
    seed = _integer(body, "seed")
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):
        raise RequestError(f"seed must fit 64 bits, got {seed}", "seed")
    messages, images, videos = _messages(body.get("messages"), policy, defaults.video_frames)
    return ChatRequest(
        messages=messages, images=images, videos=videos, max_tokens=max_tokens,
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        seed=defaults.seed if seed is None else seed % (1 << 32),
        stop=_stop(body.get("stop")), stream=stream, include_usage=bool(options.get("include_usage", False)),
    )


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def _messages(value, policy: media.MediaPolicy, video_frames: int) -> tuple[list[dict], list, list]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", "messages")
    messages, images, videos = [], [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            items = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            items = [_part(part, f"{where}.content[{j}]", policy, images, videos, video_frames)
                     for j, part in enumerate(content)]
        else:
            raise RequestError(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        messages.append({"role": role, "content": items})
    return messages, images, videos


def _part(part, where: str, policy: media.MediaPolicy, images: list, videos: list, video_frames: int) -> dict:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}.image_url must be {{\"url\": ...}}", f"{where}.image_url")
        try:
            images.append(media.load(url, policy, f"{where}.image_url"))
        except media.MediaError as e:
            raise RequestError(str(e), e.param, "invalid_image") from None
        return {"type": "image"}
    if kind == "video_url":  # vLLM's form: {"type": "video_url", "video_url": {"url": ..., "num_frames": n}}
        spec = part.get("video_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}.video_url must be {{\"url\": ...}}", f"{where}.video_url")
        frames = spec.get("num_frames", video_frames) if isinstance(spec, dict) else video_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_VIDEO_FRAMES:
            raise RequestError(f"{where}.video_url.num_frames must be an integer in 1..{MAX_VIDEO_FRAMES}, got "
                               f"{frames!r}", f"{where}.video_url.num_frames")
        try:
            videos.append(media.load_video(url, policy, f"{where}.video_url", frames))
        except media.MediaError as e:
            raise RequestError(str(e), e.param, "invalid_video") from None
        return {"type": "video"}
    raise RequestError(f"{where}.type must be text, image_url or video_url, got {kind!r}", f"{where}.type")


# -- responses --------------------------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(rid: str, model: str, text: str, finish: str, prompt: int, generated: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage(prompt, generated)}


def chunk(rid: str, model: str, delta: dict, finish: str | None = None, use: dict | None = None,
          choices: bool = True) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
    if use is not None:
        out["usage"] = use
    return out


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
