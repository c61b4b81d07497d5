"""Long prompts (issue 24): prefill time, decode ms/token at that context, peak memory and compilations, aria_jax
next to transformers (eager attention, its default experts) on the same random mid-size Aria, one run.

    PYTHONPATH=. python bench/long_prompts.py [--prompt 1024,4096,16384] [--new-tokens 16] [--rounds 1]
                                              [--chat-turns 10] [--hf-memory-gb 20]

Each side and prompt length runs in its own child process (peak RSS is per process: VmHWM above the RSS after
loading). Prefill: the time to the first new token (transformers: a streamer's clock in ``generate``; aria_jax:
``last_stats``, warm). Decode: ms per token at that context (transformers: between the first and the last new
token; aria_jax: its timed decode loop). transformers runs under an address-space limit (``--hf-memory-gb``): an
allocation past it fails in that process and the table says so, instead of the VM swapping. ``--chat-turns`` then
replays an image chat whose prompt grows turn by turn (one 490 px image in the first turn, ~100 new prompt tokens
and the reply per turn) through one aria_jax model and prints the programs each turn compiled (``last_stats.compiles``).
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

from common import MID_P2Q, build_mid_checkpoint, print_table, reset_peak, status_mb  # noqa: E402

IMAGE_TOKEN = 9  # the mid checkpoint's image token id (transformers' AriaConfig default)


def prompt_ids(vocab: int, length: int) -> np.ndarray:
    return np.random.default_rng(length).integers(10, vocab, (1, length))


def run_hf(directory: str, length: int, n: int) -> dict:
    import torch
    from transformers import AriaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    hf = AriaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    ids = torch.as_tensor(prompt_ids(hf.config.text_config.vocab_size, length))

    class Clock(BaseStreamer):  # the time of every put: the prompt, then each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(k: int) -> tuple[float, float]:
        """(seconds to the first new token, seconds per later token)"""
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                        do_sample=False, streamer=clock)
        new = clock.times[1:]
        return new[0] - start, (new[-1] - new[0]) / (len(new) - 1)

    reset_peak()
    base = status_mb("VmRSS")
    try:
        runs = [gen(n + 1) for _ in range(1 if length > 8192 else 2)]  # a 16K prefill takes minutes
    except (RuntimeError, MemoryError) as err:  # the address-space limit: an allocation failed
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
                "peak_mb": status_mb("VmHWM") - base}
    return {"prefill_ms": 1000 * min(r[0] for r in runs), "decode_ms": 1000 * min(r[1] for r in runs),
            "peak_mb": status_mb("VmHWM") - base}


def run_jax(directory: str, length: int, n: int) -> dict:
    from aria_jax import Aria

    model = Aria.from_pretrained(directory, dtype="float32")
    ids = prompt_ids(model.config.text.vocab_size, length)
    reset_peak()
    base = status_mb("VmRSS")
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1)
    first = model.last_stats
    out = {"first_call_s": time.perf_counter() - start, "compiles": first.compiles, "compile_s": first.compile_s,
           "chunks": first.prefill_chunks}
    model.generate(ids, max_new_tokens=1)  # another token budget: compiles nothing
    out["compiles_budget_1"] = model.last_stats.compiles
    prefill, decode = [], []
    for _ in range(2):
        model.generate(ids, max_new_tokens=1)
        prefill.append(model.last_stats.prefill_ms)
        model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1)
        decode.append(1000 * model.last_stats.decode_s / n)
    out.update(prefill_ms=min(prefill), decode_ms=min(decode), peak_mb=status_mb("VmHWM") - base)
    return out


def run_chat(directory: str, turns: int, n: int) -> list[dict]:
    """A growing image chat through one model: each turn's prompt is the last one + its reply + ~100 tokens."""
    from aria_jax import Aria

    model = Aria.from_pretrained(directory, dtype="float32")
    rng = np.random.default_rng(0)
    vocab = model.config.text.vocab_size
    pixels = rng.uniform(-1, 1, (1, 3, 490, 490)).astype(np.float32)
    ids = np.concatenate([rng.integers(10, vocab, (1, 8)), np.full((1, MID_P2Q[1225]), IMAGE_TOKEN),
                          rng.integers(10, vocab, (1, 40))], axis=1)
    rows = []
    for turn in range(turns):
        start = time.perf_counter()
        reply = model.generate(ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n)
        stats = model.last_stats
        rows.append({"turn": turn + 1, "prompt tokens": ids.shape[1], "compiled": stats.compiles,
                     "compile s": f"{stats.compile_s:.1f}", "prefill chunks": stats.prefill_chunks,
                     "wall s": f"{time.perf_counter() - start:.1f}"})
        ids = np.concatenate([ids, reply, rng.integers(10, vocab, (1, int(rng.integers(80, 120))))], axis=1)
    return rows


def child(side: str, directory: str, length: int, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--dir", directory, "--prompt", str(length),
           "--new-tokens", str(args.new_tokens)]
    limit = int(args.hf_memory_gb * (1 << 30))

    def cap():  # transformers only: an allocation past the limit fails in the child, not the VM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          preexec_fn=cap if side == "hf" else None)
    if done.returncode:
        return {"error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="1024,4096,16384")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--chat-turns", type=int, default=10)
    parser.add_argument("--hf-memory-gb", type=float, default=20.0)
    parser.add_argument("--side", choices=["hf", "jax", "chat"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run = {"hf": run_hf, "jax": run_jax}.get(args.side)
        result = run_chat(args.dir, int(args.prompt), args.new_tokens) if run is None else run(
            args.dir, int(args.prompt), args.new_tokens)
        print(json.dumps(result))
        return
    lengths = [int(x) for x in args.prompt.split(",") if x]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        build_mid_checkpoint(directory, max_position_embeddings=max(lengths) * 2)
        for length in lengths:
            runs = {"hf": [], "jax": []}
            for _ in range(args.rounds):
                for side in runs:
                    runs[side].append(child(side, directory, length, args))
            rows.append(summarise(length, runs))
            print(json.dumps(rows[-1]), flush=True)
        chat = []
        if args.chat_turns:
            cmd = [sys.executable, __file__, "--side", "chat", "--dir", directory, "--prompt", str(args.chat_turns),
                   "--new-tokens", str(args.new_tokens)]
            chat = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    print("\nlong prompts, batch 1, float32 (transformers: eager attention); ratio = transformers time / aria_jax")
    print_table(rows, ["prompt", "prefill ms (hf / jax)", "prefill ratio", "decode ms/token (hf / jax)",
                       "decode ratio", "peak MB (hf / jax)", "jax compiled (first call / new budget)",
                       "jax first call s (compile s)", "chunks"])
    if chat:
        print(f"\n{args.chat_turns}-turn image chat (one model, growing prompt): programs compiled per turn, "
              f"{sum(r['compiled'] for r in chat)} in all")
        print_table(chat, list(chat[0]))


def summarise(length: int, runs: dict[str, list[dict]]) -> dict:
    def best(side: str, key: str):
        ok = [r for r in runs[side] if "error" not in r]
        return min(r[key] for r in ok) if ok else None

    hf_p, jax_p, hf_d, jax_d = best("hf", "prefill_ms"), best("jax", "prefill_ms"), best("hf", "decode_ms"), best(
        "jax", "decode_ms")
    fail = next((r["error"] for r in runs["hf"] if "error" in r), "")
    jax0 = next((r for r in runs["jax"] if "error" not in r), {})
    show = lambda x: "failed" if x is None else f"{x:.1f}"  # noqa: E731
    return {
        "prompt": length,
        "prefill ms (hf / jax)": f"{show(hf_p)} / {show(jax_p)}",
        "prefill ratio": f"{hf_p / jax_p:.2f}x" if hf_p and jax_p else "",
        "decode ms/token (hf / jax)": f"{show(hf_d)} / {show(jax_d)}",
        "decode ratio": f"{hf_d / jax_d:.2f}x" if hf_d and jax_d else "",
        "peak MB (hf / jax)": f"{show(best('hf', 'peak_mb'))} / {show(best('jax', 'peak_mb'))}",
        "jax compiled (first call / new budget)": f"{jax0.get('compiles')} / {jax0.get('compiles_budget_1')}",
        "jax first call s (compile s)": f"{jax0.get('first_call_s', 0):.1f} ({jax0.get('compile_s', 0):.1f})",
        "chunks": jax0.get("chunks"),
        "hf error": fail,
        "jax error": next((r["error"] for r in runs["jax"] if "error" in r), ""),
    }


if __name__ == "__main__":
    main()
