"""``aria-jax serve``: every bad flag is one line and exit status 2 before anything loads; good flags build a warmed-up
engine and the app's settings."""

import argparse

import pytest

from aria_jax.cli import build_parser, main
from aria_jax.cli.serve import build


@pytest.mark.parametrize("flags,match", [
    (["--port", "0"], "--port must be in 1..65535, got 0"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-seq-len", "8"], "--max-seq-len must be >= 32"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--temperature", "3"], r"--temperature must be in \[0, 2\]"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "5"], "--top-k 5: the server samples with temperature and top-p only"),
    (["--allowed-media-dir", "/no/such/dir"], "--allowed-media-dir /no/such/dir: not a directory"),
    (["--runtime", "experts=nope"], "--runtime:"),
    (["--decode-steps", "0"], r"--decode-steps must be in 1\.\.64, got 0"),
    (["--video-frames", "200"], r"--video-frames must be in 1\.\.128, got 200"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, match, capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aria-jax serve: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err


def test_a_model_without_weights_is_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aria-jax serve: error: ") and err.count("\n") == 1, err


def test_flags_build_the_engine_and_the_settings(tiny_dir, tmp_path):
    args = build_parser().parse_args(["serve", "--model", tiny_dir, "--max-batch", "2", "--max-seq-len", "64",
                                      "--allowed-media-dir", str(tmp_path), "--max-new-tokens", "5",
                                      "--temperature", "0.5", "--dtype", "float32", "--decode-steps", "2",
                                      "--video-frames", "3"])
    args.runtime = None
    engine, config = build(args)
    assert (engine.max_batch, engine.max_seq_len, engine.decode_steps, engine.pool.max_steps) == (2, 64, 2, 2)
    # the warm-up: bucket 16 alone, two 32-token prompts together (64 + 2 tokens would not fit a row), the step
    # of one row and of the pool, the moves between them
    assert dict(engine.pool.traces) == {"admit": 2, "step": 2, "move": 2}
    assert (config.defaults.max_tokens, config.defaults.temperature, config.media.allowed_dir) == (5, 0.5,
                                                                                                  str(tmp_path))
    assert config.defaults.video_frames == 3
    assert config.model_id == tiny_dir and isinstance(args, argparse.Namespace)
