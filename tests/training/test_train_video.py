"""Training on video samples (issue 21, item 4): the original JSONL video format, frames decided from the header.

A video sample is ``{"messages": [...], "video": {"path": "videos/x.mp4", "num_frames": N}}`` with one
``{"type": "video"}`` item in a user message; it expands into ``N`` frames at the centres of equal segments, each as
``"[MM:SS]"``, an image and ``"\\n"``. The videos are written here with PyAV, frame ``i`` a flat grey of level
``level(i)``, so the frames fed to the model can be read back from ``pixel_values``.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_helpers import read_metrics, stderr_lines, train_main, write_dataset

from aria_jax.inference.processor import AriaProcessor
from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training.config import RecipeError
from aria_jax.training.losses import IGNORE_INDEX

FRAMES, FPS = 24, 2  # a 12-second clip


def level(i: int) -> int:
    """The grey level of frame ``i`` of the test videos (steps of 10: far apart after lossy coding)."""
    return 5 + 10 * i


def write_video(path, frames: int = FRAMES, fps: int = FPS, size: tuple[int, int] = (64, 48)) -> str:
    """An mp4 (MPEG-4 part 2) whose frame ``i`` is a flat grey of ``level(i)``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), level(i), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def expected_indices(total: int, n: int) -> list[int]:
    return [int(total / n * (i + 0.5)) for i in range(n)]


def stamp(index: int, fps: float) -> str:
    seconds = int(index / fps)
    return f"[{seconds // 60:02d}:{seconds % 60:02d}]"


def video_line(path: str = "videos/clip.mp4", num_frames: int | None = 4, question: str = "what happens?",
               **video) -> str:
    msgs = [{"role": "user", "content": [{"type": "video", "text": None}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": "the screen grows brighter"}]}]
    spec = {"path": path, **({} if num_frames is None else {"num_frames": num_frames}), **video}
    return json.dumps({"messages": msgs, "images": None, "video": spec})


def mixed_dataset(root, extra: list[str] = (), n: int = 3) -> str:
    """write_dataset's ``n`` samples (an image one, a text one, a two-image one), a video sample, then ``extra``."""
    write_dataset(root, n=n)
    write_video(os.path.join(root, "videos", "clip.mp4"))
    with open(os.path.join(root, "train.jsonl"), "a") as f:
        f.writelines(line + "\n" for line in [video_line(), *extra])
    return str(root)


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AriaProcessor.from_pretrained(chat_dir[0])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return J.read_jsonl(mixed_dataset(tmp_path_factory.mktemp("video") / "ds"))


# ---------------------------------------------------------------------------------------------------- encoding


def test_video_sample_is_the_sampled_frames_with_their_timestamps(processor, records):
    record = records[3]
    assert record.video is not None and record.video.num_frames == 4 and record.images == []
    sample = D.JsonlEncoder(processor, 490, False)(record)
    indices = expected_indices(FRAMES, 4)
    per_frame = processor.tokens_per_image(490)
    image_id = processor._require_id(processor.image_token)
    assert int(np.sum(sample.input_ids == image_id)) == 4 * per_frame
    assert sample.pixel_values.shape == (4, 3, 490, 490)
    # the prompt: per frame its [MM:SS], the frame's image tokens and a newline, then the question
    content = [x for i in indices for x in ({"type": "text", "text": stamp(i, FPS)}, {"type": "image"},
                                            {"type": "text", "text": "\n"})]
    messages = json.loads(video_line())["messages"]
    messages[0]["content"] = [*content, {"type": "text", "text": "what happens?"}]
    blank = [np.zeros((48, 64, 3), np.uint8)] * 4
    full = processor(text=processor.apply_chat_template(messages), images=blank, max_image_size=490,
                     add_special_tokens=False)
    np.testing.assert_array_equal(full["input_ids"][0], sample.input_ids)
    text = processor.decode(sample.input_ids[sample.input_ids != image_id])
    assert [stamp(i, FPS) for i in indices] == ["[00:01]", "[00:04]", "[00:07]", "[00:10]"]
    assert all(s in text for s in ["[00:01]", "[00:04]", "[00:07]", "[00:10]"]), text
    # the frames fed are the sampled ones: each frame's grey level read back from its valid pixels
    std = np.asarray(processor.image_processor.image_std).reshape(3, 1, 1)
    mean = np.asarray(processor.image_processor.image_mean).reshape(3, 1, 1)
    got = []
    for values, mask in zip(sample.pixel_values, sample.pixel_mask, strict=True):
        grey = (values * std + mean)[:, mask].mean() * 255
        got.append(int(round((grey - 5) / 10)))
    assert got == indices


def test_every_image_token_of_a_video_sample_is_masked(processor, records):
    sample = D.JsonlEncoder(processor, 490, False)(records[3])
    image_id = processor._require_id(processor.image_token)
    assert np.all(sample.labels[sample.input_ids == image_id] == IGNORE_INDEX)
    trained = sample.labels != IGNORE_INDEX
    assert processor.decode(sample.input_ids[trained]) == "the screen grows brighter<|im_end|>\n"


def test_num_frames_defaults_to_8(tmp_path, processor):
    root = mixed_dataset(tmp_path / "ds", [video_line(num_frames=None), video_line(num_frames=None).replace(
        '"path"', '"num_frames": null, "path"')])
    records = J.read_jsonl(root)
    assert [r.video.num_frames for r in records[4:]] == [8, 8]
    sample = D.JsonlEncoder(processor, 490, True)(records[4])  # split_image never splits a frame
    assert len(sample.pixel_values) == 8
    assert int(np.sum(sample.input_ids == 9)) == 8 * processor.tokens_per_image(490)


def test_measure_equals_encode_without_decoding_a_frame(processor, records, monkeypatch):
    """The multi-host batch plan: a video's tokens from its header alone (probed once, by check_images)."""
    import aria_jax.inference.video as V

    probes = []
    for module in (J, D):
        monkeypatch.setattr(module, "probe", lambda p: probes.append(p) or V.probe(p))
    kept, skipped, sizes = J.check_images(records, skip_bad=False)
    assert kept == records and skipped == 0 and len(probes) == 1
    assert sizes[records[3].video.path].frames == FRAMES
    for split in (False, True):
        encoder = D.JsonlEncoder(processor, 490, split, sizes)
        samples = [encoder(r) for r in records]
        monkeypatch.setattr(D, "load_frames", lambda *a: pytest.fail("measure decoded frames"))
        for record, sample in zip(records, samples, strict=True):
            ids, labels, crops = encoder.measure(record)
            np.testing.assert_array_equal(ids, sample.input_ids)
            np.testing.assert_array_equal(labels, sample.labels)
            assert crops == (0 if sample.pixel_values is None else len(sample.pixel_values))
        monkeypatch.setattr(D, "load_frames", V.load_frames)
    assert len(probes) == 1
    # and the loader's per-sample metadata agrees, through truncation
    encoder = D.JsonlEncoder(processor, 490, False, sizes)
    source, measure = D.build_source(records, encoder, 256), D.build_measure(records, encoder, 256)
    for i in range(len(records)):
        assert measure(i) == (None if source(i) is None else D.meta_of(source(i)))


def test_two_processes_build_the_single_process_batch(processor, records):
    """Rows of a global batch with image and video samples, built by two 'processes' from the plan."""
    encoder = D.JsonlEncoder(processor, 490, False)
    shape = (3, 490, 490)

    def loader(index, count):
        collate = lambda s, layout: D.collate(s, 0, 512, shape, layout)  # noqa: E731
        return D.Loader(len(records), D.build_source(records, encoder, 512), 4, 0, collate,
                        D.build_measure(records, encoder, 512), index, count)

    single, blocks = loader(0, 1).next_batch(), [loader(p, 2).next_batch() for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in blocks]), single["input_ids"])
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in blocks]), single["labels"])
    used = sum(int(np.sum(b["input_ids"] == 9)) for b in blocks) // processor.tokens_per_image(490)
    assert used == 1 + 4 + 2  # the image sample, the four frames, the two-image sample


# ---------------------------------------------------------------------------------------------------- bad input


BAD_LINES = [
    (video_line(path="../outside.mp4"), "video path '../outside.mp4' escapes the dataset directory"),
    (video_line(path="/etc/passwd"), "escapes the dataset directory"),
    (video_line(path="videos/missing.mp4"), "video 'videos/missing.mp4' not found"),
    (video_line(num_frames=0), "num_frames 0"),
    (video_line(num_frames="8"), "num_frames '8'"),
    (video_line(num_frames=10**9), "num_frames 1000000000"),
    (video_line().replace('{"type": "video", "text": null}', '{"type": "text", "text": "no item"}'),
     "exactly one {'type': 'video'} item"),
    (video_line().replace('"video": {', '"images": [], "other": {'), "video item(s) but no 'video'"),
    (video_line().replace('"text": "the screen grows brighter"}', '"text": "x"}, {"type": "video"}'),
     "outside user messages"),
    (video_line().replace('"images": null', '"images": ["images/img0.png"]').replace(
        '{"type": "video", "text": null}', '{"type": "video"}, {"type": "image"}'), "not both"),
    (video_line().replace('"video": {"path": "videos/clip.mp4", "num_frames": 4}', '"video": "videos/clip.mp4"'),
     "'video' must be"),
]


@pytest.mark.parametrize("line, needle", BAD_LINES, ids=[n for _, n in BAD_LINES])
def test_bad_video_fields_are_one_line(tmp_path, line, needle):
    root = mixed_dataset(tmp_path / "ds")
    (tmp_path / "outside.mp4").write_bytes(b"")
    with pytest.raises(RecipeError) as info:
        J.parse_line(line, root, "train.jsonl:9")
    message = str(info.value)
    assert message.startswith("train.jsonl:9: ") and needle in message and "\n" not in message, message


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["path", "num_frames", "x"]) | st.text(max_size=6), inner, max_size=3),
                    max_leaves=12)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON, where=st.sampled_from(["video", "path", "num_frames", "item"]))
def test_fuzz_video_field(tmp_path_factory, value, where):
    """Any JSON value in place of the video, its path, its num_frames or its item: parsed or one RecipeError line."""
    root = FUZZ_ROOT.get("root") or FUZZ_ROOT.setdefault(
        "root", mixed_dataset(tmp_path_factory.mktemp("fuzz") / "ds"))
    line = json.loads(video_line())
    if where == "video":
        line["video"] = value
    elif where == "item":
        line["messages"][0]["content"][0] = value
    else:
        line["video"][where] = value
    try:
        record = J.parse_line(json.dumps(line), root, "train.jsonl:1")
    except RecipeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("train.jsonl:1: "), str(exc)
    else:
        assert record.video is not None and 1 <= record.video.num_frames <= J.MAX_FRAMES


FUZZ_ROOT: dict[str, str] = {}


def chat_args(chat_dir, data: str, out, *extra: str) -> list[str]:
    return [f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{data}: 1}}", f"output_dir={out}",
            "max_image_size=490", "max_seq_length=512", "gradient_checkpointing=false", "export=false", *extra]


def fails(capsys, args: list[str], *needles: str) -> str:
    code = train_main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


def test_video_path_escaping_the_dataset_is_refused_by_train_py(tmp_path, capsys, chat_dir):
    (tmp_path / "secret.mp4").write_bytes(b"not yours")
    data = mixed_dataset(tmp_path / "ds", [video_line(path="../secret.mp4")])
    out = tmp_path / "out"
    fails(capsys, chat_args(chat_dir, data, out), "train.jsonl:5", "'../secret.mp4' escapes the dataset directory")
    assert not out.exists()


BROKEN = {"empty.mp4": b"", "text.mp4": b"this is text, not a video\n", "cut.mp4": None}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_video_is_refused_before_step_0(tmp_path, capsys, chat_dir, name):
    data = mixed_dataset(tmp_path / "ds", [video_line(path=f"videos/{name}")])
    payload = BROKEN[name]
    if payload is None:  # an mp4 cut before its index (moov): no header to read
        payload = open(os.path.join(data, "videos", "clip.mp4"), "rb").read()[:200]
    (tmp_path / "ds" / "videos" / name).write_bytes(payload)
    out = tmp_path / "out"
    fails(capsys, chat_args(chat_dir, data, out), "train.jsonl:5", name, "skip_bad_samples")
    assert not out.exists()


def test_video_failing_only_when_decoded_is_dropped_or_refused(processor, records, monkeypatch):
    """A header that reads but frames that do not decode: as an image whose pixels do not decode."""
    def broken(path, indices):
        raise D.VideoError(f"{path}: no video frame could be decoded")

    monkeypatch.setattr(D, "load_frames", broken)
    encoder = D.JsonlEncoder(processor, 490, False)
    said = []
    source = D.build_source(records, encoder, 512, D.BadImages(skip=True, processes=1, log=said.append))
    assert source(3) is None and source(3) is None and len(said) == 1
    assert "train.jsonl:4" in said[0] and "clip.mp4" in said[0]
    with pytest.raises(RecipeError, match=r"train.jsonl:4: .*clip.mp4.*set skip_bad_samples: true"):
        D.build_source(records, encoder, 512)(3)


# ---------------------------------------------------------------------------------------------------- training


def test_train_py_trains_on_text_image_and_video_samples(tmp_path, capsys, chat_dir):
    """Four samples in one batch (text, one image, two images, a 2-frame video) plus a broken video left out."""
    data = mixed_dataset(tmp_path / "ds", [video_line(path="videos/empty.mp4", num_frames=2)])
    with open(os.path.join(data, "train.jsonl")) as f:
        lines = f.read().replace('"num_frames": 4', '"num_frames": 2')
    with open(os.path.join(data, "train.jsonl"), "w") as f:
        f.write(lines)
    (tmp_path / "ds" / "videos" / "empty.mp4").write_bytes(b"")
    out = tmp_path / "out"
    code = train_main(chat_args(chat_dir, data, out, "per_device_train_batch_size=4", "max_steps=1",
                                "skip_bad_samples=true", "save_strategy=no"))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    said = [line for line in captured.out.splitlines() if line.startswith("skip_bad_samples")]
    assert len(said) == 1 and "left out 1 of 5" in said[0] and "empty.mp4" in said[0], said
    assert "video samples: 1; each frame one image at max_image_size 490 (4 tokens), never split" in captured.out
    metrics = read_metrics(out)
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"]) and metrics[0]["skipped_samples"] == 1
    assert stderr_lines(captured.err) == []
