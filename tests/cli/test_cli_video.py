"""aria-jax generate --video / chat /video: the Python API's replies, and one line (exit 2, or the chat goes on) for
every bad video or video option."""

import io
import subprocess
import sys

import pytest
from video_files import CONTAINERS, write_video, write_zero_frame_video

from aria_jax import Aria
from aria_jax.cli import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    ext, codec = CONTAINERS[0]
    return write_video(tmp_path_factory.mktemp("clip") / f"clip.{ext}", 57, fps=10, codec=codec)


@pytest.fixture(scope="module")
def model(chat_dir):
    return Aria.from_pretrained(chat_dir[0])


def user(text, videos=1):
    return {"role": "user", "content": [{"type": "video"}] * videos + [{"type": "text", "text": text}]}


def _run(args, capsys) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize("flags, options", [
    (["--num-frames", "4"], dict(num_frames=4)),
    (["--num-frames", "4", "--no-timestamps"], dict(num_frames=4, timestamps=False)),
    (["--fps", "1", "--max-frames", "3"], dict(fps=1.0, max_frames=3)),
])
def test_generate_with_a_video_prints_the_chat_reply(chat_dir, model, clip, flags, options, capsys):
    expected = model.chat([user("what happens?")], videos=[clip], max_new_tokens=6, **options)
    code, out, err = _run(["generate", "--model", chat_dir[0], "--prompt", "what happens?", "--video", clip,
                           *flags, "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    assert out == expected + "\n"
    assert "prefill" in err[-1]


def test_chat_session_with_a_video(chat_dir, model, clip, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    first = model.chat([user("hi")], videos=[clip], num_frames=3, max_new_tokens=4)
    second = model.chat([user("hi"), {"role": "assistant", "content": [{"type": "text", "text": first}]},
                         {"role": "user", "content": [{"type": "text", "text": "and then?"}]}],
                        videos=[clip], num_frames=3, max_new_tokens=4)
    script = f"/video {empty}\n/video {tmp_path / 'nope.mkv'}\n/video\n/video {clip}\nhi\nand then?\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code, out, _ = _run(["chat", "--model", chat_dir[0], "--max-new-tokens", "4", "--num-frames", "3"], capsys)
    assert code == 0
    assert f"error: {empty}: empty file, not a video\n" in out
    assert f"error: {tmp_path / 'nope.mkv'}: no such video file\n" in out
    assert "error: /video needs a file path\n" in out
    assert f"(video attached: {clip}, 3 frames)" in out
    assert f"> {first}\n[prefill" in out
    assert f"> {second}\n[prefill" in out


def test_chat_goes_on_after_a_video_the_model_refuses(chat_dir, model, clip, monkeypatch, capsys):
    """--split-image cannot apply to video frames: that message fails in one line, the next one (no video) works."""
    plain = model.chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_new_tokens=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {clip}\nwhat?\nhi\n/quit\n"))
    code, out, _ = _run(["chat", "--model", chat_dir[0], "--max-new-tokens", "3", "--split-image"], capsys)
    assert code == 0
    assert "error: split_image=True would split video frames" in out
    assert f"> {plain}\n[prefill" in out


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.mp4").write_bytes(b"")
    (root / "junk.webm").write_bytes(b"\x1aE\xdf\xa3 not really webm" * 50)
    return {"EMPTY": str(root / "empty.mp4"), "JUNK": str(root / "junk.webm"),
            "ZERO": write_zero_frame_video(root / "zero.avi"), "MISSING": str(root / "missing.mp4")}


@pytest.mark.parametrize("extra, message", [
    (["--video", "EMPTY"], "EMPTY: empty file, not a video"),
    (["--video", "JUNK"], "JUNK: cannot read as a video ("),
    (["--video", "ZERO"], "ZERO: the video has no frames"),
    (["--video", "MISSING"], "MISSING: no such video file"),
    (["--video", "ZERO", "--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    (["--fps", "nan"], "--fps must be a finite number > 0, got nan"),
    (["--max-frames", "0"], "--max-frames must be >= 1, got 0"),
    (["--video", "ZERO", "--raw"], "--raw takes no --video"),
])
def test_bad_videos_and_options_exit_2_with_one_line(chat_dir, bad_videos, extra, message, capsys):
    extra = [bad_videos.get(x, x) for x in extra]
    for name, path in bad_videos.items():
        message = message.replace(name, path)
    code, out, err = _run(["generate", "--model", chat_dir[0], "--prompt", "x", *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("aria-jax generate: error: ") and message in err[0], err
    assert out == ""


def test_a_bad_video_exits_2_from_the_command_line(chat_dir, bad_videos):
    """The real process: status 2, one line on stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "aria_jax.cli", "generate", "--model", chat_dir[0], "--prompt",
                             "x", "--video", bad_videos["ZERO"]], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"aria-jax generate: error: {bad_videos['ZERO']}: the video has "
                                                  "no frames"]
