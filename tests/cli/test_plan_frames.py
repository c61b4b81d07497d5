"""``aria-jax plan --frames N``: a video prompt's frames in the inference plan, and the context budget's one line."""

import json
import subprocess
import sys

import pytest

from aria_jax import AriaConfig
from aria_jax.cli.plan_frames import FRAME_SIZE, Frames

TINY = ["--model", "tiny", "--mesh", "expert=1", "--mode", "infer", "--max-new-tokens", "4", "--seq", "16"]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aria_jax.cli", "plan", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    """The JSON reports of 0 (text only), 2 and 12 frames on the tiny preset (490 px frames: 49 patches, 4 tokens)."""
    out = {}
    for n in (0, 2, 12):
        path = tmp_path_factory.mktemp("plan") / f"plan{n}.json"
        result = plan(*TINY, "--frames", str(n), "--json", str(path))
        assert result.returncode == 0, result.stderr
        if n:
            assert f"video: {n} frames per row at 490 px, 4 tokens each ({4 * n} image + 16 text tokens)" in result.stdout
        out[n] = json.loads(path.read_text())
    return out


def test_frames_make_the_prompt_and_its_arrays(reports):
    cfg = AriaConfig.preset("tiny")
    frames = Frames.of(cfg, 12, 2, 12)
    assert (frames.size, frames.tokens) == (FRAME_SIZE, 4)
    for n in (2, 12):
        report = reports[n]
        assert report["frames"] == n and report["seq"] == 16 + 4 * n
        analytic = report["inference"]["analytic"]
        assert analytic["pixels"] == n * 3 * 490 * 490 * 4
        assert analytic["image_features"] == n * 4 * cfg.text.hidden_size * 2  # bfloat16
        slots = 16 + 4 * n + 4
        assert analytic["kv_cache"] == 2 * cfg.text.num_hidden_layers * slots * cfg.text.num_key_value_heads \
            * cfg.text.head_dim * 2
        prefill = report["inference"]["compiled"]["prefill"]
        assert prefill["argument"] >= analytic["params"] + analytic["pixels"]  # the frames are the prefill's input
    text = reports[0]
    assert text["frames"] == 0 and "pixels" not in text["inference"]["analytic"]
    assert text["inference"]["compiled"]["prefill"]["argument"] < reports[2]["inference"]["analytic"]["pixels"]


def test_too_many_frames_name_the_count_that_fits():
    result = plan(*TINY, "--frames", "200")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    # tiny's context is 512: (512 - 16 text - 4 new) // 4 tokens per frame = 123 frames
    assert "200 images/frames x 4 tokens" in lines[0] and "context length 512; the frames that fit: 123 " in lines[0]
    assert plan(*TINY, "--frames", "123").returncode == 0


def test_negative_frames_are_bad_input():
    result = plan(*TINY, "--frames", "-1")
    assert result.returncode == 2 and "--frames >= 0" in result.stderr
