"""``aria-jax serve`` under load: 1, 4, 8 and 16 concurrent clients (the openai client, one thread each) against an
in-process server on 127.0.0.1, next to the same requests sent one after another through ``Aria.chat``.

    python bench/serve.py [--model DIR] [--clients 1,4,8,16] [--requests 32] [--max-tokens 32] [--max-batch 8]
                          [--max-seq-len 256] [--decode-steps 1,4] [--rounds 2] [--quick]

Without ``--model`` it builds the random mid-size Aria (bench/common.py, needs torch) and gives it the demo's tiny
tokenizer (aria_jax/cli/demo.py): random weights decode mostly to ids the tokenizer does not know, so counts are
tokens (the responses' ``usage``), not characters. Every request is greedy with its own prompt and
``max_tokens`` (all of them run to ``max_tokens`` unless an eos comes first). Columns: total generated tokens/s
over the wall time of the whole run; p50 / p99 request latency; p50 time to first token (the server's: submission
to first token, from its metrics); the speed-up over the sequential run; the server's time in decode programs and in
prefills, and per decode step (its metrics); every round's tokens/s. One server per ``--decode-steps`` value; the
rows alternate for ``--rounds`` rounds and each keeps its best. ``--quick``: the tiny demo model (no torch), 1 and 4
clients, 8 requests of 8 tokens, one round: a smoke run that the code works.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(__file__))

from common import MID_P2Q, build_mid_checkpoint, fail, positive_ints, print_table  # noqa: E402

MAX_DECODE_STEPS = 64  # aria_jax.serve.engine's bound (imported there only after the arguments are checked)

WORDS = "the quick brown fox jumps over the lazy dog describe the image in detail a cat on a sofa".split()


def prompts(n: int) -> list[str]:
    """``n`` different prompts of 4 to 40 words."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + (i * 11) % 37)) for i in range(n)]


def build_model_dir(directory: str, quick: bool) -> str:
    from aria_jax.cli.demo import build_random_checkpoint, write_tokenizer

    if quick:
        return build_random_checkpoint(directory)
    build_mid_checkpoint(directory)
    write_tokenizer(directory, 32000, {490: MID_P2Q[1225], 980: MID_P2Q[4900]})
    return directory


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def sequential(model, texts: list[str], max_tokens: int) -> dict:
    latencies, ttft, tokens = [], [], 0
    start = time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        model.chat([{"role": "user", "content": [{"type": "text", "text": text}]}], max_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
        ttft.append(model.last_stats.prefill_ms / 1000)
        tokens += model.last_stats.new_tokens
    return dict(wall=time.perf_counter() - start, tokens=tokens, latencies=latencies, ttft=ttft)


def concurrent(client, engine, texts: list[str], max_tokens: int, clients: int) -> dict:
    latencies, tokens, lock = [], [0], threading.Lock()
    seen = len(engine.metrics.recent_ttft)

    def ask(text):
        t = time.perf_counter()
        reply = client.chat.completions.create(model="bench", max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": text}])
        with lock:
            latencies.append(time.perf_counter() - t)
            tokens[0] += reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, texts))
    ttft = list(engine.metrics.recent_ttft)[seen:]
    return dict(wall=time.perf_counter() - start, tokens=tokens[0], latencies=latencies, ttft=ttft)


def row(name: str, run: dict, base: dict | None) -> dict:
    rate = run["tokens"] / run["wall"]
    return {"clients": name, "requests": len(run["latencies"]), "tokens": run["tokens"], "tok/s": f"{rate:.1f}",
            "p50 latency s": f"{percentile(run['latencies'], 0.5):.2f}",
            "p99 latency s": f"{percentile(run['latencies'], 0.99):.2f}",
            "p50 TTFT s": f"{percentile(run['ttft'], 0.5):.3f}",
            "x sequential": f"{rate / (base['tokens'] / base['wall']):.2f}" if base else "1.00"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line and exit status 2, not argparse's usage block
    parser.add_argument("--model", default=None, help="a model directory with a tokenizer (default: the mid model)")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per row (at least the clients)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--decode-steps", default="4",
                        help="the engine's decode steps per host round trip; several (1,4): one server each")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of every row, alternated; each row reports its best (the VM drifts)")
    parser.add_argument("--quick", action="store_true", help="tiny demo model, 1 and 4 clients, 8 requests of 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.max_seq_len, args.rounds = "1,4", 8, 8, 128, 1
    counts = positive_ints("--clients", args.clients)
    step_counts = positive_ints("--decode-steps", args.decode_steps)
    if args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        fail("--requests, --max-tokens and --rounds must be positive")
    if max(step_counts) > MAX_DECODE_STEPS:
        fail(f"--decode-steps: each must be in 1..{MAX_DECODE_STEPS}, got '{args.decode_steps}'")

    import openai

    from aria_jax import Aria
    from aria_jax.serve.app import ServerConfig, create_app
    from aria_jax.serve.background import serving
    from aria_jax.serve.engine import Engine

    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        path = args.model or build_model_dir(directory, args.quick)
        model = Aria.from_pretrained(path)
        texts = prompts(max(args.requests, max(counts)))
        sequential(model, texts[:2], args.max_tokens)  # compile Aria.chat's programs for these lengths
        sequential(model, texts, args.max_tokens)  # and the buckets of the rest
        servers = {}
        for k in step_counts:  # one server per --decode-steps, all up (idle ones wait on a lock) for the whole run
            engine = Engine(model, args.max_batch, args.max_seq_len, max_queue=max(counts) + len(texts),
                            decode_steps=k)
            engine.warm_up(groups=True)  # as `aria-jax serve` does
            engine.start()
            stack.callback(engine.stop)
            url = stack.enter_context(serving(create_app(engine, ServerConfig(model_id="bench"))))
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            for n in (1, max(counts)):  # compile every prompt bucket (alone and in groups)
                concurrent(client, engine, texts, args.max_tokens, n)
            servers[k] = engine, client
        runs: dict[str, list[dict]] = collections.defaultdict(list)
        for _ in range(args.rounds):  # the sides alternate; each row keeps its best round (the VM drifts)
            runs["Aria.chat, one after another"].append(sequential(model, texts, args.max_tokens))
            for k, (engine, client) in servers.items():
                for n in counts:
                    m = engine.metrics
                    before = (m.steps, m.step_seconds, m.prefill_seconds)
                    run = concurrent(client, engine, texts[:max(args.requests, n)], args.max_tokens, n)
                    run["steps"], run["step_s"], run["prefill_s"] = (
                        a - b for a, b in zip((m.steps, m.step_seconds, m.prefill_seconds), before, strict=True))
                    runs[f"serve (--decode-steps {k}), {n} concurrent"].append(run)
        best = {name: max(found, key=lambda r: r["tokens"] / r["wall"]) for name, found in runs.items()}
        base = best["Aria.chat, one after another"]
        rows = []
        for name, run in best.items():
            rows.append(row(name, run, None if "Aria.chat" in name else base))
            if "steps" in run:
                rows[-1]["in decode / prefill s"] = f"{run['step_s']:.2f} / {run['prefill_s']:.2f}"
                rows[-1]["ms per decode step"] = f"{1000 * run['step_s'] / max(run['steps'], 1):.1f}"
            rows[-1]["tok/s per round"] = ", ".join(f"{r['tokens'] / r['wall']:.0f}" for r in runs[name])
    print(f"\nmodel {path if args.model else ('tiny demo' if args.quick else 'mid (random)')}; "
          f"{args.max_tokens} new tokens per request; --max-batch {args.max_batch}, --max-seq-len "
          f"{args.max_seq_len}; best of {args.rounds} round(s); runtime {model.runtime.describe()}\n")
    print_table(rows, list(rows[-1]))
    print(f"\nmedian of sequential latencies {statistics.median(base['latencies']):.2f} s")


if __name__ == "__main__":
    main()
