"""The server over HTTP with the real ``openai`` client (one server for the module, on 127.0.0.1): replies equal
``Aria.chat`` alone, streamed or not, with images, for 8 clients at once; bad requests get 400 and the server goes
on; a full queue gets 429; a client that goes away frees its row."""

import base64
import io
import json
import threading
import urllib.request

import openai
import pytest
from serve_fixtures import running_server, started_engine, wait_for

from aria_jax.cli.demo import demo_image
from aria_jax.serve.app import ServerConfig, create_app

pytest.importorskip("fastapi")

PROMPTS = ["the quick brown fox", "describe the image in detail.", "hi", "what is in this picture? a cat on a sofa",
           "the lazy dog", "answer the question about the photo.", "a cup of coffee", "user assistant"]


@pytest.fixture(scope="module")
def server(tiny_model):
    with started_engine(tiny_model, max_batch=8, max_seq_len=128, max_queue=16) as engine:
        with running_server(create_app(engine, ServerConfig(model_id="tiny"))) as url:
            yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def user(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def ours(messages):
    """The same conversation in aria_jax's chat format."""
    return [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            for m in messages]


def metric(url, name) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("aria_jax_" + name + " ")))


def test_greedy_reply_and_stream_equal_chat(server, reference):
    engine, url, client = server
    messages = [{"role": "system", "content": "be brief"}, *user("the quick brown fox")]
    alone, tokens = reference(ours([{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                                    *user("the quick brown fox")]), None, 12)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert reply.choices[0].message.content == alone
    assert reply.usage.completion_tokens == len(tokens) and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in (("length", "stop") if len(tokens) == 12 else ("stop",))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=12,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_an_image_message(server, reference):
    engine, url, client = server
    png = io.BytesIO()
    image = demo_image(96)
    image.save(png, "PNG")
    messages = user("describe the image", "data:image/png;base64," + base64.b64encode(png.getvalue()).decode())
    alone, _ = reference(ours(messages), [image], 8)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert reply.choices[0].message.content == alone
    assert reply.usage.prompt_tokens > 8  # the image's tokens


def test_a_video_message(server, tiny_model, tmp_path):
    pytest.importorskip("av")
    from video_files import write_video

    engine, url, client = server
    path = write_video(tmp_path / "clip.mp4", frames=12)
    data = "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data, "num_frames": 2}},
                                             {"type": "text", "text": "what happens?"}]}]
    alone = tiny_model.chat([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}],
                            videos=[path], num_frames=2, max_new_tokens=6)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == alone
    frame_tokens = tiny_model.processor.chat_inputs(messages=[{"role": "user", "content": [{"type": "video"}]}],
                                                    videos=[path], num_frames=2)["input_ids"].shape[1]
    assert reply.usage.prompt_tokens > frame_tokens  # both frames' tokens, the text's too
    for part, code in (({"url": "data:video/mp4;base64,AAAA"}, "invalid_video"),
                       ({"url": str(path)}, "invalid_video"),  # no --allowed-media-dir
                       ({"url": data, "num_frames": 0}, "invalid_value")):
        bad = [{"role": "user", "content": [{"type": "video_url", "video_url": part}]}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=bad, max_tokens=2)
        assert e.value.body["code"] == code and e.value.body["param"].startswith("messages[0].content[0].video_url")


def test_eight_concurrent_clients_each_get_their_reply_alone(server, reference):
    engine, url, client = server
    lengths = [5 + 3 * i for i in range(8)]
    expected = [reference(user(p), None, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    steps = metric(url, "decode_steps_total")
    got = [None] * 8

    def ask(i):
        stream = i % 2 == 1
        out = client.chat.completions.create(model="tiny", messages=user(PROMPTS[i]), max_tokens=lengths[i],
                                             stream=stream)
        got[i] = "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [text for text, _ in expected]
    generated = sum(len(tokens) for _, tokens in expected)
    assert metric(url, "decode_steps_total") - steps < generated - 8  # rows decoded together, not one by one


def test_bad_requests_get_400_and_the_server_goes_on(server):
    engine, url, client = server
    for bad, param in ((dict(messages=[]), "messages"), (dict(messages=user("hi"), temperature=7), "temperature"),
                       (dict(messages=user("the quick brown fox " * 40)), "messages"),
                       (dict(messages=user("hi"), max_tokens=500), "max_tokens"),
                       (dict(messages=user("hi", "data:image/png;base64,AAAA")), "messages[0].content[0].image_url")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", **bad)
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    request = urllib.request.Request(url + "/v1/chat/completions", data=b"{oops", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["code"] == "invalid_json"
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3).choices[0].message


def test_models_health_and_metrics(server):
    engine, url, client = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert json.loads(urllib.request.urlopen(url + "/health").read()) == {"status": "ok"}
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    for name in ("tokens_per_second", "queue_length", "running_sequences", "time_to_first_token_seconds_count",
                 "generated_tokens_total", "compiled_programs"):
        assert f"\naria_jax_{name} " in text, name


def test_a_disconnect_frees_its_row(server):
    engine, url, client = server
    cancelled = metric(url, 'requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(model="tiny", messages=user("the lazy dog"), max_tokens=100, stream=True,
                                            temperature=1.0, seed=1, stop=["\x00never"])
    next(iter(stream))
    assert wait_for(lambda: engine.running == 1, 10)
    stream.close()
    assert wait_for(lambda: engine.running == 0 and engine.free_rows == 8, 20)
    assert metric(url, 'requests_total{outcome="cancelled"}') == cancelled + 1


def test_a_full_queue_gets_429(tiny_model):
    with started_engine(tiny_model, max_batch=1, max_seq_len=128, max_queue=0, decode_steps=1) as engine:
        with running_server(create_app(engine, ServerConfig(model_id="tiny"))) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
            stream = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=100, stream=True)
            next(iter(stream))  # the role chunk: sent before the prefill
            assert wait_for(lambda: engine.running == 1, 30)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            stream.close()
            assert wait_for(lambda: engine.free_rows == 1, 20)
            assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2).choices
