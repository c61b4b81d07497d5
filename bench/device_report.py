"""The report of bench/device.py: its JSON as one markdown table on stdout."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table  # noqa: E402


def _num(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else ""


def table_rows(report: dict) -> list[dict]:
    """One row per measurement; an error or a skip in the notes."""
    rows = []

    def add(name: str, r: dict, result: str, reference: str = "", share: str = "", note: str = "") -> None:
        failed = r.get("error") or r.get("skipped")
        rows.append({"benchmark": name, "result": "" if failed else result, "floor / peak": "" if failed else reference,
                     "of floor / peak": "" if failed else share, "notes": failed or note})

    def decode_rows(label: str, section: dict) -> None:
        if "error" in section or "skipped" in section:
            return add(f"decode{label}", section, "")
        for key, r in ((k, v) for k, v in section.items() if k.startswith("batch_")):
            add(f"decode{label}, batch {key[6:]}", r, _num(r.get("tok_s"), "{:.1f} tok/s"),
                _num(r.get("floor_tok_s"), "{:.0f} tok/s"), _num(r.get("of_floor"), "{:.0%}"),
                _num(r.get("experts_per_layer"), "{:.1f} experts/layer, ") + _num(r.get("step_gb"), "{:.2f} GB/step, ")
                + _num(r.get("first_call_s"), "first call {:.0f} s"))

    decode_rows("", report.get("decode", {}))
    for px, r in report.get("prefill", {}).items():
        add(f"image prefill, {px} px", r, _num(r.get("ms"), "{:.1f} ms"), _num(r.get("tflop_s"), "{:.0f} TFLOP/s"),
            _num(r.get("of_peak"), "{:.0%}"), _num(r.get("tokens"), "{} tokens, ")
            + _num(r.get("first_call_s"), "first call {:.0f} s"))
    for name, r in report.get("backends", {}).items():
        add(f"experts '{name}'", r, _num(r.get("prefill_490_ms"), "490 px prefill {:.1f} ms, ")
            + _num(r.get("decode_8_tok_s"), "batch-8 decode {:.1f} tok/s"),
            note="" if r.get("forced", True) else "runtime kernel only (not a moe_backend name)")
    train = report.get("training", {})
    if "error" in train or "skipped" in train:
        add("training step", train, "")
    for name, r in ((k, v) for k, v in train.items() if isinstance(v, dict)):
        add(f"training step '{name}' ({train['layers']} layers, {train['batch']}x{train['seq']})", r,
            _num(r.get("step_s"), "{:.3f} s"), _num(r.get("tflop_s"), "{:.0f} TFLOP/s"), _num(r.get("mfu"), "{:.0%}"),
            _num(r.get("tokens_s"), "{:.0f} tok/s, ") + _num(r.get("first_step_s"), "first step {:.0f} s"))
    for fmt, section in report.get("quantized", {}).items():
        decode_rows(f" {fmt}", section)
    return rows


def print_report(report: dict) -> None:
    """The environment, the measured rates (T: 10^12 bytes or FLOP per second) and the weights, then the table."""
    print("\n" + ", ".join(f"{k} {v}" for k, v in report.get("env", {}).items()))
    print("rates: " + ", ".join(f"{k} {v / 1e12:.3f}T" if isinstance(v, float) else f"{k} {v}"
                                for k, v in report.get("rates", {}).items()))
    w = {**report.get("weights", {}), **{k: report.get(k) for k in ("peak_memory_gib", "elapsed_s")}}
    print("weights: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in w.items()))
    print()
    print_table(table_rows(report), ["benchmark", "result", "floor / peak", "of floor / peak", "notes"])
