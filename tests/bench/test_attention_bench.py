"""bench/attention.py, the attention micro-benchmark: a tiny run of every column, and its command line."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "attention.py")


def test_a_tiny_run_prints_every_implementation():
    done = subprocess.run([sys.executable, SCRIPT, "--seq", "32", "--heads", "4", "--kv-heads", "2",
                           "--head-dim", "16", "--impl", "einsum,flash", "--blocks", "8x16", "--repeats", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "einsum" in done.stdout and "flash 8x16" in done.stdout and "fwd+bwd ms" in done.stdout


def test_bad_arguments_exit_2_with_one_line():
    for args, named in ((["--seq", "1,x"], "1,x"), (["--kv-heads", "3"], "3"), (["--impl", "flash,nope"], "nope"),
                        (["--blocks", "128"], "128"), (["--repeats", "0"], "--repeats"), (["--bogus"], "--bogus")):
        done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr
