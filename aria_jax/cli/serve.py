"""``aria-jax serve``: the OpenAI-compatible server (aria_jax.serve) on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import math
import os
import sys

from aria_jax.cli.generate import _load, add_model_arguments
from aria_jax.errors import InputError
from aria_jax.runtime import with_overrides
from aria_jax.serve.app import MAX_BODY_BYTES, ServerConfig, create_app
from aria_jax.serve.engine import MAX_DECODE_STEPS, Engine
from aria_jax.serve.media import MediaPolicy
from aria_jax.serve.protocol import MAX_VIDEO_FRAMES, Defaults


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible chat server with continuous batching",
        description="Serve POST /v1/chat/completions (OpenAI format, stream too; images (image_url) and "
                    "videos (video_url) as data: URLs, local files under --allowed-media-dir, remote ones with "
                    "--allow-remote-media), GET /v1/models, /health and "
                    "/metrics (Prometheus). --max-batch requests decode together in a pool of KV-cache rows of "
                    "--max-seq-len slots; more wait (at most --max-queue, then 429). --max-new-tokens, --temperature "
                    "(0: greedy), --top-p and --seed are the defaults of requests that leave them out.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--max-batch", type=int, default=8, help="rows of the slot pool: requests decoded together (8)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="slots of a row: prompt (rounded up to its bucket) + new tokens (default: the model's "
                        "context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row before 429 (64)")
    p.add_argument("--decode-steps", type=int, default=4, metavar="K",
                   help="decode steps per host round trip while no request waits for a row (4): fewer round trips, "
                        "tokens stream K at a time; a new request waits at most K steps")
    p.add_argument("--kv-cache", default="float", choices=["float", "int8"], help="KV-cache storage (float)")
    p.add_argument("--allowed-media-dir", default=None, metavar="DIR",
                   help="image_url may name local files under DIR (default: no local files)")
    p.add_argument("--video-frames", type=int, default=8, metavar="N",
                   help="frames sampled from a video_url part that gives no num_frames (8; 128 tokens each at 490 px)")
    p.add_argument("--allow-remote-media", action="store_true", help="image_url may be http(s):// (fetched)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help=f"largest request body "
                   f"({MAX_BODY_BYTES >> 20} MiB)")
    p.set_defaults(func=cmd_serve)


def check(args: argparse.Namespace) -> None:
    """Every flag checked before the (slow) load: one InputError naming it."""
    try:
        args.runtime = with_overrides(args.runtime)
    except ValueError as exc:
        raise InputError(f"--runtime: {exc}") from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_seq_len is not None and args.max_seq_len < 32:
        raise InputError(f"--max-seq-len must be >= 32, got {args.max_seq_len}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 1 <= args.decode_steps <= MAX_DECODE_STEPS:
        raise InputError(f"--decode-steps must be in 1..{MAX_DECODE_STEPS}, got {args.decode_steps}")
    if not 1 <= args.video_frames <= MAX_VIDEO_FRAMES:
        raise InputError(f"--video-frames must be in 1..{MAX_VIDEO_FRAMES}, got {args.video_frames}")
    if args.max_body_bytes < 1024:
        raise InputError(f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 2):
        raise InputError(f"--temperature must be in [0, 2], got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k:
        raise InputError(f"--top-k {args.top_k}: the server samples with temperature and top-p only (OpenAI's)")
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        raise InputError(f"--allowed-media-dir {args.allowed_media_dir}: not a directory")


def build(args: argparse.Namespace) -> tuple[Engine, ServerConfig]:
    """The loaded model's engine (warmed up, not started) and the app's settings."""
    model = _load(args)
    engine = Engine(model, args.max_batch, args.max_seq_len, args.max_queue, args.kv_cache, args.decode_steps)
    engine.warm_up(groups=True)
    config = ServerConfig(
        model_id=args.model,
        defaults=Defaults(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.video_frames),
        media=MediaPolicy(args.allowed_media_dir, args.allow_remote_media),
        max_body_bytes=args.max_body_bytes,
        image_options=dict(max_image_size=args.max_image_size, split_image=args.split_image or None,
                           split_mode=args.split_mode),
    )
    return engine, config


def cmd_serve(args: argparse.Namespace) -> int:
    check(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("aria-jax serve needs fastapi and uvicorn: pip install 'aria-jax[serve]'") from None
    engine, config = build(args)
    app = create_app(engine.start(), config)
    print(f"aria-jax serve: {args.model} on http://{args.host}:{args.port}/v1 ({engine.max_batch} rows x "
          f"{engine.max_seq_len} slots; {engine.model.runtime.describe()})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
