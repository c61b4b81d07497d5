"""Request bodies: a good one becomes a ChatRequest; every bad one is one RequestError naming its field."""

import base64
import io
import json

import pytest
from PIL import Image

from aria_jax.serve.media import MediaPolicy
from aria_jax.serve.protocol import Defaults, RequestError, chunk, completion, parse


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def png_url(size=(20, 10)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_a_good_request():
    req = parse(body(max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=-1, stop="x", stream=True,
                     stream_options={"include_usage": True}), Defaults(), MediaPolicy())
    assert req.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (7, 0.5, 0.9, (1 << 32) - 1, ("x",))
    assert req.stream and req.include_usage and req.images == []


def test_defaults_fill_what_is_left_out():
    req = parse(body(), Defaults(max_tokens=9, temperature=0.0, top_p=0.8, seed=3), MediaPolicy())
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.stream) == (None, 0.0, 0.8, 3, (),
                                                                                            False)


def test_images_come_in_order_with_their_parts():
    content = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": png_url()}},
               {"type": "image_url", "image_url": png_url((5, 5))}]
    req = parse(body(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": content}]),
                Defaults(), MediaPolicy())
    assert [item["type"] for item in req.messages[1]["content"]] == ["text", "image", "image"]
    assert [im.size for im in req.images] == [(20, 10), (5, 5)]


@pytest.mark.parametrize("raw,param,match", [
    (b"{not json", None, "not valid JSON"),
    (b"[1]", None, "JSON object"),
    (json.dumps({"messages": []}).encode(), "model", "model must be a string"),
    (body(messages=[]), "messages", "non-empty list"),
    (body(messages="hi"), "messages", "non-empty list"),
    (body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "one of system"),
    (body(messages=[{"role": "user"}]), "messages[0].content", "string or a non-empty list"),
    (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content[0].type", "text, image_url or video_url"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), "messages[0].content[0].text", "string"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]),
     "messages[0].content[0].image_url", "invalid base64"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     "messages[0].content[0].image_url", "cannot read image"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
     "messages[0].content[0].image_url", "--allow-remote-media"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]),
     "messages[0].content[0].image_url", "--allowed-media-dir"),
    (body(temperature=2.5), "temperature", r"in \[0, 2\]"),
    (body(temperature=float("nan")).replace(b"NaN", b"NaN"), "temperature", "must be a number"),
    (body(temperature="hot"), "temperature", "must be a number"),
    (body(top_p=0), "top_p", r"in \(0, 1\]"),
    (body(max_tokens=0), "max_tokens", ">= 1"),
    (body(max_completion_tokens=1.5), "max_completion_tokens", "integer"),
    (body(seed="x"), "seed", "integer"),
    (body(n=2), "n", "n must be 1"),
    (body(stream="yes"), "stream", "true or false"),
    (body(stop=["a", ""]), "stop", "non-empty string"),
    (body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (body(logprobs=True), "logprobs", "not supported"),
    (body(tools=[{"type": "function"}]), "tools", "not supported"),
])
def test_bad_requests_name_their_field(raw, param, match):
    with pytest.raises(RequestError, match=match) as e:
        parse(raw, Defaults(), MediaPolicy())
    assert e.value.param == param
    assert "\n" not in str(e.value)


def test_local_files_only_under_the_allowed_directory(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "other"
    inside.mkdir(), outside.mkdir()
    for d in (inside, outside):
        Image.new("RGB", (8, 8)).save(d / "a.png")
    policy = MediaPolicy(allowed_dir=str(inside))
    for url in (str(inside / "a.png"), f"file://{inside / 'a.png'}"):
        content = [{"type": "image_url", "image_url": {"url": url}}]
        assert parse(body(messages=[{"role": "user", "content": content}]), Defaults(), policy).images[0].size == (8, 8)
    for url in (str(outside / "a.png"), str(inside / ".." / "other" / "a.png"), str(inside / "missing.png")):
        content = [{"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(RequestError, match="not under|cannot read"):
            parse(body(messages=[{"role": "user", "content": content}]), Defaults(), policy)


def test_video_parts_sample_their_frames_from_allowed_files_and_data_urls(tmp_path):
    pytest.importorskip("av")
    from video_files import frame_number, write_video

    (tmp_path / "media").mkdir()
    path = write_video(tmp_path / "media" / "clip.mp4", frames=20)
    data = "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()
    policy = MediaPolicy(allowed_dir=str(tmp_path / "media"))
    parts = [{"type": "video_url", "video_url": {"url": path}}, {"type": "text", "text": "and"},
             {"type": "video_url", "video_url": {"url": data, "num_frames": 3}}, {"type": "image_url",
                                                                                   "image_url": png_url()}]
    req = parse(body(messages=[{"role": "user", "content": parts}]), Defaults(video_frames=4), policy)
    assert [p["type"] for p in req.messages[0]["content"]] == ["video", "text", "video", "image"]
    assert [len(v.frames) for v in req.videos] == [4, 3] and len(req.images) == 1
    assert [frame_number(f) for f in req.videos[0].frames] == [2, 7, 12, 17]  # segment centres of 20 frames
    assert req.videos[1].path == "video_url" and not list((tmp_path / "media").glob("aria-jax-video-*"))
    with pytest.raises(RequestError, match="remote videos are off") as e:
        parse(body(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": "https://x/a.mp4"}]}]),
              Defaults(), policy)
    assert e.value.param == "messages[0].content[0].video_url"


def test_response_objects_parse_with_the_openai_client_types():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    done = ChatCompletion.model_validate(completion("id", "m", "hello", "stop", 5, 2))
    assert done.choices[0].message.content == "hello" and done.usage.total_tokens == 7
    piece = ChatCompletionChunk.model_validate(chunk("id", "m", {"content": "he"}))
    assert piece.choices[0].delta.content == "he"
