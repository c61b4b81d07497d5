"""Expert parallelism on 8 virtual CPU devices (in a subprocess: the suite itself runs on one device)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_8_devices(script: str, *args: str) -> str:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "multidevice", script), *args], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_both_schedules_equal_the_dense_reference_in_values_and_gradients():
    """expert=8, data=2 x expert=4, expert=4 x tensor=2, data=4 x expert=2; replicated and all-to-all schedules;
    blocked and ragged local backends; plus a capacity factor that really drops pairs."""
    assert "OK" in run_8_devices("ep_check.py")


# The default run: two meshes that between them split over every axis (data, expert, tensor); the long run adds the
# other two.
@pytest.mark.parametrize("meshes", [("data=2,expert=4", "expert=4,tensor=2"),
                                    pytest.param(("expert=8", "data=8"), marks=pytest.mark.slow)], ids=",".join)
@pytest.mark.torch  # the script builds its checkpoint with transformers
def test_meshes_equal_one_device_and_transformers(meshes):
    """On each mesh: logits (<= 1e-5 vs one device, <= 1e-4 vs transformers), greedy tokens (equal) and gradients
    of a cross-entropy loss (<= 1e-5)."""
    out = run_8_devices("mesh_model_check.py", *meshes)
    assert out.strip().endswith("OK") and [line.split(":")[0] for line in out.splitlines() if "grads" in line] == list(meshes)


@pytest.mark.slow  # the float model's meshes run by default (test_meshes_equal_one_device_and_transformers)
@pytest.mark.torch  # the script builds its checkpoint with transformers
def test_quantized_weights_on_meshes_equal_one_device():
    """int8 and packed int4 expert stacks split over the expert axis (and tensor/data axes): logits <= 1e-5 of one
    device, greedy tokens equal."""
    out = run_8_devices("quant_mesh_check.py")
    assert out.strip().endswith("OK") and out.count("logits") == 3
