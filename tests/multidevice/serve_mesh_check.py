"""8 CPU devices: the server's engine over a model on a mesh (``aria-jax serve --mesh``) replies what ``Aria.chat``
replies on one device, for requests that run alone (the one-row pool) and together (the pool)."""

import os
import sys
import tempfile
import threading

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository

import jax  # noqa: E402

from aria_jax import Aria  # noqa: E402
from aria_jax.cli.demo import build_random_checkpoint  # noqa: E402
from aria_jax.serve.engine import Engine, Request  # noqa: E402

assert jax.device_count() == 8
directory = build_random_checkpoint(tempfile.mkdtemp())
single = Aria.from_pretrained(directory, dtype="float32", layout="stacked")
PROMPTS = ["the quick brown fox", "hi", "what is in this picture? a cat on a sofa", "the lazy dog"]


def messages(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def collector(pieces: list, finished: threading.Event):
    """A request's sink: its text pieces into ``pieces``; ``finished`` set when it ends."""
    return lambda kind, value: pieces.append(value) if kind == "token" else finished.set()


expected = [single.chat(messages(text), max_new_tokens=6 + i) for i, text in enumerate(PROMPTS)]

for spec in ("data=2,expert=4", "expert=4,tensor=2"):
    model = Aria.from_pretrained(directory, dtype="float32", mesh=spec)
    engine = Engine(model, max_batch=4, max_seq_len=96)
    engine.warm_up()
    engine.start()
    try:
        for together in (False, True):
            replies, done = [[] for _ in PROMPTS], [threading.Event() for _ in PROMPTS]
            requests = []
            for i, text in enumerate(PROMPTS):
                batch = model.processor.chat_inputs(messages(text))
                requests.append(engine.submit(Request(batch["input_ids"], batch["attention_mask"], None, None, 6 + i,
                                                      sink=collector(replies[i], done[i]))))
                if not together:
                    assert done[i].wait(300)
            assert all(d.wait(300) for d in done)
            got = [r.generated.text() for r in requests]
            assert got == expected, (spec, together, got, expected)
            assert ["".join(r) for r in replies] == expected
        print(spec, "alone and together:", dict(engine.pool.traces), flush=True)
    finally:
        engine.stop()
print("OK")
