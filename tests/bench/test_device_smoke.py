"""bench/device.py, the device benchmark: its random weights, its budget, its command line, and (slow) its whole code
path on the tiny preset on CPU (``--smoke``), with one expert kernel failing on purpose."""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from aria_jax import AriaConfig
from aria_jax.model.schema import declared_params
from aria_jax.quant import QuantSpec, unpack_int4
from aria_jax.runtime import EXPERT_KERNELS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "device.py")
_path, _modules = list(sys.path), set(sys.modules)
_spec = importlib.util.spec_from_file_location("bench_device", SCRIPT)
device = sys.modules["bench_device"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device)
roofline = sys.modules["roofline"]  # bench/roofline.py, imported by bench/device.py
# bench/ out of the path and its modules out of the cache again: tests/multidevice has a `common` module of its own
sys.path[:] = _path
for _name in {"common", "roofline", "device_report"} - _modules:
    sys.modules.pop(_name, None)


def smoke(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "device.json"
    done = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out), *args], capture_output=True,
                          text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def positive(section: dict, *keys: str) -> bool:
    return all(isinstance(section.get(k), int | float) and section[k] > 0 for k in keys)


@pytest.mark.parametrize("quant", [None, QuantSpec("int8"), QuantSpec("int4")], ids=["bf16", "int8", "int4"])
def test_random_params_fill_the_declared_tree(quant):
    cfg = AriaConfig.preset("tiny")
    shapes = traverse_util.flatten_dict(declared_params(cfg, jnp.bfloat16, quant, True)[0])
    params = traverse_util.flatten_dict(device.random_params(cfg, jnp.bfloat16, quant, True, device.SMOKE))
    assert {p: (v.shape, v.dtype) for p, v in params.items()} == {p: (s.shape, s.dtype) for p, s in shapes.items()}
    blocked = 0
    for path, leaf in params.items():
        x, name = np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16 else leaf), path[-1]
        if name == "scale":
            assert (x == 1).all(), path
        elif name.endswith("bias"):
            assert (x == 0).all(), path
        elif name.endswith("_q"):
            values = unpack_int4(x, 128 if x.shape[-1] * 2 % 128 == 0 else x.shape[-1] * 2) if x.dtype == np.uint8 else x
            low = -127 if quant.format == "int8" else -8
            assert values.min() >= low and values.max() <= -low and values.std() > 1, path
        elif not name.endswith("_scale") and x.size > 1000:
            assert 0.015 < x.std() < 0.025, path
        if x.ndim > 1 and x.nbytes > device.SMOKE.host_bytes and not name.endswith(("_scale", "scale", "bias")):
            blocked += 1  # made on the device in blocks of rows: every row written
            assert (np.abs(x.reshape(x.shape[0], -1)).max(axis=1) > 0).all(), path
    assert blocked >= 2


def test_roofline_reads_bf16_at_two_bytes_and_knows_the_hopper_peaks():
    cfg = AriaConfig.preset("aria")
    assert roofline.decode_bytes(cfg, 8, 30.0, 96, itemsize=2) == roofline.decode_bytes(cfg, 8, 30.0, 96) / 2
    int8 = roofline.decode_bytes(cfg, 1, 6.0, 96, QuantSpec("int8"), itemsize=2)
    assert roofline.decode_bytes(cfg, 1, 6.0, 96, itemsize=2) * 0.5 < int8 < roofline.decode_bytes(cfg, 1, 6.0, 96)
    assert roofline.device_peak("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert roofline.device_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert roofline.device_peak("NVIDIA H200")[0] == 989e12
    assert roofline.device_peak("cpu") is None


def test_spent_budget_reports_every_section_as_skipped(tmp_path):
    report, stdout = smoke(tmp_path, "--budget", "0.001")
    assert positive(report["rates"], "copy_bandwidth", "bf16_matmul") and positive(report["weights"], "gb")
    assert report["decode"] == {f"batch_{b}": device.SKIPPED for b in (1, 8)}
    assert set(report["prefill"]) == {"490", "980"} and all(r == device.SKIPPED for r in report["prefill"].values())
    assert set(report["backends"]) == set(EXPERT_KERNELS)
    assert report["training"] == device.SKIPPED
    assert set(report["quantized"]) == {"int8", "int4"}
    assert stdout.count("time budget spent") == 4 + len(EXPERT_KERNELS) + 1 + 2


@pytest.mark.slow  # about 3 to 5 minutes on 2 cores: some 40 compiles of the tiny model
def test_smoke_reports_every_section_and_survives_a_failing_kernel(tmp_path):
    failing = "gather" if "gather" in EXPERT_KERNELS else EXPERT_KERNELS[-1]
    report, stdout = smoke(tmp_path, "--inject-failure", failing)

    assert report["env"]["platform"] == "cpu" and report["env"]["preset"] == "tiny"
    assert positive(report["rates"], "copy_bandwidth", "bf16_matmul", "peak_flops")
    assert positive(report["weights"], "parameters_b", "gb")
    for batch in ("batch_1", "batch_8"):
        assert positive(report["decode"][batch], "tok_s", "floor_tok_s", "of_floor", "experts_per_layer")
    assert set(report["prefill"]) == {"490", "980"}
    assert all(positive(r, "ms", "tflop_s", "of_peak") for r in report["prefill"].values())

    backends = report["backends"]
    assert set(backends) == set(EXPERT_KERNELS)  # every kernel the runtime knows, read at run time
    assert "injected failure" in backends[failing]["error"]
    ran = [name for name, r in backends.items() if "error" not in r]
    assert ran and all(positive(backends[n], "prefill_490_ms", "decode_8_tok_s") for n in ran)

    kernels = [k for k in report["training"] if k in EXPERT_KERNELS]
    assert kernels and all(positive(report["training"][k], "step_s", "mfu", "tflop_s") for k in kernels)
    for fmt in ("int8", "int4"):
        for batch in ("batch_1", "batch_8"):
            assert positive(report["quantized"][fmt][batch], "tok_s", "floor_tok_s")

    # the markdown table: the failing kernel's row carries its error
    row = next(line for line in stdout.splitlines() if line.startswith(f"experts '{failing}'"))
    assert "injected failure" in row
    assert "decode, batch 8" in stdout and "training step" in stdout


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    for args, named in ((["--sections", "decode,nope"], "nope"), (["--quantize", "int3"], "int3"),
                        (["--budget", "0"], "--budget"), (["--json", str(tmp_path / "missing" / "d.json")], "missing")):
        done = subprocess.run([sys.executable, SCRIPT, "--smoke", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr


@pytest.mark.slow  # about 30 s: the decode section twice
def test_decode_falls_back_to_the_portable_kernels_when_the_platforms_fail(tmp_path):
    from aria_jax.runtime import detect

    report, stdout = smoke(tmp_path, "--sections", "decode", "--inject-failure", detect().experts)
    assert "injected failure" in report["decode"]["failed"]["error"]
    assert all(positive(report["decode"][b], "tok_s", "floor_tok_s") for b in ("batch_1", "batch_8"))
    assert "experts ragged" in report["env"]["runtime"] and "fallback" in report["env"]["runtime"]
