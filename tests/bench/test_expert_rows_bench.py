"""bench/expert_rows.py, the few-rows-per-expert probe: its command line, and a run on tiny experts whose forms all
agree with each other (the probe times kernels that must compute the same thing)."""

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "expert_rows.py")


def load_script():
    """bench/expert_rows.py as a module under a name of its own, importing bench/common.py even where another `common`
    is cached; sys.path and sys.modules are as before afterwards (a one-process run imports every test directory)."""
    path, cached = list(sys.path), sys.modules.pop("common", None)
    try:
        spec = importlib.util.spec_from_file_location("bench_expert_rows", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = path
        sys.modules.pop("common", None)
        if cached is not None:
            sys.modules["common"] = cached


def test_bad_arguments_exit_2_with_one_line():
    for args, named in ((["--rows", "1,x"], "1,x"), (["--rows", "0"], "--rows"), (["--forms", "gemv"], "gemv"),
                        (["--hidden", "7"], "--hidden"), (["--repeats", "x"], "--repeats")):
        done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and lines[0].startswith("bench/expert_rows.py: "), done.stderr


def test_every_form_computes_the_same_experts():
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    gate_up = [jnp.asarray(rng.standard_normal((16, 24), np.float32)) for _ in range(3)]
    down = [jnp.asarray(rng.standard_normal((12, 16), np.float32)) for _ in range(3)]
    x = jnp.asarray(rng.standard_normal((3, 2, 16), np.float32))
    h = np.einsum("erd,edf->erf", np.asarray(x, np.float64), np.stack(gate_up).astype(np.float64))
    act = h[..., :12] / (1 + np.exp(-h[..., :12])) * h[..., 12:]
    want = np.einsum("erf,efd->erd", act, np.stack(down).astype(np.float64))
    expert_rows = load_script()
    for form in expert_rows.FORMS:
        got = np.asarray(expert_rows.build(form, {})(x, gate_up, down)).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=form)


def test_a_tiny_run_prints_every_form_and_row():
    done = subprocess.run([sys.executable, SCRIPT, "--hidden", "32", "--width", "16", "--experts", "2", "--rows",
                           "1,2", "--repeats", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "rows | matvec | matmul | split | reduce" in lines
    assert any(line.startswith("1 | ") for line in lines) and any(line.startswith("2 | ") for line in lines)
    assert "GB/s" in done.stdout
