"""``aria-jax serve --mesh``: the engine over a model on 8 CPU devices (data=2 x expert=4, expert=4 x tensor=2) replies as
``Aria.chat`` on one device, alone and batched (a subprocess: the suite's JAX has one device)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the model on meshes runs by default in tests/kernels/test_expert_parallel.py and tests/parallel
def test_the_engine_on_a_mesh_replies_as_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "multidevice", "serve_mesh_check.py")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK") and result.stdout.count("alone and together") == 2
