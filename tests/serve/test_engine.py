"""The engine alone: rows that join and leave between steps get what ``Aria.chat`` gives each request alone (greedy
and sampled), programs compile once per prompt bucket and once for the step, cancelled requests free their row."""

import threading

import numpy as np
import pytest
from serve_fixtures import started_engine, wait_for

from aria_jax.inference.generation import bucket
from aria_jax.serve.engine import Engine, QueueFull, Request

PROMPTS = ["the quick brown fox", "hi", "what is in this picture? a cat on a sofa",
           "user assistant: answer the question about the photo. the quick brown fox jumps over the lazy dog."]


def messages(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def submit(engine, model, text, max_tokens, **sampling):
    batch = model.processor.chat_inputs(messages(text))
    done, pieces = threading.Event(), []

    def sink(kind, value):
        if kind == "token":
            pieces.append(value)
        else:
            pieces.append((kind, value))
            done.set()

    request = engine.submit(Request(batch["input_ids"], batch["attention_mask"], None, None, max_tokens, sink=sink,
                                    **sampling))
    return request, done, pieces


def text_of(pieces):
    assert not [p for p in pieces if isinstance(p, tuple) and p[0] != "done"], pieces
    return "".join(p for p in pieces if isinstance(p, str))


def test_rows_joining_and_leaving_match_chat_alone_and_compile_once_per_bucket(tiny_model, reference):
    with started_engine(tiny_model, max_batch=3, max_seq_len=96, prefill_batch=1) as engine:
        assert dict(engine.pool.traces) == {"admit": 1, "step": 2, "move": 2}  # the warm-up: bucket 16, the steps (one row, pool), moves
        jobs = [(text, 3 + 4 * i, dict(temperature=0.9 if i % 2 else 0.0, top_p=0.8, seed=i))
                for i, text in enumerate(PROMPTS)]
        runs = [(submit(engine, tiny_model, text, n, **s), text, n, s) for text, n, s in jobs]  # 4 requests, 3 rows
        for (request, done, pieces), text, n, s in runs:
            assert done.wait(120)
            alone, tokens = reference(messages(text), None, n, **s)
            assert request.generated.tokens == tokens
            assert text_of(pieces) == alone
        buckets = {bucket(tiny_model.processor.chat_inputs(messages(t))["input_ids"].shape[1]) for t in PROMPTS}
        assert dict(engine.pool.traces) == {"admit": len(buckets | {16}), "step": 2, "move": 2}
        # more requests of those lengths, other sampling and lengths: nothing new compiles
        again = [submit(engine, tiny_model, text, 2 + i, temperature=0.3 * i, top_p=1.0 - 0.1 * i, seed=99)
                 for i, text in enumerate(PROMPTS)]
        assert all(done.wait(120) for _, done, _ in again)
        assert dict(engine.pool.traces) == {"admit": len(buckets | {16}), "step": 2, "move": 2}
        assert engine.free_rows == 3 and engine.queue_length == 0


def test_waiting_text_prompts_prefill_together_and_reply_as_alone(tiny_model, reference):
    engine = Engine(tiny_model, max_batch=4, max_seq_len=96)
    engine.warm_up()  # one row, bucket 16
    runs = [(submit(engine, tiny_model, text, 6, temperature=0.7 * (i % 2), seed=i), text, i)
            for i, text in enumerate(PROMPTS)]  # four prompts of three buckets, waiting before the engine runs
    engine.start()
    try:
        for (request, done, pieces), text, i in runs:
            assert done.wait(120)
            alone, tokens = reference(messages(text), None, 6, temperature=0.7 * (i % 2), seed=i)
            assert request.generated.tokens == tokens
            assert text_of(pieces) == alone
        assert dict(engine.pool.traces) == {"admit": 2, "step": 2, "move": 2}  # all four in one prefill of the longest bucket
        assert engine.metrics.steps <= 5 + 2  # the four rows decode together: ~5 steps for 5 more tokens, not 4 x 5
    finally:
        engine.stop()


def test_a_cancelled_request_frees_its_row_and_a_full_queue_refuses(tiny_model):
    # a long first request, one token per step: it runs far longer than the polls below
    with started_engine(tiny_model, max_batch=1, max_seq_len=512, max_queue=1, decode_steps=1) as engine:
        first, _, pieces = submit(engine, tiny_model, PROMPTS[0], 400)
        assert wait_for(lambda: len(first.generated.tokens) > 0)
        second, second_done, _ = submit(engine, tiny_model, PROMPTS[1], 2)  # waits for the row
        with pytest.raises(QueueFull):
            submit(engine, tiny_model, PROMPTS[2], 2)
        first.cancel()
        assert second_done.wait(60)  # the row went to the waiting request
        assert len(first.generated.tokens) < 400
        assert wait_for(lambda: engine.free_rows == 1)
        assert engine.metrics.outcomes["cancelled"] == 1 and engine.metrics.outcomes["done"] == 1


def test_max_tokens_must_fit_the_row(tiny_model):
    engine = Engine(tiny_model, max_batch=1, max_seq_len=64)  # not started: nothing compiles
    ids = np.ones((1, 20), np.int32)
    assert engine.room(20) == 64 - bucket(20)
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Request(ids, ids, None, None, engine.room(20) + 1))
    assert engine.queue_length == 0 and not engine.pool.traces
