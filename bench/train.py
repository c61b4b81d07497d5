"""Training step throughput and peak memory: aria_jax next to transformers, same random mid-size Aria and batch.

    python bench/train.py [--batch 2] [--seq 256] [--repeats 3] [--rounds 2] [--shapes [small,mid,...]]

Float32 on CPU, full fine-tuning of the whole text model (vision frozen, text-only batch), AdamW step included,
router losses on for aria_jax (they cost little) and off in transformers (it has none). Each side runs in its own
subprocess so that its peak RSS (ru_maxrss) is its own; aria_jax is timed warm (compiled). The sides alternate for
``--rounds`` processes each and each reports its fastest process (the shared VM drifts between processes).
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

from common import SHAPES, build_mid_checkpoint, print_table, shape_names  # noqa: E402


def _batch(vocab: int, batch: int, seq: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(10, vocab, (batch, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def run_jax(directory: str, batch: int, seq: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from aria_jax import Aria
    from aria_jax.model.aria import AriaModel
    from aria_jax.parallel import layout as param_layout
    from aria_jax.runtime import detect
    from aria_jax.training import steps as S
    from aria_jax.training.trainer import resolve_scan_layers

    model = Aria.from_pretrained(directory, dtype="float32", layout="stacked")
    cfg = model.config
    trainable, frozen = S.split_params(model.params, lambda p: p[0] != "vision_tower")
    del model  # the stacked copy goes once the trees below hold the per-layer one
    from flax import traverse_util

    trainable, frozen = traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)
    # the layout train.py picks (scan_layers null): per layer on CPU; BENCH_SCAN_LAYERS=1 runs the layer scan
    runtime = detect()
    if os.environ.get("BENCH_ATTENTION"):  # probe another attention kernel (aria_jax.runtime ATTENTION_KERNELS)
        runtime = runtime.replace(attention=os.environ["BENCH_ATTENTION"])
    layerwise = not resolve_scan_layers(True if os.environ.get("BENCH_SCAN_LAYERS") == "1" else None, runtime)
    if layerwise:
        trainable, frozen = param_layout.unroll_layers(trainable), param_layout.unroll_layers(frozen)
    spec = S.LossSpec(cfg.text.moe_topk, 1e-4, 1e-5, 1, None)
    module = AriaModel(cfg, moe_backend=os.environ.get("BENCH_MOE_BACKEND", "auto"),
                       layout="per_layer" if layerwise else "stacked", runtime=runtime)
    grad_fn = S.make_grad_fn(S.make_objective(module, spec))

    class Opt:
        adam_beta1, adam_beta2, adam_epsilon, weight_decay, max_grad_norm = 0.9, 0.95, 1e-8, 0.1, 1.0

    schedule = S.make_schedule("constant", 1e-5, 10, 0)
    tx = S.make_optimizer(Opt, schedule, trainable)
    update = jax.jit(S.make_update(tx, {}, schedule), donate_argnums=(0,))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    data = {k: jnp.asarray(v) for k, v in _batch(cfg.text.vocab_size, batch, seq).items()}
    denom = jnp.float32(batch * (seq - 1))

    spare = [jax.tree.map(jnp.zeros_like, trainable)]

    def step(state):
        (loss, _), grads = grad_fn(spare[0], state["trainable"], frozen, data, jax.random.key(0), denom)
        state, norm, _ = update(state, grads)
        spare[0] = grads
        jax.block_until_ready(state)
        return state, float(loss)

    t0 = time.perf_counter()
    state, _ = step(state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, loss = step(state)
        times.append(time.perf_counter() - t0)
    import roofline

    # The floor: useful FLOPs (forward x 3, only the routed experts each token uses) at the measured matmul rate.
    floor_s = batch * roofline.text_flops(cfg, seq, seq, seq, train=True) / roofline.measure_matmul()
    return {"step_s": float(np.median(times)), "first_step_s": first, "loss": loss, "floor_s": floor_s}


def run_hf(directory: str, batch: int, seq: int, repeats: int) -> dict:
    import torch
    from transformers import AriaForConditionalGeneration

    model = AriaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    model.set_attn_implementation("eager")
    model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                            weight_decay=0.1)
    data = {k: torch.as_tensor(v).long() for k, v in _batch(model.config.text_config.vocab_size, batch, seq).items()}

    def step():
        out = model(**data)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times)), "first_step_s": first, "loss": loss}


def child(side: str, directory: str, batch: int, seq: int, repeats: int) -> None:
    result = (run_jax if side == "jax" else run_hf)(directory, batch, seq, repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


SIDES = (("hf", "transformers (eager, grouped_mm)"), ("jax", "aria_jax (jit, moe auto)"))


def measure(directory: str, args) -> dict[str, list[dict]]:
    """Every side's child processes on one checkpoint. The shared VM's speed drifts between processes (up to +-20%
    for the same code): the sides alternate and each keeps its fastest process, so both get the same chances."""
    results: dict[str, list[dict]] = {side: [] for side, _ in SIDES}
    for _ in range(args.rounds):
        for side, _name in SIDES:
            cmd = [sys.executable, __file__, "--child", side, "--dir", directory, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[side].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    return results


def sweep(args) -> None:
    """``--shapes``: one row per shape of bench/common.py SHAPES: step time per side (best process), tokens/s ratio,
    peak RSS per side."""
    rows = []
    for name in shape_names(args.shapes):
        text, vision = SHAPES[name]
        with tempfile.TemporaryDirectory() as directory:
            build_mid_checkpoint(directory, vision=vision, **text)
            results = measure(directory, args)
        hf, ours = (min(results[side], key=lambda r: r["step_s"]) for side in ("hf", "jax"))
        rows.append({"shape": name, "step s (hf / jax)": f"{hf['step_s']:.2f} / {ours['step_s']:.2f}",
                     "ratio": f"{hf['step_s'] / ours['step_s']:.2f}x",
                     "peak RSS MB (hf / jax)": f"{hf['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f}"})
        print(json.dumps(rows[-1]), flush=True)
    print(f"training step sweep: batch {args.batch} x {args.seq}, float32, {args.rounds} process(es) per side and "
          "shape; ratio = transformers step / aria_jax step (bar, issue 23: >= 1.5x)")
    print_table(rows, ["shape", "step s (hf / jax)", "ratio", "peak RSS MB (hf / jax)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="child processes per side, alternated; each side reports its best process")
    parser.add_argument("--shapes", nargs="?", const=",".join(SHAPES), default=None,
                        help=f"sweep model shapes (default all: {', '.join(SHAPES)}; bench/common.py SHAPES)")
    parser.add_argument("--child", choices=("jax", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.batch, args.seq, args.repeats)
        return
    if args.shapes:
        sweep(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        build_mid_checkpoint(directory)
        results = measure(directory, args)
    tokens = args.batch * args.seq
    best = {side: min(results[side], key=lambda r: r["step_s"]) for side, _ in SIDES}
    for side, name in SIDES:
        r = best[side]
        all_steps = ", ".join(f"{x['step_s']:.2f}" for x in results[side])
        rows.append({"implementation": name, "step s": f"{r['step_s']:.3f}", "per process": all_steps,
                     "tokens/s": f"{tokens / r['step_s']:.0f}", "first step s": f"{r['first_step_s']:.1f}",
                     "peak RSS MB": f"{r['peak_rss_mb']:.0f}", "loss": f"{r['loss']:.4f}"})
        if "floor_s" in r:
            rows[-1]["floor s"] = f"{r['floor_s']:.3f} ({100 * r['floor_s'] / r['step_s']:.0f}%)"
    ratio = best["hf"]["step_s"] / best["jax"]["step_s"]
    print(f"batch {args.batch} x {args.seq} tokens, float32, CPU ({os.cpu_count()} cores)")
    print_table(rows, ["implementation", "step s", "per process", "tokens/s", "first step s", "peak RSS MB", "loss",
                       "floor s"])
    print(f"aria_jax / transformers tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
