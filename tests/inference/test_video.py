"""Video input (issue 21, inference): frame sampling and timestamps as the original's formula, the right frames out
of every container (by seeking), the original's prompt format, greedy chat equal to transformers fed the same
frames as images, and one line naming the file for every bad video."""

import numpy as np
import pytest
import torch
from aria_proc_dirs import hf_processor
from video_files import CONTAINERS, all_frames, frame_number, write_video, write_zero_frame_video

from aria_jax import Aria
from aria_jax.errors import InputError
from aria_jax.inference import video as video_mod
from aria_jax.inference.processor import AriaProcessor
from aria_jax.inference.video import (
    Video,
    VideoError,
    VideoInfo,
    expand_videos,
    load_frames,
    load_video,
    probe,
    sample_indices,
    video_content,
)


def original_indices(total: int, n: int) -> list[int]:
    """The original's video notebook: ``int(duration / num_frames * (i + 0.5))``."""
    return [int(total / n * (i + 0.5)) for i in range(n)]


def original_stamp(ts: float) -> str:
    """The original's ``f"[{int(ts)//60:02d}:{int(ts)%60:02d}]"``."""
    return f"[{int(ts) // 60:02d}:{int(ts) % 60:02d}]"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """57 frames at 10 fps in every container this PyAV writes: {(ext, codec): path}."""
    root = tmp_path_factory.mktemp("clips")
    return {(ext, codec): write_video(root / f"clip_{codec}.{ext}", 57, fps=10, codec=codec)
            for ext, codec in CONTAINERS}


# ---------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("total, n", [(57, 8), (250, 128), (3, 8), (1, 1), (100, 7), (1000, 3)])
def test_sample_indices_are_the_original_formula(total, n):
    assert sample_indices(total, n) == original_indices(total, n)


def test_fps_sampling_and_max_frames():
    assert sample_indices(250, fps=2.0, video_fps=25.0) == original_indices(250, 20)  # 10 s x 2 frames/s
    assert sample_indices(250, fps=0.01, video_fps=25.0) == original_indices(250, 1)  # at least one frame
    assert sample_indices(250, 32, max_frames=8) == original_indices(250, 8)
    assert sample_indices(250, fps=5.0, video_fps=25.0, max_frames=16) == original_indices(250, 16)
    assert sample_indices(250) == original_indices(250, 8)  # the default: 8 frames


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_frames=0, num_frames=8), "total_frames must be a positive integer, got 0"),
    (dict(total_frames=10, num_frames=0), "num_frames must be a positive integer, got 0"),
    (dict(total_frames=10, num_frames=True), "num_frames must be a positive integer, got True"),
    (dict(total_frames=10, num_frames=4, fps=1.0, video_fps=10.0), "num_frames or fps, not both"),
    (dict(total_frames=10, fps=1.0), "needs the video's frame rate"),
    (dict(total_frames=10, fps=float("nan"), video_fps=10.0), "fps must be a positive number, got nan"),
    (dict(total_frames=10, num_frames=4, max_frames=-1), "max_frames must be a positive integer, got -1"),
])
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample_indices(**kwargs)


# ---------------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_container_gives_the_sampled_frames(clips, container):
    path = clips[container]
    assert probe(path) == VideoInfo(frames=57, fps=10.0, width=128, height=32)
    video = load_video(path, num_frames=8)
    assert video.indices == original_indices(57, 8) == [3, 10, 17, 24, 32, 39, 46, 53]
    assert video.timestamps == [i / 10.0 for i in video.indices]
    assert [frame_number(f) for f in video.frames] == video.indices
    assert all(f.mode == "RGB" and f.size == (128, 32) for f in video.frames)
    # any order, repeats, the first and last frames; the same pixels as decoding every frame
    wanted = [56, 0, 31, 31, 1, 55, 20]
    frames = load_frames(path, wanted)
    assert [frame_number(f) for f in frames] == wanted
    reference = all_frames(path)
    for i, frame in zip(wanted, frames, strict=True):
        np.testing.assert_array_equal(np.asarray(frame), np.asarray(reference[i].convert("RGB")))


def test_fps_sampling_from_a_file(clips):
    path = clips[CONTAINERS[0]]
    video = load_video(path, fps=2.0, max_frames=10)  # 5.7 s x 2 = 11 frames, capped at 10
    assert video.indices == original_indices(57, 10)
    assert [frame_number(f) for f in video.frames] == video.indices


@pytest.mark.parametrize("container", [c for c in CONTAINERS if c[1] != "libvpx"][:4], ids=lambda c: c[0])
def test_loading_a_few_frames_seeks_instead_of_decoding_everything(tmp_path, container, monkeypatch):
    ext, codec = container
    path = write_video(tmp_path / f"long.{ext}", 250, fps=25, codec=codec, gop=25)
    decoded = []
    step = video_mod._Frames.next

    def counting(self):
        out = step(self)
        decoded.append(out is not None)
        return out

    monkeypatch.setattr(video_mod._Frames, "next", counting)
    video = load_video(path, num_frames=4)
    assert [frame_number(f) for f in video.frames] == video.indices == original_indices(250, 4)
    assert sum(decoded) < 100, f"{sum(decoded)} of 250 frames decoded for 4"


def test_the_frame_count_is_the_video_tracks_not_a_longer_audio_tracks(tmp_path):
    """Matroska has no per-stream duration: its video track's DURATION tag counts, not the 6 s of audio."""
    path = write_video(tmp_path / "with_audio.mkv", 30, fps=10, audio_seconds=6.0)
    assert probe(path).frames == 30
    video = load_video(path, num_frames=8)
    assert [frame_number(f) for f in video.frames] == video.indices == original_indices(30, 8)


def test_frames_past_the_end(clips):
    path = clips[CONTAINERS[0]]
    assert [frame_number(f) for f in load_frames(path, [56, 57, 58])] == [56, 56, 56]  # a header a frame or two long
    with pytest.raises(VideoError, match=r"clip_.*: frame 300 is past the end: 57 frames decode"):
        load_frames(path, [300])


# ---------------------------------------------------------------------------------------------------- bad files

def bad_files(root) -> dict[str, tuple[str, str]]:
    (root / "empty.mp4").write_bytes(b"")
    (root / "junk.mp4").write_bytes(b"not a video at all " * 100)
    (root / "dir.mp4").mkdir()
    return {
        "missing": (str(root / "missing.mp4"), "no such video file"),
        "empty": (str(root / "empty.mp4"), "empty file, not a video"),
        "junk": (str(root / "junk.mp4"), "cannot read as a video (Invalid data found when processing input)"),
        "directory": (str(root / "dir.mp4"), "is a directory, not a video file"),
        "zero frames (avi)": (write_zero_frame_video(root / "zero.avi"), "the video has no frames"),
        "zero frames (mp4)": (write_zero_frame_video(root / "zero.mp4"), "no video stream (or one without frames)"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "junk", "directory", "zero frames (avi)", "zero frames (mp4)"])
def test_bad_videos_are_one_line_naming_the_file(tmp_path, case):
    path, reason = bad_files(tmp_path)[case]
    for load in (probe, load_video):
        with pytest.raises(VideoError) as info:
            load(path)
        assert str(info.value) == f"{path}: {reason}"
    with pytest.raises(VideoError) as info:
        load_frames(path, [0])
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_truncated_file_is_one_line(clips, tmp_path):
    data = open(clips[("mkv", "libx264")] if ("mkv", "libx264") in clips else clips[CONTAINERS[0]], "rb").read()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 3])
    try:
        video = load_video(path, num_frames=8)
    except VideoError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:  # what decodes must still be the sampled frames
        assert [frame_number(f) for f in video.frames] == video.indices


# ---------------------------------------------------------------------------------------------------- prompt

def test_video_content_is_the_original_format():
    stamps = [0.3, 59.99, 65.0, 3725.9]
    expected = []
    for ts in stamps:
        expected += [{"type": "text", "text": original_stamp(ts)}, {"type": "image"}, {"type": "text", "text": "\n"}]
    assert video_content(stamps) == expected
    assert [item["text"] for item in video_content(stamps)[::3]] == ["[00:00]", "[00:59]", "[01:05]", "[62:05]"]
    assert video_content(None, num_frames=3) == [{"type": "image"}] * 3 + [{"type": "text", "text": "\n"}]


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AriaProcessor.from_pretrained(chat_dir[0])


def video_messages(text="what happens?"):
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def test_rendered_prompt_is_the_original_format(processor, clips):
    path = clips[CONTAINERS[0]]
    messages, frames = expand_videos(video_messages(), videos=[path], num_frames=4)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    img = "<fim_prefix><|img|><fim_suffix>"
    stamps = [i / 10 for i in original_indices(57, 4)]  # 0.7, 2.1, 3.5, 4.9 s
    expected = ("<|im_start|>user\n[00:00]" + img + "\n[00:02]" + img + "\n[00:03]" + img + "\n[00:04]" + img
                + "\nwhat happens?<|im_end|>\n<|im_start|>assistant\n")
    assert [original_stamp(t) for t in stamps] == ["[00:00]", "[00:02]", "[00:03]", "[00:04]"]
    assert prompt == expected
    assert [frame_number(f) for f in frames] == original_indices(57, 4)
    plain, _ = expand_videos(video_messages(), videos=[path], num_frames=4, timestamps=False)
    assert processor.apply_chat_template(plain, add_generation_prompt=True) == (
        "<|im_start|>user\n" + img * 4 + "\nwhat happens?<|im_end|>\n<|im_start|>assistant\n")
    # the arrays: frames at 490 px (4 tokens each in this test checkpoint), in the frames' order
    batch = processor.chat_inputs(video_messages(), videos=[path], num_frames=4)
    same = processor(text=[expected], images=frames, max_image_size=490)
    assert batch["pixel_values"].shape[-1] == 490
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_mask"):
        np.testing.assert_array_equal(batch[key], same[key])


def test_images_and_videos_keep_their_order(processor, clips):
    from PIL import Image

    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    video = Video(frames=[Image.new("RGB", (8, 8), c) for c in ("green", "white")], indices=[0, 1], timestamps=[0, 61])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"},
                                             {"type": "text", "text": "compare"}]}]
    out, images = expand_videos(messages, images=[red, blue], videos=[video])
    assert images == [red, *video.frames, blue]
    assert [i.get("text") for i in out[0]["content"]] == [None, "[00:00]", None, "\n", "[01:01]", None, "\n", None,
                                                           "compare"]
    path_item = [{"role": "user", "content": [{"type": "video", "path": clips[CONTAINERS[0]]}]}]
    assert len(expand_videos(path_item, num_frames=3)[1]) == 3  # an item may name its own file


@pytest.mark.parametrize("call, message", [
    (lambda p: p.chat_inputs(video_messages()), "0 video(s) given but the messages have 1 video item(s) without a path"),
    (lambda p: p.chat_inputs(video_messages(), videos=["a.mp4", "b.mp4"]), "2 video(s) given but the messages have 1"),
    (lambda p: p.apply_chat_template(video_messages()), "must be expanded into frames first"),
    (lambda p: p.chat_inputs(video_messages(), videos=[[]]), "a file path or a non-empty list of frames"),
])
def test_video_items_that_do_not_match(processor, call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(processor)


# ---------------------------------------------------------------------------------------------------- generation

def hf_reply(hf, directory, content, frames, max_new_tokens):
    proc = hf_processor(directory)
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = proc(text=[prompt], images=frames, max_image_size=490, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=proc.tokenizer,
                          stop_strings=["<|im_end|>"])
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_video_chat_equals_transformers_on_the_same_frames(chat_dir, clips):
    directory, hf = chat_dir
    path = clips[CONTAINERS[0]]
    indices = original_indices(57, 4)
    reference = all_frames(path)
    frames = [reference[i].convert("RGB") for i in indices]  # decoded front to back, not by the loader
    content = []
    for i in indices:
        content += [{"type": "text", "text": original_stamp(i / 10)}, {"type": "image"}, {"type": "text", "text": "\n"}]
    content.append({"type": "text", "text": "what happens?"})
    expected = hf_reply(hf, directory, content, frames, 10)
    model = Aria.from_pretrained(directory, dtype="float32")
    reply = model.chat(video_messages(), videos=[path], num_frames=4, max_new_tokens=10)
    assert reply == expected and len(reply) > 0
    # bare frames (no timestamps): the plain form
    plain = [{"type": "image"}] * 4 + [{"type": "text", "text": "\n"}, {"type": "text", "text": "what happens?"}]
    expected_plain = hf_reply(hf, directory, plain, frames, 10)
    assert model.chat(video_messages(), videos=[frames], max_new_tokens=10) == expected_plain
    assert model.chat(video_messages(), videos=[path], num_frames=4, timestamps=False,
                      max_new_tokens=10) == expected_plain


def test_chat_with_a_bad_video_is_one_line(chat_dir, tmp_path):
    model = Aria.from_pretrained(chat_dir[0], dtype="float32")
    path, reason = bad_files(tmp_path)["zero frames (avi)"]
    with pytest.raises(VideoError, match=f"^{path}: {reason}$"):
        model.chat(video_messages(), videos=[path], max_new_tokens=2)
    with pytest.raises(InputError, match="split_image=True would split video frames"):
        model.chat(video_messages(), videos=[path], split_image=True, max_new_tokens=2)
