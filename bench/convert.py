"""Conversion throughput and memory on a generated random Aria checkpoint, next to a plain read of the same files.

    PYTHONPATH=. python bench/convert.py [--gb 2.2] [--workdir /tmp] [--dst-dir /dev/shm] [--repeats 3]

Generates a random bfloat16 checkpoint (hub layout, ~1 GB shards) of at least ``--gb`` GB, then in fresh child
processes (so none sees another's memory): (1) a plain sequential read of every shard in 64 MiB blocks,
(2) a raw copy (the same read, plus writing the bytes to one file: the I/O floor of any conversion), (3)
``aria_jax.checkpoint.convert.convert`` to bfloat16. All three run twice: with the source in the page cache
("warm"), and with its pages dropped (``posix_fadvise(DONTNEED)`` on these files only) so they read from disk ("cold"),
alternating ``--repeats`` times; each measurement keeps its fastest run (a shared VM drifts from run to run).
Throughput is source bytes / seconds (imports excluded); peak RSS is the converting process's
``ru_maxrss``. Bars: conversion >= 50% of the plain read's throughput; peak RSS <= 2 x the largest tensor
+ 1 GiB. Everything generated is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from aria_jax.checkpoint.safetensors_io import write_safetensors  # noqa: E402
from aria_jax.config import AriaConfig  # noqa: E402
from aria_jax.model.schema import tensor_specs  # noqa: E402


def bench_config(layers: int) -> AriaConfig:
    """Aria's proportions at 1/2.5 width: experts dominate, real vocabulary."""
    return AriaConfig.from_dict(
        {
            "model_type": "aria",
            "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
            "image_token_index": 9,
            "text_config": {
                "model_type": "aria_text",
                "vocab_size": 100352,
                "hidden_size": 1024,
                "intermediate_size": 512,
                "num_hidden_layers": layers,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "moe_num_experts": 64,
                "moe_topk": 6,
                "moe_num_shared_experts": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6},
            },
            "vision_config": {
                "model_type": "idefics3_vision",
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 4,
                "num_attention_heads": 16,
                "image_size": 980,
                "patch_size": 14,
            },
        }
    )


def generate(directory: str, min_bytes: float, shard_bytes: int = 10**9) -> tuple[int, int]:
    """A random bf16 hub-layout checkpoint of at least ``min_bytes``; returns (total bytes, largest tensor)."""
    import ml_dtypes

    layers = 1
    while sum(np.prod(s) * 2 for s, _ in tensor_specs(bench_config(layers)).values()) < min_bytes:
        layers += 1
    cfg = bench_config(layers)
    entries = [(name, np.dtype(ml_dtypes.bfloat16), shape) for name, (shape, _) in tensor_specs(cfg).items()]
    shards, size = [[]], 0
    for e in entries:
        n = int(np.prod(e[2])) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = ((rng.standard_normal(s, np.float32) * 0.02).astype(d) for _, d, s in shard)
        write_safetensors(os.path.join(directory, name), shard, arrays)
        weight_map.update({n: name for n, _, _ in shard})
    total = sum(int(np.prod(s)) * 2 for _, _, s in entries)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    raw = cfg.to_dict()
    raw["text_config"]["rope_theta"] = raw["text_config"].pop("rope_parameters")["rope_theta"]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    return total, max(int(np.prod(s)) * 2 for _, _, s in entries)


PLAIN_READ = r"""
import json, os, resource, sys, time
files = sorted(os.path.join(sys.argv[1], n) for n in os.listdir(sys.argv[1]) if n.endswith(".safetensors"))
buf = bytearray(64 << 20)
start, total = time.perf_counter(), 0
for path in files:
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(buf)):
            total += n
elapsed = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"bytes": total, "seconds": elapsed, "peak_rss": rss}))
"""

CONVERT = r"""
import json, resource, sys, time
from aria_jax.checkpoint.convert import convert
start = time.perf_counter()
summary = convert(sys.argv[1], sys.argv[2], dtype="bfloat16", progress=False)
elapsed = time.perf_counter() - start
print(json.dumps({"bytes": summary["bytes"], "seconds": elapsed,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def evict(directory: str) -> None:
    """Drop this checkpoint's pages (only these files) from the page cache, so every run reads from disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


COPY = r"""
import json, os, resource, sys, time
files = sorted(os.path.join(sys.argv[1], n) for n in os.listdir(sys.argv[1]) if n.endswith(".safetensors"))
buf = bytearray(64 << 20)
start, total = time.perf_counter(), 0
with open(sys.argv[2], "wb") as out:
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buf)):
                out.write(memoryview(buf)[:n])
                total += n
elapsed = time.perf_counter() - start
os.remove(sys.argv[2])
print(json.dumps({"bytes": total, "seconds": elapsed, "peak_rss": 0}))
"""


def scenario(src: str, dst: str, cold: bool, repeats: int = 1) -> dict[str, dict]:
    """Plain read, raw copy (read + write the same bytes) and conversion, each from a warm or a cold cache; the
    three alternate ``repeats`` times and each keeps its fastest run (the largest peak RSS)."""

    def prepare() -> None:
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        if cold:
            evict(src)
        else:
            child(PLAIN_READ, src)  # pull the files into the page cache

    runs: dict[str, list[dict]] = {"read": [], "copy": [], "convert": []}
    for _ in range(repeats):
        for name, script, args in (
            ("read", PLAIN_READ, (src,)),
            ("copy", COPY, (src, dst + ".raw")),
            ("convert", CONVERT, (src, dst)),
        ):
            prepare()
            runs[name].append(child(script, *args))
    shutil.rmtree(dst, ignore_errors=True)
    return {name: {**min(rs, key=lambda r: r["seconds"]), "peak_rss": max(r["peak_rss"] for r in rs)}
            for name, rs in runs.items()}


def report(label: str, runs: dict[str, dict], largest: int) -> bool:
    rate = {k: r["bytes"] / r["seconds"] for k, r in runs.items()}
    conv = runs["convert"]
    rss_bar = 2 * largest + 2**30
    print(
        f"[{label}] plain sequential read {rate['read'] / 1e9:.2f} GB/s; raw copy (read + write the same bytes) "
        f"{rate['copy'] / 1e9:.2f} GB/s; conversion {rate['convert'] / 1e9:.2f} GB/s "
        f"({conv['bytes'] / 1e9:.2f} GB in {conv['seconds']:.1f} s) = {rate['convert'] / rate['read']:.0%} of the "
        f"plain read (bar >= 50%), {rate['convert'] / rate['copy']:.0%} of the raw copy"
    )
    print(
        f"[{label}] peak RSS (convert) {conv['peak_rss'] / 2**30:.2f} GiB; largest tensor {largest / 2**30:.2f} GiB;"
        f" bar 2 x largest + 1 GiB = {rss_bar / 2**30:.2f} GiB"
    )
    return rate["convert"] >= 0.5 * rate["read"] and conv["peak_rss"] <= rss_bar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.2, help="minimum checkpoint size in GB (default 2.2)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where to generate (deleted afterwards)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement (alternating); each keeps its fastest (the VM's speed drifts)")
    parser.add_argument("--dst-dir", default=None,
                        help="where the copy and the conversion write (default: --workdir); e.g. /dev/shm to measure "
                             "the converter rather than a disk whose sustained writes are slower than its reads")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="aria-convert-bench-", dir=args.workdir)
    out_dir = tempfile.mkdtemp(prefix="aria-convert-bench-out-", dir=args.dst_dir) if args.dst_dir else work
    try:
        src, dst = os.path.join(work, "src"), os.path.join(out_dir, "dst")
        os.makedirs(src)
        t = time.perf_counter()
        total, largest = generate(src, args.gb * 1e9)
        print(
            f"generated {total / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s; "
            f"largest tensor {largest / 2**20:.0f} MiB"
        )
        for label, cold in (("warm cache", False), ("cold cache", True)):
            ok = report(label, scenario(src, dst, cold, args.repeats), largest)
            print(f"[{label}] {'PASS' if ok else 'FAIL'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
