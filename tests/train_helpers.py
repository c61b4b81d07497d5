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


def train_main(args: list[str]) -> int:
    """``train.main(args)`` in this process (faster than a subprocess; no JAX start-up per call)."""
    import importlib.util

    if "train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train", os.path.join(REPO, "train.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["train"] = module
    return sys.modules["train"].main(args)


def stderr_lines(stderr: str) -> list[str]:
    """stderr's non-blank lines without tqdm's progress bars (a bar redraws itself after carriage returns)."""
    lines = [line.strip() for line in stderr.splitlines()]  # splitlines also splits at the bars' \r
    return [line for line in lines if line and not line.startswith(("train:", "checking images:"))]


def chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG claiming ``width`` x ``height`` pixels with hardly any data: a decompression bomb's header."""
    import struct
    import zlib

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def run_train(args: list[str], env_extra: dict | None = None, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO, **popen)


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train_processes(args: list[str], log_dir, n: int = 2, devices: int = 4, timeout: int = 900,
                        env_extra: dict | None = None) -> list[tuple[int, str, str]]:
    """``train.py`` as ``n`` processes joined by jax.distributed on 127.0.0.1 (``devices`` CPU devices each).

    Returns (exit status, stdout, stderr) per process; on timeout every process is killed and TimeoutError raised.
    """
    import time

    port = free_port()
    procs, files = [], []
    for pid in range(n):
        env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
               "JAX_PROCESS_ID": str(pid), **(env_extra or {})}
        out = open(os.path.join(log_dir, f"process{pid}.out"), "w+")
        err = open(os.path.join(log_dir, f"process{pid}.err"), "w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO, env=env,
                                      stdout=out, stderr=err, text=True))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise TimeoutError(f"train.py as {n} processes did not finish in {timeout} s") from None
    results = []
    for p, (out, err) in zip(procs, files, strict=True):
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results
