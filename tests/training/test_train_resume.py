"""Checkpoints: a ``python train.py`` killed with SIGKILL resumes bit for bit (float32, CPU)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import REPO, read_metrics, run_train

from aria_jax.training.trainer import TIMING_KEYS

ARGS = ["--config", "configs/tiny_cpu.yaml", "max_steps=12", "save_steps=3", "save_total_limit=2", "export=false"]


def _env(tmp_path):
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = run_train([*ARGS, f"output_dir={ref_dir}"], _env(tmp_path))
    assert ref.returncode == 0, ref.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": REPO, **_env(tmp_path)}
    proc = subprocess.Popen([sys.executable, "train.py", *ARGS, f"output_dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 8:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(run_dir))
    assert 8 <= killed_at < 12, killed_at
    # A save cut short leaves only a temporary directory behind; it must not be taken for a checkpoint.
    (run_dir / "checkpoints" / "11.orbax-checkpoint-tmp-1").mkdir()
    (run_dir / "checkpoints" / "11.orbax-checkpoint-tmp-1" / "junk").write_text("partial")

    resumed = run_train([*ARGS, f"output_dir={run_dir}", "resume_from_checkpoint=true"], _env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    assert _deterministic(read_metrics(run_dir)) == _deterministic(read_metrics(ref_dir))
    steps = sorted(int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit())
    assert steps == [9, 12]  # save_total_limit
