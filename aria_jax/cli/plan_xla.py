"""``aria-jax plan``: XLA's memory analysis of a compiled step, less the CPU compiler's own float32 copies.

``peak = arguments + outputs - aliased (donated) + temporaries``; ``cpu_upcast``: the float32 copies of whole
bf16/f16 arguments that only the CPU compiler makes (it has no native bf16 matmul); ``peak_accelerator``: the peak
without them, the estimate for a GPU or TPU.
"""

from __future__ import annotations

import math
import re

_PARAM = re.compile(r"^\s*(%[\w.-]+) = (\w+)\[[\d,]*\]\S* parameter\(\d+\)")
_UPCAST = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = f32\[([\d,]*)\]\S* (convert|fusion)\((%[\w.-]+)\)(.*)$")


def cpu_upcast_bytes(hlo: str) -> int:
    """Bytes of float32 copies of whole bf16/f16 arguments in the entry computation of a compiled CPU module.

    The CPU compiler has no native bf16 matmul, so it converts each bf16 weight (and cache) argument to f32 once,
    outside the layer loop; a GPU or TPU compiler does not. These copies are counted in ``temp``.
    """
    entry = hlo[hlo.find("\nENTRY") :]
    params: dict[str, str] = {}
    total = 0
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        if m := _PARAM.match(line):
            params[m.group(1)] = m.group(2)
        elif (m := _UPCAST.match(line)) and params.get(m.group(3)) in ("bf16", "f16"):
            if m.group(2) == "convert" or "wrapped_convert" in m.group(4):
                total += 4 * math.prod(int(d) for d in m.group(1).split(",") if d)
    return total


def memory_stats(compiled) -> dict[str, int] | None:
    """Per-device argument/output/alias/temp bytes from XLA, peak = args + out - alias + temp, and the CPU-only
    f32 copies of bf16 arguments (``cpu_upcast``; ``peak_accelerator`` = peak without them); None if absent."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    keys = ("argument", "output", "alias", "temp")
    stats = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in keys}
    stats["peak"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    stats["cpu_upcast"] = min(stats["temp"], cpu_upcast_bytes(compiled.as_text()))
    stats["peak_accelerator"] = stats["peak"] - stats["cpu_upcast"]
    return stats
