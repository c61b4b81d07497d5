"""Shared helpers for the training tests: tiny JSONL datasets with images, running train.py as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(root, n: int = 8, seed: int = 0) -> str:
    """train.jsonl with image+text, two-image and text-only samples; images under images/."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for i in range(3):
        arr = rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "images", f"img{i}.png"))
    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a cat and a cup of coffee"}]}]
            images = [f"images/img{i % 3}.png"]
        elif kind == 1:
            msgs = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "the quick brown fox"}]}]
            images = []
        else:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "what is shown?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "an astronaut"}]},
                    {"role": "user", "content": [{"type": "text", "text": "and the dog?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "the lazy dog"}]}]
            images = ["images/img1.png", "images/img2.png"]
        lines.append(json.dumps({"messages": msgs, "images": images}))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


def run_train(args: list[str], env_extra: dict | None = None, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO, **popen)


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
