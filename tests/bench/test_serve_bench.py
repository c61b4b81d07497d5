"""bench/serve.py, the serving benchmark: its command line, and (slow) a quick run on the tiny demo model."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "serve.py")


def test_bad_arguments_exit_2_with_one_line():
    for args, named in ((["--clients", "1,x"], "1,x"), (["--clients", "0"], "--clients"),
                        (["--rounds", "0"], "--rounds"), (["--decode-steps", "0"], "--decode-steps"),
                        (["--decode-steps", "a"], "'a'"), (["--requests", "x"], "--requests")):
        done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and lines[0].startswith("bench/serve.py: "), done.stderr


@pytest.mark.slow
def test_a_quick_run_prints_every_row():
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    done = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("Aria.chat, one after another", "serve (--decode-steps 4), 1 concurrent",
                 "serve (--decode-steps 4), 4 concurrent", "ms per decode step"):
        assert name in done.stdout, done.stdout
