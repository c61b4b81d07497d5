"""aria-jax convert --quantize int8|int4, and inspect, export, verify and Aria.from_pretrained of its output."""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import image_batch

from aria_jax import Aria, AriaConfig
from aria_jax.checkpoint.converted import ParamWriter, stored_arrays, stored_quantization
from aria_jax.cli import main
from aria_jax.cli.verify import QUANT_KL_TOL, compare, fixed_prompt
from aria_jax.model.quantize import is_quantized
from aria_jax.quant import QuantSpec

NAME = "gqa"
FORMATS = ("int8", "int4")


def hf_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.float().numpy()


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """format -> (converted directory, convert's stdout, parameters written file to file). Converted from the
    transformers5 layout, whose expert tensors a float conversion copies file to file, with --verify."""
    cache = {}

    def get(fmt: str):
        if fmt not in cache:
            dst = str(tmp_path_factory.mktemp("quantized") / fmt)
            copied, real_copy = [], ParamWriter.copy_file

            def record(self, path, *args):
                copied.append(path)
                return real_copy(self, path, *args)

            out = io.StringIO()
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
                patch.setattr(ParamWriter, "copy_file", record)
                argv = ["convert", checkpoint(NAME, "transformers5"), dst, "--quantize", fmt, "--dtype", "float32",
                        "--verify", "--quiet"]
                assert main(argv) == 0
            cache[fmt] = dst, out.getvalue(), copied
        return cache[fmt]

    return get


@pytest.fixture(scope="module")
def loaded(quantized):
    """format -> Aria.from_pretrained of the converted directory (cached: one compilation per format and shape)."""
    cache = {}

    def get(fmt: str) -> Aria:
        if fmt not in cache:
            cache[fmt] = Aria.from_pretrained(quantized(fmt)[0])
        return cache[fmt]

    return get


@pytest.fixture(scope="module")
def batch():
    return image_batch(NAME, np.random.default_rng(2))


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_quantized_loads_as_stored_with_the_logits_of_quantize_while_loading(fmt, quantized, loaded,
                                                                                       checkpoint, batch):
    dst, out, copied = quantized(fmt)
    assert stored_quantization(dst) == QuantSpec(fmt)
    assert f"as float32 with {fmt} weights" in out
    stored = stored_arrays(dst)
    q_dtype = np.int8 if fmt == "int8" else np.uint8
    assert stored["language_model.layers.mlp.gate_up_q"].dtype == q_dtype
    assert stored["language_model.layers.mlp.gate_up_scale"].dtype == np.float32
    assert "language_model.layers.mlp.gate_up" not in stored and "language_model.embed_tokens" in stored
    # Quantized weights never take the file-to-file copy (the float embeddings still do).
    assert ("language_model", "embed_tokens") in copied
    assert not [p for p in copied if p[-1].endswith(("_q", "_scale")) or p[-1] in ("gate_up", "down")]

    model = loaded(fmt)
    assert model.dtype == np.float32 and is_quantized(model.stacked_params())
    ours = np.asarray(model.forward(**batch))
    ref = np.asarray(Aria.from_pretrained(checkpoint(NAME, "hub"), dtype="float32", quantize=fmt).forward(**batch))
    assert rel_err(ours, ref) <= 1e-6


def _inspect(path, capsys) -> str:
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_shows_format_and_bytes_per_kind(fmt, quantized, checkpoint, tmp_path, capsys):
    dst = quantized(fmt)[0]
    out = _inspect(dst, capsys)
    group = "one scale per output channel" if fmt == "int8" else "group 128"
    assert f"quantization:      {fmt} ({group}; lm_head quantized)" in out
    kinds = {"values": 0, "scales": 0, "float weights": 0}
    for name, a in stored_arrays(dst).items():
        kind = "values" if name.endswith("_q") else "scales" if name.endswith("_scale") else "float weights"
        kinds[kind] += math.prod(a.shape) * a.dtype.itemsize
    assert kinds["values"] and kinds["scales"] and kinds["float weights"]
    assert f"  {fmt} values:     {kinds['values']:,} (" in out
    assert f"  scales:          {kinds['scales']:,} (" in out
    assert f"  float weights:   {kinds['float weights']:,} (" in out
    assert f"bytes:             {sum(kinds.values()):,} (" in out
    float_dir = tmp_path / "float"
    assert main(["convert", checkpoint(NAME, "hub"), str(float_dir), "--quiet"]) == 0
    float_out = _inspect(str(float_dir), capsys)
    assert "quantization" not in float_out and "values:" not in float_out


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_writes_dequantized_weights_transformers_loads_with_one_warning(fmt, quantized, loaded, batch,
                                                                               tmp_path, capsys):
    from transformers import AriaForConditionalGeneration

    dst = quantized(fmt)[0]
    exported = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", dst, str(exported), "--quiet"]) == 0
    captured = capsys.readouterr()
    what = "int8" if fmt == "int8" else "int4, group 128"
    assert captured.err.splitlines() == [
        f"aria-jax export: warning: {dst}: weights are dequantized from {what} (rounded values; not the original "
        "float weights)"
    ]
    assert not (exported / "quantization.json").exists()
    assert json.loads((exported / "config.json").read_text())["dtype"] == "float32"
    model = AriaForConditionalGeneration.from_pretrained(str(exported), dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    ref = np.asarray(loaded(fmt).forward(**batch))  # aria_jax's quantized model
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(hf_logits(model, batch)[valid], ref[valid]) <= 1e-4

    bf16 = tmp_path / "bf16"
    capsys.readouterr()  # transformers' own loading output
    assert main(["export", dst, str(bf16), "--dtype", "bfloat16", "--quiet"]) == 0
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    # Converted again, the dequantized export is a float directory (no format record carried over from anywhere).
    (exported / "quantization.json").write_text(json.dumps(QuantSpec(fmt).to_json()))
    again = tmp_path / "again"
    assert main(["convert", str(exported), str(again), "--quiet"]) == 0
    assert stored_quantization(again) is None and not (again / "quantization.json").exists()
    assert "quantization" not in _inspect(str(again), capsys)


@pytest.mark.parametrize("value", ["int3", "INT8", "8"])
def test_bad_quantize_value_exits_2_with_one_line(value, checkpoint, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", checkpoint(NAME, "hub"), str(dst), "--quantize", value, "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"aria-jax convert: error: --quantize '{value}': unknown quantization; choose one of int8, int4"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_reports_mean_kl_and_top1_against_transformers_float(fmt, quantized, loaded, hf_model):
    dst, out, _ = quantized(fmt)
    line = [x for x in out.splitlines() if x.startswith("verify:")]
    assert len(line) == 1, out
    match = re.fullmatch(rf"verify: {fmt} against the float model: mean KL (\S+) \(limit (\S+)\), "
                         r"top-1 agreement (\S+)%", line[0])
    assert match, line[0]
    kl, limit, top1 = float(match[1]), float(match[2]), float(match[3])
    assert limit == QUANT_KL_TOL[fmt] and 0 < kl <= limit
    # The reported figures are those of the converted model against transformers' float model, recomputed here.
    prompt = fixed_prompt(AriaConfig.from_pretrained(dst))
    ours = np.asarray(loaded(fmt).forward(**prompt))
    expected = compare(ours, hf_logits(hf_model(NAME), prompt))
    assert kl == pytest.approx(expected["kl"], rel=1e-2)
    assert top1 == pytest.approx(100 * expected["top1"], abs=0.05)


def test_verify_beyond_the_quantized_limit_exits_1_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(QUANT_KL_TOL, "int8", 0.0)
    argv = ["convert", checkpoint(NAME, "hub"), str(tmp_path / "d"), "--quantize", "int8", "--verify", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.match(r"aria-jax convert: verify failed: mean KL divergence \S+ > 0 \(int8 ", err[0])
    assert list(tmp_path.iterdir()) == []
