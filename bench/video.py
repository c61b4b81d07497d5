"""Peak host memory and time of a video prompt (8, 32, 128 frames at 490 px): aria_jax next to transformers.

    PYTHONPATH=. python bench/video.py [--frames 8,32,128] [--sides hf,jax] [--new-tokens 4]

The random mid-size Aria of bench/common.py (vision tower 4 layers x 256, 1225 patches and 128 tokens per 490 px
frame), its context raised to 20480 positions so that 128 frames (16,384 image tokens) fit. The frames are synthetic
640x360 PIL images (a moving gradient), through aria_jax's image processor at max_image_size 490 (both sides get the
same arrays: pixel_values (N, 3, 490, 490) float32 and pixel_mask); the prompt is the original's video form
(``[MM:SS]`` timestamp text, the frame's 128 image tokens, a newline: here random text ids around them), batch 1.

Each (side, frame count) runs in its own child process, so its peak RSS (``ru_maxrss``) is its own; the child reports
its RSS after loading the model and building the inputs (``before``) and its peak (``peak``); ``peak - before`` is
what the prompt itself cost. Time is ``generate(max_new_tokens=--new-tokens)`` wall time, greedy: transformers in
one call (its default attention, sdpa: eager attention would hold 8 x 16k x 16k float32 scores per layer at 128
frames), aria_jax warm (a first call compiles; its time and the compile's peak are in the same process, so
aria_jax's peak includes XLA's compilation; the warm call's own peak is measured too, by restarting the kernel's
peak count, /proc/self/clear_refs, before it). Sides: ``hf`` (transformers: all frames through the tower in one
batch), ``jax`` (aria_jax defaults: the tower in chunks of Runtime.image_chunk_bytes, the prefill in chunks of
generation.PREFILL_CHUNK tokens), ``jax1`` (aria_jax with both chunkings off: one batch, one prefill block).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import MID_P2Q, build_mid_checkpoint, print_table  # noqa: E402

CONTEXT = 20480
IMAGE_TOKEN = 9
TOKENS = MID_P2Q[1225]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the process began or since ``reset_peak``) in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def current_rss_mb() -> float:
    return status_mb("VmRSS")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def video_inputs(n: int, vocab: int) -> dict[str, np.ndarray]:
    """``n`` synthetic 640x360 frames through the image processor at 490 px, and the prompt's ids."""
    from PIL import Image

    from aria_jax.inference.image_processor import AriaImageProcessor

    x = np.linspace(0, 255, 640)[None, :, None]
    y = np.linspace(0, 255, 360)[:, None, None]
    frames = [Image.fromarray(((x + 7 * i + y * np.array([0.3, 0.6, 0.9])) % 256).astype(np.uint8))
              for i in range(n)]
    batch = AriaImageProcessor(max_image_size=490)(frames)
    rng = np.random.default_rng(0)
    ids = list(rng.integers(10, vocab, 12))
    for _ in range(n):  # "[MM:SS]" + the frame + "\n", as random text ids
        ids += [*rng.integers(10, vocab, 5), *[IMAGE_TOKEN] * TOKENS, int(rng.integers(10, vocab))]
    ids += list(rng.integers(10, vocab, 20))
    return {"input_ids": np.array([ids], np.int64), "pixel_values": batch["pixel_values"].astype(np.float32),
            "pixel_mask": batch["pixel_mask"].astype(bool)}


def run_hf(directory: str, n: int, new: int) -> dict:
    import torch
    from transformers import AriaForConditionalGeneration

    hf = AriaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    data = {k: torch.as_tensor(v) for k, v in video_inputs(n, hf.config.text_config.vocab_size).items()}
    before = current_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(**data, attention_mask=torch.ones_like(data["input_ids"]), max_new_tokens=new,
                    min_new_tokens=new, do_sample=False)
    return {"seconds": time.perf_counter() - start, "before_mb": before, "peak_mb": rss_mb(),
            "attn": hf.config._attn_implementation, "threads": torch.get_num_threads()}


def run_jax(directory: str, n: int, new: int, whole: bool) -> dict:
    from aria_jax import Aria
    from aria_jax.runtime import detect

    runtime = detect().replace(image_chunk_bytes=1 << 50) if whole else detect()
    ours = Aria.from_pretrained(directory, dtype="float32", runtime=runtime)
    if whole:
        ours._decoder.prefill_chunk = 1 << 30
    data = video_inputs(n, ours.config.text.vocab_size)
    before = current_rss_mb()
    times, warm_before = [], 0.0
    for call in range(2):  # compile, then warm: the warm call's own peak, without XLA's compilation
        if call:
            reset_peak()
            warm_before = current_rss_mb()
        start = time.perf_counter()
        ours.generate(data["input_ids"], pixel_values=data["pixel_values"], pixel_mask=data["pixel_mask"],
                      max_new_tokens=new, min_new_tokens=new)
        times.append(time.perf_counter() - start)
    return {"seconds": times[1], "first_seconds": times[0], "before_mb": before, "peak_mb": rss_mb(),
            "warm_before_mb": warm_before, "warm_peak_mb": status_mb("VmHWM"), "prefill_ms": ours.last_stats.prefill_ms}


def child(side: str, directory: str, n: int, new: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--dir", directory, "--frames", str(n),
           "--new-tokens", str(new)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"failed": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="8,32,128", help="comma-separated frame counts")
    parser.add_argument("--sides", default="hf,jax", help="comma-separated: hf, jax, jax1")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--side", choices=("hf", "jax", "jax1"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        n = int(args.frames)
        run = (run_hf(args.dir, n, args.new_tokens) if args.side == "hf"
               else run_jax(args.dir, n, args.new_tokens, args.side == "jax1"))
        print(json.dumps(run))
        return
    counts = [int(f) for f in args.frames.split(",")]
    sides = args.sides.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        build_mid_checkpoint(directory, max_position_embeddings=CONTEXT)
        for n in counts:
            for side in sides:
                r = child(side, directory, n, args.new_tokens)
                print(json.dumps({"side": side, "frames": n, **r}), flush=True)
                row = {"frames": n, "side": side, "prompt tokens": 32 + n * (TOKENS + 6)}
                if "failed" in r:
                    row["result"] = r["failed"]
                else:
                    row.update({"before MB": f"{r['before_mb']:.0f}", "peak MB": f"{r['peak_mb']:.0f}",
                                "peak - before MB": f"{r['peak_mb'] - r['before_mb']:.0f}",
                                "seconds (warm)": f"{r['seconds']:.1f}",
                                "first call s": f"{r['first_seconds']:.1f}" if "first_seconds" in r else ""})
                if "warm_peak_mb" in r:
                    row["warm call: peak - before MB"] = f"{r['warm_peak_mb'] - r['warm_before_mb']:.0f}"
                rows.append(row)
    print(f"generate, {args.new_tokens} new tokens, batch 1, float32, mid-size model, frames at 490 px "
          f"({TOKENS} tokens each); each run its own process")
    print_table(rows, ["frames", "side", "prompt tokens", "before MB", "peak MB", "peak - before MB",
                       "warm call: peak - before MB", "seconds (warm)", "first call s", "result"])


if __name__ == "__main__":
    main()
