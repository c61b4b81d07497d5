"""aria-jax generate / chat: the same replies as the Python API, interactive commands, errors with status 2."""

import io
import subprocess
import sys

import pytest
from PIL import Image
from skimage import data

from aria_jax import Aria
from aria_jax.cli import main


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(data.chelsea()).save(path)
    return str(path)


def test_generate_prints_the_chat_reply(chat_dir, photo_path, capsys):
    directory, _ = chat_dir
    model = Aria.from_pretrained(directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]
    expected = model.chat(messages, images=[Image.open(photo_path)], max_new_tokens=6, max_image_size=490)
    code = main(["generate", "--model", directory, "--prompt", "what is this?", "--image", photo_path,
                 "--max-new-tokens", "6", "--max-image-size", "490"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out == expected + "\n"
    assert "prefill" in captured.err and "tok/s" in captured.err


def test_chat_session_with_image_reset_and_quit(chat_dir, photo_path, monkeypatch, capsys):
    directory, _ = chat_dir
    model = Aria.from_pretrained(directory)
    first = model.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                       images=[Image.open(photo_path)], max_new_tokens=4, max_image_size=490)
    fresh = model.chat([{"role": "user", "content": [{"type": "text", "text": "again"}]}], max_new_tokens=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {photo_path}\nhi\n/reset\nagain\n/quit\n"))
    assert main(["chat", "--model", directory, "--max-new-tokens", "4", "--max-image-size", "490"]) == 0
    out = capsys.readouterr().out
    assert f"(image attached: {photo_path})" in out
    assert f"> {first}\n[prefill" in out
    assert "(conversation reset)" in out
    assert f"> {fresh}\n[prefill" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/nonexistent.png"], "/nonexistent.png"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--top-p", "2"], r"top_p must be in (0, 1], got 2.0"),
    ],
)
def test_bad_input_exits_2_with_one_line(chat_dir, extra, message):
    directory, _ = chat_dir
    result = subprocess.run([sys.executable, "-m", "aria_jax.cli", "generate", "--model", directory, "--prompt", "x",
                             *extra], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
