"""Decode tokens/s at batch 1 and 8 and image prefill latency: aria_jax next to transformers and the floors, one run.

    python bench/generate.py [--new-tokens 32] [--prompt 64] [--repeats 5] [--layout auto]

Same random mid-size Aria for both (bench/common.py), float32, CPU. transformers runs eager attention and its
default (grouped_mm) experts; its decode rate is (time of N+1 new tokens - time of 1) / N, so the prefill is
excluded on both sides. aria_jax is timed warm (compiled), as a serving loop runs. The floors (bench/roofline.py)
use this machine's bandwidth and matmul rate measured in the same run: a decode step's floor is the bytes it reads
(with the experts its tokens were really routed to, counted from the router on the generated sequence) over the
bandwidth; the prefill's is its useful FLOPs over the matmul rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import roofline  # noqa: E402
from common import MID_P2Q, build_mid_checkpoint, print_table, timeit  # noqa: E402


def distinct_experts(model, ids: np.ndarray, first: int) -> float:
    """Mean number of distinct experts per layer that one decode step's batch uses, for positions >= first."""
    import jax

    _, router_logits, _ = model.module.apply({"params": model.run_params}, ids)
    k = model.config.text.moe_topk
    layers, _, experts = router_logits.shape
    top = np.asarray(jax.lax.top_k(router_logits, k)[1]).reshape(layers, ids.shape[0], ids.shape[1], k)
    counts = [len(np.unique(top[layer, :, pos])) for layer in range(layers) for pos in range(first, ids.shape[1])]
    return float(np.mean(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="text prompt length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layout", default="auto", help="aria_jax parameter layout: auto, unrolled or stacked")
    args = parser.parse_args()

    import jax
    import torch

    from aria_jax import Aria

    n = args.new_tokens
    bandwidth, matmul_rate = roofline.measure_bandwidth(), roofline.measure_matmul()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        hf = build_mid_checkpoint(directory)
        hf.set_attn_implementation("eager")
        ours = Aria.from_pretrained(directory, dtype="float32", layout=args.layout)
    vocab = hf.config.text_config.vocab_size
    rows = []
    for batch in (1, 8):
        ids = rng.integers(10, vocab, (batch, args.prompt))
        mask = np.ones_like(ids)
        t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)

        def hf_gen(k, t_ids=t_ids, t_mask=t_mask):
            with torch.no_grad():
                hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=k, min_new_tokens=k,
                            do_sample=False)

        hf_s = (timeit(lambda: hf_gen(n + 1), args.repeats) - timeit(lambda: hf_gen(1), args.repeats)) / n
        decode_s = []
        for _ in range(args.repeats + 1):
            new = ours.generate(ids, mask, max_new_tokens=n + 1, min_new_tokens=n + 1)
            decode_s.append(ours.last_stats.decode_s / n)
        ours_s = float(np.median(decode_s[1:]))
        experts = distinct_experts(ours, np.concatenate([ids, new[:, :n]], axis=1), args.prompt)
        floor_s = roofline.decode_bytes(ours.config, batch, experts, args.prompt + n / 2) / bandwidth
        rows.append({
            "benchmark": f"decode, batch {batch}",
            "transformers tok/s": f"{batch / hf_s:.1f}",
            "aria_jax tok/s": f"{batch / ours_s:.1f}",
            "ratio": f"{hf_s / ours_s:.2f}x",
            "floor": f"{batch / floor_s:.0f} tok/s ({experts:.1f} experts/layer)",
            "aria_jax / floor": roofline.fraction(floor_s, ours_s),
        })

    # Image prefill: one 490px image (128 tokens) + text, time to the first token's logits.
    patches = 1225
    pixels = rng.uniform(-1, 1, (1, 3, 490, 490)).astype(np.float32)
    img_ids = np.concatenate([rng.integers(10, vocab, (1, 8)), np.full((1, MID_P2Q[patches]), 9),
                              rng.integers(10, vocab, (1, 24))], axis=1)
    t_in = dict(input_ids=torch.as_tensor(img_ids), pixel_values=torch.as_tensor(pixels))

    def hf_prefill():
        with torch.no_grad():
            hf(**t_in)

    def ours_prefill():
        ours.generate(img_ids, pixel_values=pixels, max_new_tokens=1)
        return ours.last_stats.prefill_ms

    hf_ms = 1000 * timeit(hf_prefill, args.repeats)
    ours_prefill()
    ours_ms = float(np.median([ours_prefill() for _ in range(args.repeats)]))
    cfg = ours.config
    flops = roofline.vision_flops(cfg, 1, patches) + roofline.text_flops(cfg, img_ids.shape[1], img_ids.shape[1], 1)
    floor_ms = 1000 * flops / matmul_rate
    rows.append({
        "benchmark": "image prefill (490px + 32 text)",
        "transformers ms": f"{hf_ms:.1f}",
        "aria_jax ms": f"{ours_ms:.1f}",
        "ratio": f"{hf_ms / ours_ms:.2f}x",
        "floor": f"{floor_ms:.0f} ms ({flops / 1e9:.1f} GFLOP)",
        "aria_jax / floor": roofline.fraction(floor_ms, ours_ms),
    })
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); ratio = transformers time / aria_jax time; layout {ours.layout}")
    print(f"measured: memory bandwidth {bandwidth / 1e9:.1f} GB/s (copy), "
          f"float32 matmul {matmul_rate / 1e9:.0f} GFLOP/s")
    print_table(rows, ["benchmark", "transformers tok/s", "aria_jax tok/s", "transformers ms", "aria_jax ms", "ratio",
                       "floor", "aria_jax / floor"])


if __name__ == "__main__":
    main()
