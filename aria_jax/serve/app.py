"""The HTTP face (FastAPI): ``POST /v1/chat/completions`` (``stream`` as server-sent events), ``GET /v1/models``,
``/health`` and ``/metrics``. Requests are checked and prepared (template, tokens, images) off the event loop, then
handed to the engine; a client that goes away cancels its request. Errors are OpenAI-style JSON: 400 for a bad
request, 429 when the queue is full.

FastAPI (and Starlette under it) are the optional ``serve`` extra, imported by ``create_app`` (no ``from __future__
import annotations`` here: FastAPI reads the routes' annotations, which name those imports).
"""

import asyncio
import dataclasses
import time

import numpy as np

from aria_jax.errors import one_line
from aria_jax.inference.generation import bucket
from aria_jax.serve import protocol
from aria_jax.serve.engine import Engine, QueueFull
from aria_jax.serve.engine import Request as EngineRequest
from aria_jax.serve.media import MediaPolicy

MAX_BODY_BYTES = 32 << 20


@dataclasses.dataclass
class ServerConfig:
    model_id: str
    defaults: protocol.Defaults = dataclasses.field(default_factory=protocol.Defaults)
    media: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)
    max_body_bytes: int = MAX_BODY_BYTES
    image_options: dict = dataclasses.field(default_factory=dict)  # max_image_size, split_image, split_mode


class Failure(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, kind, param, code)


def prepare(engine: Engine, config: ServerConfig, req: protocol.ChatRequest) -> EngineRequest:
    """Template, tokens and images for one request; its max_tokens checked against the row it needs."""
    model = engine.model
    batch = model.processor.chat_inputs(req.messages, req.images or None, req.videos or None, **config.image_options)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    t, room = ids.shape[1], engine.room(ids.shape[1])
    if room < 1:
        raise protocol.RequestError(
            f"the prompt has {t} tokens (a row of {bucket(t)}), more than this server's context of "
            f"{engine.max_seq_len} slots (--max-seq-len) leaves room for", "messages", "context_length_exceeded")
    max_tokens = min(config.defaults.max_tokens, room) if req.max_tokens is None else req.max_tokens
    if max_tokens > room:
        raise protocol.RequestError(
            f"max_tokens {max_tokens} + the prompt's {t} tokens (a row of {bucket(t)}) exceed this server's context "
            f"of {engine.max_seq_len} slots: at most {room} new tokens fit", "max_tokens", "context_length_exceeded")
    pixels, pixel_mask = batch.get("pixel_values"), batch.get("pixel_mask")
    return EngineRequest(
        ids, mask, None if pixels is None else np.asarray(pixels, np.float32),
        None if pixel_mask is None else np.asarray(pixel_mask, bool), max_tokens,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
    )


async def read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.RequestError(f"the body of {declared} bytes is over the limit of {limit}", None,
                                    "request_too_large")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise protocol.RequestError(f"the body is over the limit of {limit} bytes", None, "request_too_large")
        chunks.append(piece)
    return b"".join(chunks)


def create_app(engine: Engine, config: ServerConfig):
    """The FastAPI app over a started ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="aria-jax", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(protocol.error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Failure)
    async def failure(request: Request, exc: Failure):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.get("/health")
    async def health():
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "aria-jax", "max_model_len": engine.max_seq_len}]}

    @app.get("/metrics")
    async def metrics():
        gauges = {"queue_length": (engine.queue_length, "requests waiting for a row"),
                  "running_sequences": (engine.running, "requests in a row"),
                  "free_rows": (engine.free_rows, "rows of the slot pool that are free"),
                  "max_batch": (engine.max_batch, "rows of the slot pool"),
                  "compiled_programs": (sum(engine.pool.traces.values()), "programs compiled (prefill buckets + step)")}
        return PlainTextResponse(engine.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await read_body(request, config.max_body_bytes)
            req = await run_in_threadpool(protocol.parse, body, config.defaults, config.media)
            work = await run_in_threadpool(prepare, engine, config, req)
        except protocol.RequestError as e:
            return error(400, str(e), param=e.param, code=e.code)
        except ValueError as e:  # InputError: the template refused the conversation, a bad image, ...
            return error(400, one_line(e), param="messages", code="invalid_value")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        work.sink = lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        try:
            engine.submit(work)
        except QueueFull as e:
            return error(429, f"the server is busy: {e}; retry later", "rate_limit_error", None, "queue_full")
        rid = protocol.new_id()
        if req.stream:
            return StreamingResponse(_stream(work, events, rid, config.model_id, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _whole(request, work, events, rid, config.model_id))

    return app


async def _whole(request, work: EngineRequest, events: asyncio.Queue, rid: str, model_id: str) -> dict:
    """The whole reply as a ``chat.completion``; raises ``Failure`` on an engine error or a client gone away."""
    pieces = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    raise Failure(499, "client closed the request") from None
                continue
            if kind == "token":
                pieces.append(value)
            elif kind == "error":
                raise Failure(500, value, "server_error")
            else:
                gen = work.generated
                return protocol.completion(rid, model_id, "".join(pieces), gen.finish_reason, work.prompt_tokens,
                                           gen.completion_tokens)
    finally:
        work.cancel()  # no effect once it finished; frees the row when the handler was cancelled


async def _stream(work: EngineRequest, events: asyncio.Queue, rid: str, model_id: str, include_usage: bool):
    try:
        yield protocol.sse(protocol.chunk(rid, model_id, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "token":
                yield protocol.sse(protocol.chunk(rid, model_id, {"content": value}))
            elif kind == "error":
                yield protocol.sse(protocol.error_body(value, "server_error"))
                break
            else:
                gen = work.generated
                use = protocol.usage(work.prompt_tokens, gen.completion_tokens)
                yield protocol.sse(protocol.chunk(rid, model_id, {}, gen.finish_reason, use))
                if include_usage:
                    yield protocol.sse(protocol.chunk(rid, model_id, {}, use=use, choices=False))
                break
        yield protocol.sse("[DONE]")
    finally:
        work.cancel()  # a client that went away (the generator is closed or cancelled) frees the row
