"""The ``aria-jax`` command line. Bad input exits with status 2 and one line naming the file, key or value."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from aria_jax import cli_generate
from aria_jax.config import AriaConfig, ConfigError
from aria_jax.safetensors_io import CheckpointError, open_checkpoint
from aria_jax.weights import detect_layout, tensor_specs, to_hub_name


def parameter_counts(cfg: AriaConfig) -> dict[str, int]:
    """Total parameters (as loaded: without the unused post_layernorm) and those active per text token."""
    t = cfg.text
    attention = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    expert = 3 * t.hidden_size * t.intermediate_size
    shared = 3 * t.hidden_size * t.shared_intermediate_size
    router = t.hidden_size * t.moe_num_experts
    norms = 2 * t.hidden_size
    active_layer = attention + router + t.moe_topk * expert + shared + norms
    total = sum(_numel(shape) for shape, _ in tensor_specs(cfg).values())
    return {
        "total": total,
        "routed_experts": t.num_hidden_layers * t.moe_num_experts * expert,
        # Per text token: every layer's attention, router, top-k experts, shared experts and norms, the final
        # norm and lm_head (the embedding row lookup is not a matmul and is not counted).
        "active_per_token": t.num_hidden_layers * active_layer + t.hidden_size + t.vocab_size * t.hidden_size,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args: argparse.Namespace) -> int:
    from aria_jax.api import resolve_path

    path = resolve_path(args.path)
    cfg = AriaConfig.from_pretrained(path)
    tensors = open_checkpoint(path)
    layout = detect_layout(list(tensors), path)
    dtypes = Counter(str(shard.dtype(k)) for k, shard in tensors.items())
    nbytes = sum(shard.nbytes(k) for k, shard in tensors.items())
    counts = parameter_counts(cfg)
    specs = tensor_specs(cfg)
    unknown = [k for k in tensors if to_hub_name(k, layout) not in specs]
    print(f"path:              {path}")
    print(f"layout:            {layout}")
    print(f"tensors:           {len(tensors)} in {len({s.path for s in tensors.values()})} file(s)")
    print(f"dtypes:            {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}")
    print(f"bytes:             {nbytes:,} ({nbytes / 2**30:.2f} GiB)")
    print(f"parameters:        {counts['total']:,} ({_fmt(counts['total'])})")
    print(f"  routed experts:  {counts['routed_experts']:,} ({_fmt(counts['routed_experts'])})")
    print(f"  active/token:    {counts['active_per_token']:,} ({_fmt(counts['active_per_token'])})")
    t, v = cfg.text, cfg.vision
    print(
        f"text:              {t.num_hidden_layers} layers, d={t.hidden_size}, {t.num_attention_heads} heads "
        f"({t.num_key_value_heads} kv) x {t.head_dim}, {t.moe_num_experts} experts top-{t.moe_topk} "
        f"x {t.intermediate_size}, {t.moe_num_shared_experts} shared, vocab {t.vocab_size}"
    )
    print(
        f"vision:            {v.num_hidden_layers} layers, d={v.hidden_size}, "
        f"{v.image_size}px / {v.patch_size}px patches"
    )
    if unknown:
        print(f"not used:          {len(unknown)} tensor(s), e.g. {unknown[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aria-jax", description="Aria (rhymes-ai/Aria) in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's layout, dtypes, parameter counts and size",
        description="Show an HF-format Aria checkpoint's key layout (transformers5, hub or original), "
        "tensor count, dtypes, total and active-per-token parameters and bytes.",
    )
    p.add_argument("path", help="HF-format checkpoint directory (any of the three key layouts) or a hub id")
    p.set_defaults(func=cmd_inspect)
    cli_generate.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"aria-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
