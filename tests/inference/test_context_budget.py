"""A video prompt that outgrows the context: one line naming the frame count that fits, from the Python API and the
CLI (exit 2), before anything is traced."""

import json
import shutil

import pytest
from video_files import write_video

from aria_jax import Aria
from aria_jax.cli import main
from aria_jax.inference.budget import ContextBudgetError


@pytest.fixture(scope="module")
def short_context_dir(chat_dir, tmp_path_factory):
    """The chat checkpoint with a 96-position context (4 tokens per 490 px frame in this tiny model)."""
    directory = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(chat_dir[0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=40)


def test_chat_with_too_many_frames_names_the_count_that_fits(short_context_dir, clip):
    model = Aria.from_pretrained(short_context_dir)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}]
    with pytest.raises(ContextBudgetError) as err:
        model.chat(messages, videos=[clip], num_frames=32, max_new_tokens=8)
    line = str(err.value)
    assert "\n" not in line and "32 images/frames x 4 tokens" in line and "exceeds the context length 96" in line
    fit = int(line.split("the frames that fit: ")[1].split()[0])
    assert 0 < fit < 32
    # the count it names does fit
    assert isinstance(model.chat(messages, videos=[clip], num_frames=fit, max_new_tokens=8), str)


def test_cli_exits_2_with_the_same_line(short_context_dir, clip, capsys):
    code = main(["generate", "--model", short_context_dir, "--prompt", "what happens?", "--video", str(clip),
                 "--num-frames", "32", "--max-new-tokens", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the frames that fit:" in err[0], err
