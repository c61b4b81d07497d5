"""``aria-jax generate`` and ``aria-jax chat``: replies from the command line, with timing stats."""

from __future__ import annotations

import argparse
import io
import math
import sys
from typing import TextIO

import jax

from aria_jax.errors import ImageError, InputError
from aria_jax.inference.api import Aria
from aria_jax.inference.image_processor import load_image
from aria_jax.inference.processor import ChatTemplateError, ChatTemplateRejected
from aria_jax.inference.video import DEFAULT_NUM_FRAMES, Video, VideoError, load_video
from aria_jax.parallel import distributed
from aria_jax.runtime import with_overrides


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id (e.g. rhymes-ai/Aria), an HF-format directory, or a directory from `aria-jax convert`")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute and weight dtype (default: the checkpoint's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per reply (256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (the default) means greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--max-image-size", type=int, default=None, choices=[490, 980],
                   help="image resolution (default: the processor's, 980)")
    p.add_argument("--split-image", action="store_true", help="also feed crops of large images (more tokens)")
    p.add_argument("--split-mode", default="hf", choices=["hf", "original"],
                   help="the crops of --split-image: hf = transformers' split (the default); original = the "
                        "rhymes-ai/Aria split the model was trained with (the whole image, then crops of the closest "
                        "aspect ratio); original implies --split-image")
    p.add_argument("--tokenizer", "--tokenizer-path", "--tokenizer_path", dest="tokenizer", default=None,
                   metavar="PATH", help="tokenizer directory or hub id, when the model has none or should use "
                                        "another (its chat template comes too)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as the "
                        "original rhymes-ai/Aria trainer, PEFT or train.py write it), merged into the weights")
    p.add_argument("--mesh", default=None, help='device mesh, e.g. "expert=8,data=1" (default: one device)')
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization while loading: int8 (per channel) or int4 (groups of 128), for "
                        "every linear layer of the language model (a directory converted with --quantize needs none)")
    p.add_argument("--runtime", default=None, metavar="KEY=VALUE,...",
                   help="override the platform's kernel choices (printed with the stats): experts=ragged|blocked|"
                        "gather|dense|pallas|megablox|tokamax, layout=stacked|per_layer|unrolled, attention=einsum|xla|"
                        "cudnn, matvec_split=N, decode_options=none, "
                        "image_chunk_bytes=N")


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES, metavar="N",
                   help=f"frames sampled from each video, at the centres of N equal segments ({DEFAULT_NUM_FRAMES})")
    p.add_argument("--fps", type=float, default=None, metavar="F",
                   help="sample F frames per second of video instead of --num-frames")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="at most N frames per video")
    p.add_argument("--no-timestamps", dest="timestamps", action="store_false",
                   help="video frames without their [MM:SS] timestamps (all frames, then one newline)")


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt (with images or videos) and print the reply",
                       description="Answer one prompt, optionally about images and videos, and print the reply; "
                                   "timing stats go to stderr. The prompt is wrapped in the model's chat template.")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image file the prompt is about (repeat for several; they come before the text)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="a video file the prompt is about (mp4, avi, mkv, webm; repeat for several; after the "
                        "images, before the text): frames at 490 px with [MM:SS] timestamps")
    add_video_arguments(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat; images and videos by path",
                       description="Interactive chat. Type a message and press enter. `/image PATH` attaches an "
                                   "image to your next message, `/video PATH` a video (--num-frames frames), "
                                   "`/reset` starts over, `/quit` (or end of input) leaves. Timing stats follow "
                                   "each reply.")
    add_model_arguments(p)
    add_video_arguments(p)
    p.set_defaults(func=cmd_chat)


def _options(args: argparse.Namespace) -> dict:
    """Sampling options from the flags, every value checked before the (slow) load."""
    try:
        args.runtime = with_overrides(args.runtime)
    except ValueError as exc:
        raise InputError(f"--runtime: {exc}") from None
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # NaN fails too
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_frames < 1:
        raise InputError(f"--num-frames must be >= 1, got {args.num_frames}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise InputError(f"--fps must be a finite number > 0, got {args.fps}")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    sample = args.temperature > 0
    return dict(
        max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature if sample else 1.0,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )


def _load(args: argparse.Namespace):
    distributed.initialize()  # multi-host when JAX_COORDINATOR_ADDRESS etc. (or a TPU pod / SLURM) say so
    model = Aria.from_pretrained(args.model, dtype=args.dtype, mesh=args.mesh, tokenizer_path=args.tokenizer,
                                 runtime=args.runtime, adapter=args.adapter, quantize=args.quantize)
    if model.processor is None:
        raise InputError(f"{args.model}: no tokenizer files (tokenizer.json); cannot turn text into tokens "
                         "(--tokenizer PATH names a tokenizer)")
    return model


def _image_options(args: argparse.Namespace) -> dict:
    return dict(max_image_size=args.max_image_size, split_image=args.split_image or None, split_mode=args.split_mode)


def _runtime(model) -> str:
    return f"runtime {model.runtime.describe()}; parameter layout {model.layout}"


def _load_images(paths: list[str]):
    return [load_image(path) for path in paths]


def _load_videos(paths: list[str], args: argparse.Namespace) -> list[Video]:
    """Each video's sampled frames, decoded before the model loads (a bad file fails fast)."""
    return [load_video(path, num_frames=args.num_frames, fps=args.fps, max_frames=args.max_frames) for path in paths]


def _content(images: list, videos: list, text: str) -> list[dict]:
    return ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
            + [{"type": "text", "text": text}])


def cmd_generate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    options = _options(args)  # validate before the (slow) load
    if args.raw and args.video:
        raise InputError("--raw takes no --video: a video's frames and timestamps come through the chat template")
    images = _load_images(args.image)
    videos = _load_videos(args.video, args)
    model = _load(args)

    main = jax.process_index() == 0  # multi-host: every process generates, process 0 prints
    if not main:
        out = io.StringIO()
    image_opts = _image_options(args)
    if args.raw:
        batch = model.processor(text=[args.prompt], images=images or None, **image_opts)
        tokens = model.generate(**batch, **options)[0]
        print(model.processor.decode([int(t) for t in tokens], skip_special_tokens=True), file=out)
    else:
        content = _content(images, videos, args.prompt)
        for piece in model.chat([{"role": "user", "content": content}], images=images, videos=videos or None,
                                timestamps=args.timestamps, stream=True, **image_opts, **options):
            print(piece, end="", file=out, flush=True)
        print(file=out)
    if main:
        print(f"[{model.last_stats}; {_runtime(model)}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    options = _options(args)
    model = _load(args)
    messages: list[dict] = []
    images: list = []
    pending: list = []
    videos: list = []
    pending_videos: list = []
    print(f"aria-jax chat: /image PATH attaches an image, /video PATH a video, /reset starts over, /quit leaves. "
          f"[{_runtime(model)}]", file=out)
    while True:
        print("> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages, images, pending, videos, pending_videos = [], [], [], [], []
            print("(conversation reset)", file=out)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.extend(_load_images([path]))
            except ImageError as e:  # a missing, corrupt or oversized file: say so, the session goes on
                print(f"error: {e}", file=out)
                continue
            print(f"(image attached: {path})", file=out)
            continue
        if line.startswith("/video"):
            path = line[len("/video"):].strip()
            try:
                video = _load_videos([path], args)[0] if path else None
            except VideoError as e:  # unreadable, empty, no frames: say so, the session goes on
                print(f"error: {e}", file=out)
                continue
            if video is None:
                print("error: /video needs a file path", file=out)
                continue
            pending_videos.append(video)
            print(f"(video attached: {path}, {len(video.frames)} frames)", file=out)
            continue
        messages.append({"role": "user", "content": _content(pending, pending_videos, line)})
        kept = len(images), len(videos)  # restored when this message fails, so the next one still matches
        images += pending
        videos += pending_videos
        pending, pending_videos = [], []
        reply = ""
        try:
            for piece in model.chat(messages, images=images or None, videos=videos or None,
                                    timestamps=args.timestamps, stream=True, **_image_options(args), **options):
                reply += piece
                print(piece, end="", file=out, flush=True)
        except ChatTemplateError as e:
            if not isinstance(e, ChatTemplateRejected):
                raise  # the checkpoint's template is broken for every message: exit 2
            messages.pop()  # the template refused this conversation (e.g. its roles): the user can go on
            del images[kept[0]:], videos[kept[1]:]
            print(f"error: {e}", file=out)
            continue
        except ValueError as e:  # e.g. the conversation outgrew the context: say so and let the user /reset
            messages.pop()
            del images[kept[0]:], videos[kept[1]:]
            print(f"error: {e}", file=out)
            continue
        print(f"\n[{model.last_stats}]", file=out)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
