"""aria-jax generate / chat: the same replies as the Python API, interactive commands, errors with status 2."""

import io
import json
import shutil
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
        (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
        (["--top-p", "2"], r"--top-p must be in (0, 1], got 2.0"),
    ],
)
def test_bad_input_exits_2_with_one_line(chat_dir, extra, message):
    directory, _ = chat_dir
    result = subprocess.run([sys.executable, "-m", "aria_jax.cli", "generate", "--model", directory, "--prompt", "x",
                             *extra], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# ---- bad input that used to end in a traceback (issue 18: items 5, 9, 10, 11) ----------------------------------

@pytest.fixture(scope="module")
def bomb_path(tmp_path_factory):
    """A 30000 x 30000 1-bit PNG: 110 kB, 900 M pixels (over twice Pillow's decompression-bomb limit)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (30000, 30000)).save(path)
    return str(path)


def test_runtime_overrides_reach_the_model_and_the_stats_line(chat_dir, capsys):
    """--runtime replaces the platform's choices (here the CPU's unrolled layout and blocked experts) and says so;
    the reply is the default run's, token for token."""
    args = ["generate", "--model", chat_dir[0], "--prompt", "hello there", "--max-new-tokens", "5"]
    assert main(args) == 0
    default = capsys.readouterr()
    assert "layout unrolled" in default.err and "experts blocked" in default.err
    assert main([*args, "--runtime", "layout=stacked,experts=dense,matvec_split=1,decode_options=none"]) == 0
    changed = capsys.readouterr()
    assert changed.out == default.out
    assert "experts dense" in changed.err and "layout stacked" in changed.err and "matvec split 1" in changed.err
    assert "decode compiler options none" in changed.err and "parameter layout stacked" in changed.err


def _run(args, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
        (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
        (["--top-k", "-2"], "--top-k must be >= 0, got -2"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--image", "BOMB"], "BOMB: cannot read image (too many pixels, over twice Pillow's limit"),
        (["--runtime", "experts=fast"], "--runtime: unknown experts kernel 'fast'"),
        (["--runtime", "speed=11"], "--runtime: unknown runtime key 'speed'"),
    ],
)
def test_values_and_images_refused_in_one_line(chat_dir, bomb_path, extra, message, capsys):
    """Before: --temperature nan decoded greedily; a decompression bomb ended in a traceback."""
    extra = [bomb_path if x == "BOMB" else x for x in extra]
    code, err = _run(["generate", "--model", chat_dir[0], "--prompt", "x", *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("aria-jax generate: error: ")
    assert message.replace("BOMB", bomb_path) in err[0], err


def test_chat_survives_a_bad_image(chat_dir, photo_path, bomb_path, tmp_path, monkeypatch, capsys):
    """A bad /image prints one line and the session goes on. Before: a bomb killed the session."""
    directory, _ = chat_dir
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expected = Aria.from_pretrained(directory).chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                    max_new_tokens=3)
    script = f"/image {bomb_path}\n/image {empty}\n/image {tmp_path / 'nope.png'}\nhi\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", directory, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert f"error: {bomb_path}: cannot read image (too many pixels" in out
    assert f"error: {empty}: cannot read image (cannot identify image file" in out
    assert f"error: {tmp_path / 'nope.png'}: cannot read image (no such file)" in out
    assert f"> {expected}\n[prefill" in out  # the text-only reply: no bad image was attached


@pytest.mark.parametrize("error", ["RepositoryNotFoundError", "GatedRepoError", "LocalEntryNotFoundError"])
@pytest.mark.parametrize("command", ["generate", "chat", "inspect"])
def test_hub_errors_name_the_model_id(command, error, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(repo_id, revision=None, allow_patterns=None):
        cls = getattr(errors, error)
        exc = cls.__new__(cls)
        Exception.__init__(exc, "404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/...")
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    args = {"generate": ["generate", "--model", "rhymes-ai/Nope", "--prompt", "x"],
            "chat": ["chat", "--model", "rhymes-ai/Nope"], "inspect": ["inspect", "rhymes-ai/Nope"]}[command]
    code, err = _run(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
        f"aria-jax {command}: error: rhymes-ai/Nope: cannot fetch from the hub ({error}: "), err


@pytest.fixture
def template_dir(chat_dir, tmp_path):
    """A copy of the chat checkpoint whose chat template the test replaces."""
    directory = tmp_path / "model"
    shutil.copytree(chat_dir[0], directory)

    def with_template(text: str) -> str:
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": text}))
        return str(directory)

    return with_template


TEMPLATES = {
    "syntax_error": ("{% for m in messages %}{{ m.content }", "chat_template.json: chat template syntax error at line 1"),
    "sandbox_attribute": ("{{ messages.__class__.__mro__ }}", "chat_template.json: breaks the template sandbox"),
    "sandbox_mutation": ("{% set x = messages.append(1) %}{{ x }}", "chat_template.json: breaks the template sandbox"),
    "type_error": ("{{ messages + 1 }}", "chat_template.json: the chat template fails while rendering (TypeError"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_broken_chat_templates_exit_2_with_one_line(command, case, template_dir, monkeypatch, capsys):
    template, message = TEMPLATES[case]
    directory = template_dir(template)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    args = ["generate", "--model", directory, "--prompt", "x"] if command == "generate" else ["chat", "--model",
                                                                                               directory]
    code, err = _run(args, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"aria-jax {command}: error: ") and message in err[0], err


def test_a_template_that_refuses_a_message_keeps_the_chat_going(template_dir, monkeypatch, capsys):
    template = ("{% if messages[-1]['content'][0]['text'] == 'forbidden' %}{{ raise_exception('not this one') }}"
                "{% endif %}<|im_start|>user\n{{ messages[-1]['content'][0]['text'] }}<|im_end|>\n"
                "<|im_start|>assistant\n")
    directory = template_dir(template)
    monkeypatch.setattr(sys, "stdin", io.StringIO("forbidden\nfine\n/quit\n"))
    assert main(["chat", "--model", directory, "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error: " in out and "the template refuses this conversation: not this one" in out
    assert out.count("[prefill") == 1  # the second message was answered
