"""Blockwise ("flash") attention (aria_jax/kernels/flash_attention.py) against the ``einsum`` path and transformers'
eager attention (``eager_attention_forward`` of modeling_aria on CPU torch): forward and forward + backward time and
memory, causal with a (all-valid) key mask as the decoder passes it, B=1, float32, same process, warm.

    python bench/attention.py                       # T 1024,2048,4096 x kv heads 16,4 x head dim 64,128; 16 heads
    python bench/attention.py --seq 2048 --kv-heads 16 --head-dim 64 --blocks 128x128,256x256,512x512   # tuning
    python bench/attention.py --rss                 # also peak RSS per case, each in a process of its own

Times are the best of ``--repeats`` runs after a warm-up. ``temp MiB``: XLA's temporary buffers of the compiled
forward + backward (``memory_analysis()``; jax's memory_stats are not kept on CPU). ``peak MiB`` (``--rss``): the
growth of the process's peak RSS (VmHWM) over its RSS with the inputs made and the function compiled, running the
forward and then the forward + backward once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # aria_jax from this checkout where it is not installed

from common import fail, positive_ints  # noqa: E402

IMPLS = ("einsum", "flash", "torch")


def _blocks(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        q, _, k = item.partition("x")
        if not (q.isdigit() and k.isdigit()) or int(q) < 1 or int(k) < 1:
            fail(f"--blocks: '{item}' is not BLOCK_QxBLOCK_K with positive integers (e.g. 256x256)")
        out.append((int(q), int(k)))
    return out


def _best(fn, repeats: int) -> float:
    """Best of ``repeats`` calls after one warm-up, in ms."""
    from common import timeit

    return 1e3 * timeit(fn, repeats, stat=min)


def _jax_fns(impl: str, seq: int, heads: int, kv: int, hd: int, block: tuple[int, int]):
    """(forward, forward + backward, inputs), jitted; the backward is the gradient of sum(out * w)."""
    import jax
    import jax.numpy as jnp

    from aria_jax.kernels.attention import attention
    from aria_jax.kernels.flash_attention import flash_attention

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, seq, heads, hd))
    k, v = (jax.random.normal(kk, (1, seq, kv, hd)) for kk in keys[1:3])
    w = jax.random.normal(keys[3], q.shape)
    valid = jnp.ones((1, seq), bool)
    if impl == "einsum":
        fn = lambda q, k, v: attention(q, k, v, valid, causal=True)  # noqa: E731
    else:
        fn = lambda q, k, v: flash_attention(q, k, v, valid, block_q=block[0], block_k=block[1])  # noqa: E731
    fwd = jax.jit(fn)
    both = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
    return fwd, both, (q, k, v)


def _torch_fns(seq: int, heads: int, kv: int, hd: int):
    import types

    import torch
    from transformers.models.aria.modeling_aria import eager_attention_forward

    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv, training=False)
    q = torch.randn(1, heads, seq, hd, requires_grad=True)
    k, v = (torch.randn(1, kv, seq, hd, requires_grad=True) for _ in range(2))
    w = torch.randn(1, seq, heads, hd)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]

    def fwd():
        with torch.no_grad():
            return eager_attention_forward(module, q, k, v, mask, hd**-0.5)[0]

    def both():
        (eager_attention_forward(module, q, k, v, mask, hd**-0.5)[0] * w).sum().backward()
        q.grad = k.grad = v.grad = None

    return fwd, both


def run_case(impl: str, seq: int, heads: int, kv: int, hd: int, block: tuple[int, int], repeats: int,
             backward: bool, rss: bool) -> dict:
    """One row: times (ms), XLA temp MiB and, ``rss``, the peak RSS growth (MiB) while running."""
    from common import reset_peak, status_mb

    row = {}
    if impl == "torch":
        fwd, both = _torch_fns(seq, heads, kv, hd)
        run_fwd, run_both = fwd, both
    else:
        import jax

        fwd, both_jit, args = _jax_fns(impl, seq, heads, kv, hd, block)
        run_fwd = lambda: jax.block_until_ready(fwd(*args))  # noqa: E731
        run_both = lambda: jax.block_until_ready(both_jit(*args))  # noqa: E731
        if backward:
            temp = both_jit.lower(*args).compile().memory_analysis().temp_size_in_bytes
        else:
            temp = fwd.lower(*args).compile().memory_analysis().temp_size_in_bytes
        row["temp MiB"] = f"{temp / 2**20:.0f}"
    if rss:
        run_fwd()  # compiled, caches warm
        if backward:
            run_both()
        base = status_mb("VmRSS")
        reset_peak()
        run_fwd()
        if backward:
            run_both()
        row["peak MiB"] = f"{status_mb('VmHWM') - base:.0f}"
    row["fwd ms"] = f"{_best(run_fwd, repeats):.1f}"
    if backward:
        row["fwd+bwd ms"] = f"{_best(run_both, repeats):.1f}"
    return row


def _child(args: argparse.Namespace) -> None:
    impl, seq, kv, hd, bq, bk = args.child.split(",")
    row = run_case(impl, int(seq), args.heads, int(kv), int(hd), (int(bq), int(bk)), args.repeats,
                   not args.no_backward, rss=True)
    print(json.dumps(row))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line and exit status 2, not argparse's usage block
    parser.add_argument("--seq", default="1024,2048,4096", help="sequence lengths T (comma-separated)")
    parser.add_argument("--heads", type=int, default=16, help="query heads N")
    parser.add_argument("--kv-heads", default="16,4", help="key/value heads K (comma-separated; divide N)")
    parser.add_argument("--head-dim", default="64,128", help="head dims H (comma-separated)")
    parser.add_argument("--blocks", default=None, help="flash block sizes BQxBK (comma-separated; default: the "
                        "kernel's defaults)")
    parser.add_argument("--impl", default=",".join(IMPLS), help=f"which of {', '.join(IMPLS)} (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--rss", action="store_true", help="each case in a process of its own, with its peak RSS")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the per-case processes of --rss
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return _child(args)
    if args.heads < 1 or args.repeats < 1:
        fail(f"--heads {args.heads} / --repeats {args.repeats}: both must be positive")
    seqs, kvs = positive_ints("--seq", args.seq), positive_ints("--kv-heads", args.kv_heads)
    hds = positive_ints("--head-dim", args.head_dim)
    bad = [kv for kv in kvs if args.heads % kv]
    if bad:
        fail(f"--kv-heads: {bad[0]} does not divide --heads {args.heads}")
    impls = [i for i in args.impl.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        name = unknown[0] if unknown else args.impl
        fail(f"--impl: unknown implementation '{name}'; choose from {', '.join(IMPLS)}")
    from aria_jax.kernels.flash_attention import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q

    blocks = _blocks(args.blocks) if args.blocks else [(DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)]
    if "torch" in impls and importlib.util.find_spec("transformers") is None:  # after every check of the arguments
        print("bench/attention.py: transformers is not installed: no torch column", file=sys.stderr)
        impls.remove("torch")
    rows = []
    for seq in seqs:
        for kv in kvs:
            for hd in hds:
                for impl in impls:
                    for block in (blocks if impl == "flash" else [None]):
                        name = f"flash {block[0]}x{block[1]}" if block else impl
                        row = {"T": seq, "K": kv, "H": hd, "impl": name}
                        row.update(_measure(args, impl, seq, kv, hd, block or blocks[0]))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    _speedups(rows)
    from common import print_table

    columns = ["T", "K", "H", "impl", "fwd ms", "fwd+bwd ms", "vs torch fwd", "vs torch fwd+bwd", "temp MiB"]
    print_table(rows, columns + (["peak MiB"] if args.rss else []))


def _measure(args: argparse.Namespace, impl: str, seq: int, kv: int, hd: int, block: tuple[int, int]) -> dict:
    if not args.rss:
        return run_case(impl, seq, args.heads, kv, hd, block, args.repeats, not args.no_backward, rss=False)
    command = [sys.executable, os.path.abspath(__file__), "--child", f"{impl},{seq},{kv},{hd},{block[0]},{block[1]}",
               "--heads", str(args.heads), "--repeats", str(args.repeats)] + (["--no-backward"] * args.no_backward)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"fwd ms": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:80]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _speedups(rows: list[dict]) -> None:
    """torch's time / each row's, per (T, K, H)."""
    torch_rows = {(r["T"], r["K"], r["H"]): r for r in rows if r["impl"] == "torch"}
    for r in rows:
        ref = torch_rows.get((r["T"], r["K"], r["H"]))
        for col in ("fwd ms", "fwd+bwd ms"):
            try:
                r[f"vs torch {col[:-3]}"] = f"{float(ref[col]) / float(r[col]):.2f}x"
            except (TypeError, KeyError, ValueError):
                pass


if __name__ == "__main__":
    main()
