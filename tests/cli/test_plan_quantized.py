"""``aria-jax plan --quantize int8|int4``: the weights counted in their quantized bytes, held against the arrays a
quantized model really holds, and the verdicts for the real ``aria`` preset on 24 GB and 48 GB GPUs.

The plans run in subprocesses (each asks for its own virtual CPU devices), so this process's JAX backend is left as
it is.
"""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from aria_jax import AriaConfig
from aria_jax.cli import main
from aria_jax.inference.api import Aria

GB = 10**9


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aria_jax.cli", "plan", *args], capture_output=True, text=True)


def plan_json(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    path = tmp_path / "plan.json"
    result = plan(*args, "--json", str(path))
    assert result.returncode in (0, 1), result.stderr
    return result, json.loads(path.read_text())


def needs(report: dict) -> int:
    """What the verdict weighs: the larger of the analytic total and the compiled peaks without CPU-only copies."""
    infer = report["inference"]
    return max(infer["analytic"]["total"], *(infer["compiled"][s]["peak_accelerator"] for s in ("prefill", "decode")))


def grouped_config() -> AriaConfig:
    """The tiny preset widened so that int4 has several scale groups per output channel: hidden 256 (two groups of
    128 for q/k/v, gate_up and the shared experts) and experts' intermediate 192 (two groups of 96 for down)."""
    cfg = AriaConfig.preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=256, intermediate_size=192))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> tuple[AriaConfig, str]:
    directory = tmp_path_factory.mktemp("grouped")
    cfg = grouped_config()
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert AriaConfig.from_pretrained(directory) == cfg
    return cfg, str(directory)


def held_bytes(tree: dict, fmt: str) -> dict[str, int]:
    """Bytes of a live params tree: everything, the quantized pairs, and the int4 values packed two per byte."""
    total = quantized = packed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        total += leaf.nbytes
        pair = name.endswith(("_q", "_scale"))
        quantized += leaf.nbytes if pair else 0
        values = name.endswith("_q") and fmt == "int4" and leaf.dtype == jnp.int8  # one value per byte (CPU)
        packed += leaf.nbytes // 2 if values else leaf.nbytes
    return {"total": total, "quantized": quantized, "packed": packed}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_weight_bytes_are_what_the_quantized_model_holds(grouped, tmp_path, fmt):
    cfg, directory = grouped
    result, report = plan_json(tmp_path, "--model", directory, "--mode", "infer", "--quantize", fmt,
                               "--seq", "16", "--max-new-tokens", "4")
    analytic = report["inference"]["analytic"]
    model = Aria.from_config(cfg, dtype=jnp.bfloat16, quantize=fmt)
    live = model.stacked_params()
    scale = live["language_model"]["layers"]["self_attn"]["q_kernel_scale"]
    assert scale.shape[-1] == (2 if fmt == "int4" else cfg.text.num_attention_heads * cfg.text.head_dim)
    held = held_bytes(live, fmt)
    assert held["quantized"] > 0 and report["quantize"]["format"] == fmt
    assert analytic["quantized_weights"] + analytic["float_params"] == analytic["params"]
    if fmt == "int8":
        assert analytic["params"] == held["total"]
        assert analytic["quantized_weights"] == held["quantized"]
        assert "cpu_int4_extra" not in analytic
    else:  # this CPU model holds int4 one value per byte; the plan counts them two per byte, as a GPU holds them
        assert analytic["params"] == held["packed"]
        assert analytic["params"] + analytic["cpu_int4_extra"] == held["total"]
        assert analytic["quantized_weights"] == held["quantized"] - analytic["cpu_int4_extra"]
        shapes = Aria.param_shapes(cfg, jnp.bfloat16, quantize=fmt, packed=True)
        assert analytic["params"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        assert "the CPU runtime holds int4 one per byte" in result.stdout
    float_model = Aria.param_shapes(cfg, jnp.bfloat16)
    assert analytic["params"] < sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(float_model))
    assert f"params {fmt} (" in result.stdout and f"{fmt} weights (values + float32 scales)" in result.stdout


@pytest.fixture(scope="module")
def aria_reports(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """The real aria preset at a 4K context on one device: int4 on 24GB, int8 and bf16 on 48GB."""
    out = {}
    for fmt, hbm in (("int4", "24GB"), ("int8", "48GB"), ("none", "48GB")):
        extra = ("--mode", "infer") if fmt == "none" else ("--quantize", fmt)
        out[fmt] = plan_json(tmp_path_factory.mktemp(fmt), "--model", "aria", *extra, "--hbm", hbm)
    return out


def test_aria_int4_fits_one_24gb_gpu_and_int8_one_48gb_gpu(aria_reports):
    cfg = AriaConfig.preset("aria")
    for fmt, hbm in (("int4", 24), ("int8", 48)):
        result, report = aria_reports[fmt]
        assert result.returncode == 0, result.stdout
        assert f"inference: fits in {hbm}GB" in result.stdout
        assert report["seq"] == 4096 and report["mesh"] == {"expert": 1} and report["fits"]
        analytic = report["inference"]["analytic"]
        shapes = Aria.param_shapes(cfg, jnp.bfloat16, quantize=fmt, packed=True)
        assert analytic["params"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        assert analytic["quantized_weights"] > 0.9 * analytic["params"]  # the language model's linear layers
        assert needs(report) <= hbm * GB
    assert needs(aria_reports["int8"][1]) > 24 * GB  # int8 does not fit the 24 GB GPU


def test_aria_bf16_fits_neither(aria_reports):
    result, report = aria_reports["none"]
    assert result.returncode == 1 and "inference: DOES NOT FIT in 48GB" in result.stdout
    analytic = report["inference"]["analytic"]
    assert report["quantize"] is None and analytic["quantized_weights"] == 0
    assert analytic["params"] == 2 * report["parameters"]["total"] > 50 * GB  # every parameter in bfloat16
    assert needs(report) > 48 * GB


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int3"], "aria-jax plan: error: --quantize 'int3': unknown quantization 'int3'; choose one "
         "of int8, int4"),
        (["--quantize", "INT4"], "aria-jax plan: error: --quantize 'INT4': unknown quantization 'INT4'; choose one "
         "of int8, int4"),
        (["--quantize", "int4", "--mode", "train"], "aria-jax plan: error: --mode train --quantize int4: plan plans "
         "inference on quantized weights; training over a quantized base (QLoRA, recipe key quantize_base) is not "
         "planned yet"),
    ],
)
def test_bad_quantize_exits_2_with_one_line(args, message, capfd):
    """In this process: bad input is refused before JAX starts or anything compiles."""
    assert main(["plan", "--model", "tiny", "--seq", "16", "--max-new-tokens", "4", *args]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [message]
