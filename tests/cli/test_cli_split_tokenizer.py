"""aria-jax generate / chat with --split-mode original and --tokenizer PATH, and Aria.from_pretrained(tokenizer_path=):
the same replies as the Python API, the original crops reach the model, bad paths are one line and exit 2."""

import io
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from aria_jax import Aria
from aria_jax.cli import main

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}]


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray(data.chelsea()).save(path)  # 451 x 300: the original split takes (3, 2), 6 crops + the whole
    return str(path)


@pytest.fixture(scope="module")
def split_checkpoint(chat_dir, tmp_path_factory):
    """(a directory with the chat checkpoint's weights and config only, a directory with its tokenizer only)."""
    src = Path(chat_dir[0])
    weights = tmp_path_factory.mktemp("weights_only")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, weights / name)
    tok = tmp_path_factory.mktemp("tokenizer_only")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
        shutil.copy2(src / name, tok / name)
    return str(weights), str(tok)


@pytest.fixture
def crops_seen(monkeypatch):
    """The number of image crops each generation received."""
    seen = []
    plan = Aria._plan

    def spy(self, *args, **kwargs):
        out = plan(self, *args, **kwargs)
        seen.append(0 if out["pixel_values"] is None else out["pixel_values"].shape[0])
        return out

    monkeypatch.setattr(Aria, "_plan", spy)
    return seen


def test_generate_split_mode_original(chat_dir, photo_path, crops_seen, capsys):
    directory, _ = chat_dir
    expected = Aria.from_pretrained(directory).chat(MESSAGES, images=[Image.open(photo_path)], max_new_tokens=5,
                                                    max_image_size=490, split_mode="original")
    code = main(["generate", "--model", directory, "--prompt", "what is this?", "--image", photo_path,
                 "--max-new-tokens", "5", "--max-image-size", "490", "--split-mode", "original"])
    assert code == 0 and capsys.readouterr().out == expected + "\n"
    assert crops_seen == [7, 7]


def test_chat_split_mode_original(chat_dir, photo_path, crops_seen, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {photo_path}\nhi\n/quit\n"))
    assert main(["chat", "--model", chat_dir[0], "--max-new-tokens", "2", "--max-image-size", "490",
                 "--split-mode", "original"]) == 0
    assert "[prefill" in capsys.readouterr().out
    assert crops_seen == [7]


def test_tokenizer_path_api_and_flag(chat_dir, split_checkpoint, photo_path, capsys):
    weights, tok = split_checkpoint
    full = Aria.from_pretrained(chat_dir[0])
    assert Aria.from_pretrained(weights).processor is None
    model = Aria.from_pretrained(weights, tokenizer_path=tok)
    image = Image.open(photo_path)
    expected = full.chat(MESSAGES, images=[image], max_new_tokens=5, max_image_size=490)
    assert model.chat(MESSAGES, images=[image], max_new_tokens=5, max_image_size=490) == expected
    code = main(["generate", "--model", weights, "--tokenizer", tok, "--prompt", "what is this?", "--image",
                 photo_path, "--max-new-tokens", "5", "--max-image-size", "490"])
    assert code == 0 and capsys.readouterr().out == expected + "\n"


def _run(args, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", ["none", "missing", "no_tokenizer_json"])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_tokenizer_errors_are_one_line(split_checkpoint, command, case, monkeypatch, capsys):
    weights, _ = split_checkpoint
    extra, message = {
        "none": ([], f"{weights}: no tokenizer files (tokenizer.json); cannot turn text into tokens (--tokenizer PATH"),
        "missing": (["--tokenizer", "/nonexistent/tok"], "tokenizer_path /nonexistent/tok: not a model directory"),
        "no_tokenizer_json": (["--tokenizer", weights], f"no tokenizer.json in '{weights}'"),
    }[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/quit\n"))
    args = [command, "--model", weights, *extra] + (["--prompt", "x"] if command == "generate" else [])
    code, err = _run(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"aria-jax {command}: error: ") and message in err[0], err


def test_bad_split_mode_is_refused_by_the_parser(chat_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", chat_dir[0], "--prompt", "x", "--split-mode", "llava"])
    assert e.value.code == 2 and "--split-mode: invalid choice: 'llava'" in capsys.readouterr().err
