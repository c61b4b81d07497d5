"""The aria-jax command line: inspect, and status 2 with one line on bad input."""

import os
import subprocess
import sys

from safetensors import safe_open

from aria_jax import AriaConfig
from aria_jax.cli import main
from aria_jax.model.schema import parameter_counts


def test_parameter_counts_of_the_real_configuration():
    counts = parameter_counts(AriaConfig.preset("aria"))
    assert counts["total"] == 25_307_311_216 - 2304  # aria-spec.md §10, without the unused post_layernorm
    assert counts["routed_experts"] == 28 * 817_889_280
    assert counts["active_per_token"] == 28 * 128_619_520 + 256_901_120 + 2560  # layers + lm_head + final norm


def test_inspect_reports_layout_counts_and_bytes(checkpoint, hf_model, capsys):
    directory = checkpoint("mha", "transformers5")
    assert main(["inspect", directory]) == 0
    out = capsys.readouterr().out
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        nbytes = sum(f.get_tensor(k).numel() * 4 for k in keys)
    assert "layout:            transformers5" in out
    assert f"tensors:           {len(keys)} in 1 file(s)" in out
    assert f"bytes:             {nbytes:,}" in out
    hf_params = sum(p.numel() for p in hf_model("mha").parameters()) - 2 * 36  # minus post_layernorm
    assert f"parameters:        {hf_params:,}" in out


def test_bad_path_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aria_jax.cli", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aria-jax inspect: error: {tmp_path / 'config.json'}: no config.json found"
    ]
