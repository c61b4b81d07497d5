"""Shared pieces of the benchmarks: the mid-size random Aria, timing, and table printing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

# The same random mid-size Aria for every benchmark: 6 layers, 32 experts top-6, hidden 512 (issue #4 / #7).
MID_TEXT = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=384, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=8, moe_num_experts=32, moe_topk=6, moe_num_shared_experts=2,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6}, max_position_embeddings=4096,
)
MID_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  image_size=980, patch_size=14)
MID_P2Q = {1225: 128, 4900: 256}


# The shape sweep (issue 23): four model shapes around the mid model, 4 layers each so a sweep fits in minutes:
# vocabulary 8k-64k, vision 192 x 3 heads of 64 to 768 x 12, experts 16-64 of width 256-1024, text heads 8-20.
SHAPES: dict[str, tuple[dict, dict]] = {
    "small": (dict(vocab_size=8192, hidden_size=384, intermediate_size=256, num_attention_heads=8,
                   num_key_value_heads=8, moe_num_experts=16, moe_topk=4, num_hidden_layers=4),
              dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=4)),
    "mid": (dict(num_hidden_layers=4), {}),
    "wide-vocab": (dict(vocab_size=65536, hidden_size=640, intermediate_size=512, num_attention_heads=20,
                        num_key_value_heads=4, head_dim=32, moe_num_experts=64, moe_topk=6, num_hidden_layers=4),
                   dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=4)),
    "wide-experts": (dict(vocab_size=16384, hidden_size=768, intermediate_size=1024, num_attention_heads=12,
                          num_key_value_heads=12, moe_num_experts=16, moe_topk=4, num_hidden_layers=4),
                     dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=4)),
}


def shape_names(arg: str) -> list[str]:
    """``--shapes a,b``: the named shapes of ``SHAPES``, or exit with one line naming an unknown one."""
    import sys

    names = [n for n in arg.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"--shapes: unknown shape '{unknown[0]}'; choose from {', '.join(SHAPES)}")
    return names


def build_mid_checkpoint(directory: str, seed: int = 0, vision: dict | None = None, **text):
    """A random transformers Aria of the mid-size config (``text`` overrides text-config keys, e.g. a longer
    ``max_position_embeddings``; ``vision`` vision-config keys: the shapes of ``SHAPES``), saved (hub layout);
    returns the torch model."""
    import torch
    from transformers import AriaConfig, AriaForConditionalGeneration

    cfg = AriaConfig(text_config={"model_type": "aria_text", **MID_TEXT, **text},
                     vision_config={"model_type": "idefics3_vision", **MID_VISION, **(vision or {})},
                     projector_patch_to_query_dict=MID_P2Q)
    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(cfg).eval()
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return model


def status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the process began or since ``reset_peak``) in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux >= 4.0: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, stat: Callable = statistics.median) -> float:
    """``stat`` (median; ``min``: the best) of the wall seconds of ``repeats`` calls of ``fn()`` after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stat(times)


def fail(message: str) -> None:
    """Bad input to a bench script: one line naming it (``bench/<script>: ...``) on stderr, exit status 2."""
    import sys

    print(f"bench/{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)
    sys.exit(2)


def positive_ints(flag: str, text: str) -> list[int]:
    """A comma-separated list of positive integers for ``flag``, or ``fail`` naming the flag and the text."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        fail(f"{flag}: '{text}' is not a comma-separated list of integers")
    if not values or min(values) < 1:
        fail(f"{flag}: '{text}' needs positive integers")
    return values


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))
