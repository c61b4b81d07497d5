"""``aria-jax inspect``, ``convert`` and ``export``: checkpoints in and out."""

from __future__ import annotations

import argparse
import math
from collections import Counter

from aria_jax.checkpoint.convert import convert
from aria_jax.checkpoint.converted import check_chunks, is_converted, stored_arrays, stored_quantization
from aria_jax.checkpoint.export import export
from aria_jax.checkpoint.hf_keys import detect_layout, to_hub_name
from aria_jax.checkpoint.safetensors_io import open_checkpoint
from aria_jax.cli.verify import verify_conversion
from aria_jax.config import AriaConfig
from aria_jax.files import resolve_model
from aria_jax.model.schema import parameter_counts, tensor_specs
from aria_jax.quant import FORMATS, QuantSpec, parse


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _inspect_orbax(path: str) -> tuple[str, dict[str, int], int, list[str], dict[str, int]]:
    stored = stored_arrays(path)
    check_chunks(path, stored.values())  # a damaged directory is reported here, not at the next load
    dtypes = Counter(str(a.dtype) for a in stored.values())
    kinds = Counter()  # bytes per kind: a quantized weight's values and scales, and the weights stored as floats
    for name, a in stored.items():
        paired = name.endswith("_q") and name[:-2] + "_scale" in stored
        scale = name.endswith("_scale") and name[:-6] + "_q" in stored
        kinds["quantized values" if paired else "scales" if scale else "float weights"] += (
            math.prod(a.shape) * a.dtype.itemsize)
    return f"{len(stored)} arrays in an Orbax checkpoint", dtypes, sum(kinds.values()), [], kinds


def _print_quantization(quant: QuantSpec, kinds: dict[str, int]) -> None:
    group = "one scale per output channel" if quant.format == "int8" else f"group {quant.group}"
    head = "quantized" if quant.lm_head else "float"
    print(f"quantization:      {quant.format} ({group}; lm_head {head})")
    for kind, label in (("quantized values", f"{quant.format} values"), ("scales", "scales"),
                        ("float weights", "float weights")):
        n = kinds.get(kind, 0)
        print(f"  {label + ':':<17}{n:,} ({n / 2**30:.2f} GiB)")


def _inspect_hf(path: str, cfg: AriaConfig) -> tuple[str, str, dict[str, int], int, list[str]]:
    tensors = open_checkpoint(path)
    layout = detect_layout(list(tensors), path)
    dtypes = Counter(str(shard.dtype(k)) for k, shard in tensors.items())
    nbytes = sum(shard.nbytes(k) for k, shard in tensors.items())
    specs = tensor_specs(cfg)
    unknown = [k for k in tensors if to_hub_name(k, layout) not in specs]
    where = f"{len(tensors)} in {len({s.path for s in tensors.values()})} file(s)"
    return layout, where, dtypes, nbytes, unknown


def cmd_inspect(args: argparse.Namespace) -> int:
    path = resolve_model(args.path)
    cfg = AriaConfig.from_pretrained(path)
    quant, kinds = None, {}
    if is_converted(path):
        layout = "orbax"
        where, dtypes, nbytes, unknown, kinds = _inspect_orbax(path)
        quant = stored_quantization(path)
    else:
        layout, where, dtypes, nbytes, unknown = _inspect_hf(path, cfg)
    counts = parameter_counts(cfg)
    print(f"path:              {path}")
    print(f"layout:            {layout}")
    print(f"tensors:           {where}")
    print(f"dtypes:            {', '.join(f'{d} x{n}' for d, n in dtypes.most_common())}")
    print(f"bytes:             {nbytes:,} ({nbytes / 2**30:.2f} GiB)")
    if quant is not None:
        _print_quantization(quant, kinds)
    print(f"parameters:        {counts['total']:,} ({fmt_count(counts['total'])})")
    print(f"  routed experts:  {counts['routed_experts']:,} ({fmt_count(counts['routed_experts'])})")
    print(f"  active/token:    {counts['active_per_token']:,} ({fmt_count(counts['active_per_token'])})")
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


def _quantization(value: str | None) -> QuantSpec | None:
    """``--quantize``'s value, or ValueError naming it (one line, exit status 2)."""
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"--quantize {value!r}: unknown quantization; choose one of {', '.join(FORMATS)}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    quant = _quantization(args.quantize)  # before anything is read
    summary = convert(
        args.src,
        args.dst,
        dtype=args.dtype,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        mesh=args.mesh,
        check=verify_conversion if args.verify else None,
        progress=not args.quiet,
        allow_nonfinite=args.allow_nonfinite,
        quantize=quant,
    )
    weights = f" with {quant.format} weights" if quant is not None else ""
    print(
        f"converted {summary['tensors']} tensors ({summary['bytes']:,} bytes, {summary['layout']} layout) "
        f"to {summary['destination']} as {summary['dtype']}{weights}"
    )
    _print_verify(summary.get("check"))
    return 0


def _print_verify(result: dict | None) -> None:
    if result is None:
        return
    if "skipped" in result:
        print(f"verify: skipped: {result['skipped']}")
    elif "format" in result:
        print(f"verify: {result['format']} against the float model: mean KL {result['kl']:.3g} "
              f"(limit {result['kl_limit']:g}), top-1 agreement {100 * result['top1']:.1f}%")
    else:
        print(f"verify: max relative error {result['max_rel_err']:.3g}, KL {result['kl']:.3g} (within tolerance)")


def cmd_export(args: argparse.Namespace) -> int:
    summary = export(
        args.src,
        args.dst,
        layout=args.layout,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
        dtype=args.dtype,
    )
    print(
        f"exported {summary['tensors']} tensors in {summary['shards']} shard(s) ({summary['layout']} layout) "
        f"to {summary['destination']}"
    )
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an HF checkpoint (any key layout, or a hub id) to a fast-loading Orbax directory",
        description="Convert an HF-format Aria checkpoint to a directory that Aria.from_pretrained restores "
        "straight onto devices: an Orbax checkpoint of the params, config.json and the tokenizer files. "
        "Tensors are streamed one at a time; nothing is left behind on failure.",
    )
    p.add_argument("src", help="HF checkpoint directory (hub, transformers5 or original key layout) or a hub id")
    p.add_argument("dst", help="output directory: must not exist unless --overwrite, and may not be, contain or lie "
                   "inside the source")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="parameter dtype to store (default: the checkpoint's own dtype from config.json, else float32)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        metavar="{int8,int4}",
        help="store every linear weight of the language model (attention, shared and routed experts, lm_head) as "
        "int8 (one scale per output channel) or int4 (one scale per group of 128 input channels); "
        "norms, router, embeddings, vision tower and projector stay in --dtype",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the converted model and transformers on a fixed text+image prompt; fail beyond tolerance "
        "(with --quantize: mean KL of the next-token distributions against the float model, "
        "int8 <= 1e-3, int4 <= 3e-2)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh like 'data=2,expert=4,tensor=1': checked against the model before converting, "
        "and used by --verify",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (only once the new output is complete)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin/.pt checkpoints (read with torch.load(weights_only=True))",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert tensors holding NaN or infinite values (each is named in a warning); without it they fail",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) when SRC is a hub id")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a converted directory back as HF safetensors shards + index",
        description="Export a directory written by `aria-jax convert` to HF safetensors shards with an index, "
        "config.json in the chosen dialect and the tokenizer files, loadable by transformers.",
    )
    p.add_argument("src", help="a directory written by `aria-jax convert`")
    p.add_argument("dst", help="output directory: must not exist unless --overwrite, and may not be, contain or lie "
                   "inside the source")
    p.add_argument(
        "--layout",
        choices=["hub", "transformers5"],
        default="transformers5",
        help="key names and config dialect: hub (as rhymes-ai/Aria ships, rope_theta) or transformers5 "
        "(rope_parameters)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="tensor dtype to write (default: the stored float dtype); a directory converted with --quantize is "
        "written dequantized, with a warning",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (only once the new output is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's layout, dtypes, parameter counts and size",
        description="Show an Aria checkpoint's key layout (transformers5, hub, original, or orbax for a "
        "converted directory), "
        "tensor count, dtypes, total and active-per-token parameters and bytes (for a directory converted with "
        "--quantize: its format and the bytes of quantized values, scales and float weights).",
    )
    p.add_argument("path", help="HF checkpoint directory (any key layout), a converted directory or a hub id")
    p.set_defaults(func=cmd_inspect)
    _add_convert(sub)
    _add_export(sub)

