"""Decode tokens/s at batch 1 and 8 and image prefill latency: aria_jax next to transformers and the floors, one run.

    python bench/generate.py [--new-tokens 32] [--prompt 64] [--repeats 5] [--rounds 2] [--layout auto]
                             [--quantize int8,int4]
    python bench/generate.py --prompt 1024,4096,16384      # long prompts: bench/long_prompts.py

Same random mid-size Aria for both (bench/common.py), float32, CPU. transformers runs eager attention and its
default (grouped_mm) experts; its decode rate is (time of N+1 new tokens - time of 1) / N, so the prefill is
excluded on both sides. aria_jax is timed warm (compiled), as a serving loop runs. Each side runs in its own child
process on the same saved checkpoint and inputs (torch's idle OpenMP threads spin and would slow whoever runs
after them in one process); the shared VM's speed drifts between processes, so the sides alternate over
``--rounds`` processes each and every metric keeps each side's best process. The floors (bench/roofline.py)
use this machine's bandwidth and matmul rate measured in the same run: a decode step's floor is the bytes it reads
(with the experts its tokens were really routed to, counted from the router on the generated sequence) over the
bandwidth; the prefill's is its useful FLOPs over the matmul rate.

``--quantize int8,int4`` adds an aria_jax process per format (``Aria.from_pretrained(quantize=...)``, the same
float32 checkpoint quantized while loading), alternated with the others: decode at batch 1 and 8 next to aria_jax's
own float32 decode, each with its floor from the bytes the quantized step reads (int4 one value per byte where the
runtime holds it so: CPU), and the host memory loading takes in each process (peak RSS during
``from_pretrained`` and what stays resident after it, above the RSS before it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import roofline  # noqa: E402
from common import (  # noqa: E402
    MID_P2Q,
    MID_TEXT,
    MID_VISION,
    SHAPES,
    build_mid_checkpoint,
    print_table,
    reset_peak,
    shape_names,
    status_mb,
    timeit,
)


def distinct_experts(model, ids: np.ndarray, first: int) -> float:
    """Mean number of distinct experts per layer that one decode step's batch uses, for positions >= first."""
    import jax

    router_logits = model.module.apply({"params": model.params}, ids).router_logits
    k = model.config.text.moe_topk
    layers, _, experts = router_logits.shape
    top = np.asarray(jax.lax.top_k(router_logits, k)[1]).reshape(layers, ids.shape[0], ids.shape[1], k)
    counts = [len(np.unique(top[layer, :, pos])) for layer in range(layers) for pos in range(first, ids.shape[1])]
    return float(np.mean(counts))


def inputs(vocab: int, prompt: int) -> dict:
    """The same prompts and image for both sides: text batches of 1 and 8, one 490px image (128 tokens) + text."""
    rng = np.random.default_rng(0)
    text = {batch: rng.integers(10, vocab, (batch, prompt)) for batch in (1, 8)}
    pixels = rng.uniform(-1, 1, (1, 3, 490, 490)).astype(np.float32)
    image_ids = np.concatenate([rng.integers(10, vocab, (1, 8)), np.full((1, MID_P2Q[1225]), 9),
                                rng.integers(10, vocab, (1, 24))], axis=1)
    return {"text": text, "pixels": pixels, "image_ids": image_ids}


def run_hf(directory: str, n: int, prompt: int, repeats: int) -> dict:
    import torch
    from transformers import AriaForConditionalGeneration

    hf = AriaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    data = inputs(hf.config.text_config.vocab_size, prompt)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for batch, ids in data["text"].items():
        t_ids = torch.as_tensor(ids)

        def gen(k, t_ids=t_ids):
            with torch.no_grad():
                hf.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=k,
                            min_new_tokens=k, do_sample=False)

        out[f"decode_s_{batch}"] = (timeit(lambda: gen(n + 1), repeats) - timeit(lambda: gen(1), repeats)) / n
    t_in = dict(input_ids=torch.as_tensor(data["image_ids"]), pixel_values=torch.as_tensor(data["pixels"]))

    def prefill():
        with torch.no_grad():
            hf(**t_in)

    out["prefill_ms"] = 1000 * timeit(prefill, repeats)
    return out


def run_jax(directory: str, n: int, prompt: int, repeats: int, layout: str, quantize: str | None = None) -> dict:
    import jax

    from aria_jax import Aria

    reset_peak()
    before = status_mb("VmRSS")
    ours = Aria.from_pretrained(directory, dtype="float32", layout=layout, quantize=quantize)
    data = inputs(ours.config.text.vocab_size, prompt)
    out = {"jax": jax.__version__, "platform": jax.devices()[0].platform, "layout": ours.layout,
           "load_peak_mb": status_mb("VmHWM") - before, "load_kept_mb": status_mb("VmRSS") - before,
           "bandwidth": roofline.measure_bandwidth(), "matmul": roofline.measure_matmul()}
    quant, packed = ours.runtime.quant, ours.runtime.int4_packed
    for batch, ids in data["text"].items():
        mask = np.ones_like(ids)
        decode_s = []
        for _ in range(repeats + 1):
            new = ours.generate(ids, mask, max_new_tokens=n + 1, min_new_tokens=n + 1)
            decode_s.append(ours.last_stats.decode_s / n)
        out[f"decode_s_{batch}"] = float(np.median(decode_s[1:]))
        experts = distinct_experts(ours, np.concatenate([ids, new[:, :n]], axis=1), prompt)
        out[f"experts_{batch}"] = experts
        out[f"floor_s_{batch}"] = roofline.decode_bytes(ours.config, batch, experts, prompt + n / 2, quant,
                                                        packed) / out["bandwidth"]

    def prefill():
        ours.generate(data["image_ids"], pixel_values=data["pixels"], max_new_tokens=1)
        return ours.last_stats.prefill_ms

    prefill()
    out["prefill_ms"] = float(np.median([prefill() for _ in range(repeats)]))
    out["prefill_flops"] = (roofline.vision_flops(ours.config, 1, 1225)
                            + roofline.text_flops(ours.config, *(data["image_ids"].shape[1],) * 2, 1))
    return out


def best(runs: list[dict], key: str) -> dict:
    """The process with the lowest time ``key`` (its floor and expert count go with it)."""
    return min(runs, key=lambda r: r[key])


def per_process(runs: dict[str, list[dict]], show) -> str:
    """``show(run)`` for every transformers process, then every aria_jax one: "a b c / d e f"."""
    return " / ".join(" ".join(show(r) for r in runs[side]) for side in ("hf", "jax"))


def child(side: str, directory: str, args) -> dict:
    name, _, weights = side.partition("-")  # "jax-int8": an aria_jax process with int8 weights
    cmd = [sys.executable, __file__, "--side", name, "--dir", directory, "--new-tokens", str(args.new_tokens),
           "--prompt", str(args.prompt), "--repeats", str(args.repeats), "--layout", args.layout]
    if weights:
        cmd += ["--quantize", weights]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="64",
                        help="text prompt length; several (1024,4096,16384): bench/long_prompts.py")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="child processes per side, alternated; each metric keeps each side's best process")
    parser.add_argument("--layout", default="auto", help="aria_jax parameter layout: auto, unrolled or stacked")
    parser.add_argument("--quantize", default="",
                        help="comma-separated weight formats to add (int8, int4): one more aria_jax process each")
    parser.add_argument("--shapes", nargs="?", const=",".join(SHAPES), default=None,
                        help=f"sweep model shapes (default all: {', '.join(SHAPES)}; bench/common.py SHAPES)")
    parser.add_argument("--side", choices=("hf", "jax"), help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "," in args.prompt:  # long prompts: prefill, decode at that context, memory, compilations
        import long_prompts

        sys.argv = [long_prompts.__file__, "--prompt", args.prompt, "--new-tokens", str(args.new_tokens)]
        long_prompts.main()
        return
    try:
        args.prompt = int(args.prompt)
    except ValueError:
        sys.exit(f"--prompt: expected a token count or a comma-separated list of them, got '{args.prompt}'")
    n = args.new_tokens
    if args.side:
        run = run_hf(args.dir, n, args.prompt, args.repeats) if args.side == "hf" else run_jax(
            args.dir, n, args.prompt, args.repeats, args.layout, args.quantize or None)
        print(json.dumps(run))
        return
    formats = [f for f in args.quantize.split(",") if f]
    if any(f not in ("int8", "int4") for f in formats):
        sys.exit(f"--quantize: unknown format in '{args.quantize}'; choose from int8, int4")
    if args.shapes:
        sweep(args)
        return
    runs: dict[str, list[dict]] = {"hf": [], "jax": [], **{f"jax-{f}": [] for f in formats}}
    with tempfile.TemporaryDirectory() as directory:
        build_mid_checkpoint(directory)
        for _ in range(args.rounds):
            for side in runs:
                runs[side].append(child(side, directory, args))
    rows = []
    for batch in (1, 8):
        key = f"decode_s_{batch}"
        hf, ours = best(runs["hf"], key), best(runs["jax"], key)
        hf_s, ours_s = hf[key], ours[key]
        experts, floor_s = ours[f"experts_{batch}"], ours[f"floor_s_{batch}"]
        rows.append({
            "benchmark": f"decode, batch {batch}",
            "transformers tok/s": f"{batch / hf_s:.1f}",
            "aria_jax tok/s": f"{batch / ours_s:.1f}",
            "ratio": f"{hf_s / ours_s:.2f}x",
            "floor": f"{batch / floor_s:.0f} tok/s ({experts:.1f} experts/layer)",
            "aria_jax / floor": roofline.fraction(floor_s, ours_s),
            "per process (hf / jax)": per_process(runs, lambda r, key=key, batch=batch: f"{batch / r[key]:.1f}"),
        })
    hf, ours = best(runs["hf"], "prefill_ms"), best(runs["jax"], "prefill_ms")
    floor_ms = 1000 * ours["prefill_flops"] / ours["matmul"]
    rows.append({
        "benchmark": "image prefill (490px + 32 text)",
        "transformers ms": f"{hf['prefill_ms']:.1f}",
        "aria_jax ms": f"{ours['prefill_ms']:.1f}",
        "ratio": f"{hf['prefill_ms'] / ours['prefill_ms']:.2f}x",
        "floor": f"{floor_ms:.0f} ms ({ours['prefill_flops'] / 1e9:.1f} GFLOP)",
        "aria_jax / floor": roofline.fraction(floor_ms, ours["prefill_ms"]),
        "per process (hf / jax)": per_process(runs, lambda r: f"{r['prefill_ms']:.0f}"),
    })
    print(f"jax {ours['jax']} ({ours['platform']}, layout {ours['layout']}), torch {hf['torch']} "
          f"({hf['threads']} threads); each in its own process, {args.rounds} alternated per side, best process "
          "per metric; ratio = transformers time / aria_jax time")
    print("measured: memory bandwidth " + ", ".join(f"{r['bandwidth'] / 1e9:.1f}" for r in runs["jax"])
          + " GB/s (copy), float32 matmul " + ", ".join(f"{r['matmul'] / 1e9:.0f}" for r in runs["jax"])
          + " GFLOP/s (per aria_jax process; each floor uses its own process's)")
    print_table(rows, ["benchmark", "transformers tok/s", "aria_jax tok/s", "transformers ms", "aria_jax ms", "ratio",
                       "floor", "aria_jax / floor", "per process (hf / jax)"])
    if formats:
        print_quantized(runs, formats)


def sweep(args) -> None:
    """``--shapes``: every named shape of bench/common.py SHAPES, each side in its own processes as the single run,
    one row per shape: decode at batch 1 and 8 and the image prefill, best process per side, ratios."""
    rows = []
    for name in shape_names(args.shapes):
        text, vision = SHAPES[name]
        runs: dict[str, list[dict]] = {"hf": [], "jax": []}
        with tempfile.TemporaryDirectory() as directory:
            build_mid_checkpoint(directory, vision=vision, **text)
            for _ in range(args.rounds):
                for side in runs:
                    runs[side].append(child(side, directory, args))
        row = {"shape": name, "text": _text_shape(text), "vision": _vision_shape(vision)}
        for batch in (1, 8):
            key = f"decode_s_{batch}"
            hf, ours = best(runs["hf"], key)[key], best(runs["jax"], key)[key]
            row[f"decode b{batch} tok/s (hf / jax)"] = f"{batch / hf:.1f} / {batch / ours:.1f}"
            row[f"b{batch} ratio"] = f"{hf / ours:.2f}x"
            floor = best(runs["jax"], key)[f"floor_s_{batch}"]  # the bytes the step reads / this run's bandwidth
            row[f"b{batch} of floor (hf / jax)"] = f"{floor / hf:.0%} / {floor / ours:.0%}"
            row[f"b{batch} ratio at the floor"] = f"{hf / floor:.2f}x"  # the most any implementation could reach
        hf, ours = best(runs["hf"], "prefill_ms")["prefill_ms"], best(runs["jax"], "prefill_ms")["prefill_ms"]
        row["prefill ms (hf / jax)"] = f"{hf:.0f} / {ours:.0f}"
        row["prefill ratio"] = f"{hf / ours:.2f}x"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"shape sweep: {args.rounds} process(es) per side and shape, best process per metric; ratio = "
          "transformers time / aria_jax time; bars (issue 23): decode >= 3x at batch 1, >= 2.5x at batch 8, "
          "image prefill >= 1.2x; 'ratio at the floor': transformers' time over the bytes-read floor (the ratio an "
          "implementation reading at the measured bandwidth would reach)")
    print_table(rows, ["shape", "text", "vision", "decode b1 tok/s (hf / jax)", "b1 ratio", "b1 of floor (hf / jax)",
                       "b1 ratio at the floor", "decode b8 tok/s (hf / jax)", "b8 ratio", "b8 of floor (hf / jax)",
                       "b8 ratio at the floor", "prefill ms (hf / jax)", "prefill ratio"])


def _text_shape(text: dict) -> str:
    t = {**MID_TEXT, **text}
    return (f"V {t['vocab_size'] // 1000}k, D {t['hidden_size']}, {t['num_attention_heads']}/"
            f"{t['num_key_value_heads']} heads, {t['moe_num_experts']} x {t['intermediate_size']} top-{t['moe_topk']}")


def _vision_shape(vision: dict) -> str:
    v = {**MID_VISION, **vision}
    return f"{v['hidden_size']} x {v['num_attention_heads']} heads"


def print_quantized(runs: dict[str, list[dict]], formats: list[str]) -> None:
    """Decode per weight format next to aria_jax float32 and transformers (best process each), and load memory."""
    rows = []
    for batch in (1, 8):
        key = f"decode_s_{batch}"
        hf, ref = best(runs["hf"], key)[key], best(runs["jax"], key)[key]
        for side in ("jax", *(f"jax-{f}" for f in formats)):
            r = best(runs[side], key)
            rows.append({
                "decode": f"batch {batch}", "weights": "float32" if side == "jax" else side[4:],
                "aria_jax tok/s": f"{batch / r[key]:.1f}",
                "vs aria_jax float32": f"{ref / r[key]:.2f}x", "vs transformers": f"{hf / r[key]:.2f}x",
                "floor": f"{batch / r[f'floor_s_{batch}']:.0f} tok/s",
                "of floor": roofline.fraction(r[f"floor_s_{batch}"], r[key]),
                "per process": " ".join(f"{batch / p[key]:.1f}" for p in runs[side]),
            })
    for side in ("jax", *(f"jax-{f}" for f in formats)):
        rows.append({"decode": "load", "weights": "float32" if side == "jax" else side[4:],
                     "aria_jax tok/s": "peak RSS +" + " / +".join(f"{p['load_peak_mb']:.0f}" for p in runs[side])
                     + " MB, kept +" + " / +".join(f"{p['load_kept_mb']:.0f}" for p in runs[side]) + " MB"})
    print("\nweight-only quantization (same checkpoint quantized while loading; floors from the bytes each step reads)")
    print_table(rows, ["decode", "weights", "aria_jax tok/s", "vs aria_jax float32", "vs transformers", "floor",
                       "of floor", "per process"])


if __name__ == "__main__":
    main()
