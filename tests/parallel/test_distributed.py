"""Multi-host for real: two processes with four CPU devices each, joined by jax.distributed (gloo) on 127.0.0.1."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multidevice")
sys.path.insert(0, HERE)

from mesh_fixtures import batch, loss_fn, make_checkpoint, rel  # noqa: E402

from aria_jax import Aria  # noqa: E402
from aria_jax.parallel import distributed  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(script: str, *args: str) -> None:
    """``script`` as two processes with four CPU devices each, joined by jax.distributed on 127.0.0.1."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, script), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]


def test_forward_and_training_step_across_two_processes_match_one_process(tmp_path):
    directory = str(tmp_path / "ckpt")
    make_checkpoint(directory)
    out = tmp_path / "out.npz"
    launch_two("multihost_worker.py", directory, str(out))
    got = np.load(out)

    # The same forward and SGD step in this (single-device) process.
    model = Aria.from_pretrained(directory, dtype="float32")
    b = batch()
    args = [b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")]
    loss = loss_fn(model.module)
    logits = np.asarray(model.forward(*args))
    before, grads = jax.value_and_grad(loss)(model.params, *args)
    after = loss(jax.tree.map(lambda p, g: p - 0.1 * g, model.params, grads), *args)
    valid = b["attention_mask"].astype(bool)
    assert rel(got["logits"][valid], logits[valid]) <= 1e-5
    assert abs(float(got["before"]) - float(before)) <= 1e-5 * abs(float(before))
    assert abs(float(got["after"]) - float(after)) <= 1e-5 * abs(float(after))
    assert float(after) < float(before)


@pytest.mark.slow
def test_forward_and_generate_across_two_processes_match_one_process(tmp_path):
    # Aria.forward / generate on a mesh spanning both processes: numpy inputs (the same on each process) or global
    # arrays in; logits and tokens out on every process, equal to one process on one device.
    directory = str(tmp_path / "ckpt")
    make_checkpoint(directory)
    launch_two("multihost_generate.py", directory, str(tmp_path / "out"))
    model = Aria.from_pretrained(directory, dtype="float32")
    b = batch()
    args = [b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")]
    logits = np.asarray(model.forward(*args))
    greedy = model.generate(*args, max_new_tokens=8)
    plan = model._plan(*args, max_new_tokens=8)
    stopped = model._decoder.run(**{**plan, "stop_check": lambda row: len(row) >= 3})[0]
    assert stopped.shape[1] == 3
    valid = b["attention_mask"].astype(bool)
    for pid in range(2):
        got = np.load(tmp_path / f"out{pid}.npz")
        assert rel(got["logits"][valid], logits[valid]) <= 1e-5
        for key in ("greedy", "greedy_global", "stream"):
            np.testing.assert_array_equal(got[key], greedy, err_msg=f"process {pid}: {key}")
        np.testing.assert_array_equal(got["stopped"], stopped, err_msg=f"process {pid}: stopped")


def test_initialize_without_a_cluster_is_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False


def test_coordinator_without_process_count_is_rejected(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()
