"""The tiny random Aria with a tokenizer (the offline demo's checkpoint: no torch, no network), an engine over it,
and a server on 127.0.0.1 in a thread (aria_jax.serve.background).

A pytest plugin of tests/conftest.py (``pytest_plugins``), not a tests/serve/conftest.py: a second module named
``conftest`` replaces tests/conftest.py in ``sys.modules`` for every module collected after that directory (their
``from conftest import rel_err`` then fails). The test modules import the helpers (``started_engine``,
``wait_for``, ``running_server``) from here."""

import contextlib
import time

import pytest

from aria_jax import Aria
from aria_jax.cli.demo import build_random_checkpoint
from aria_jax.serve.background import serving as running_server  # noqa: F401 (the tests' import)
from aria_jax.serve.engine import Engine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_random_checkpoint(str(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return Aria.from_pretrained(tiny_dir, dtype="float32")


def wait_for(condition, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@contextlib.contextmanager
def started_engine(model, **kwargs):
    engine = Engine(model, **kwargs)
    engine.warm_up()
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


REFERENCE_TOKENS = 40  # one compiled Aria.generate per sampling setting; shorter replies are its prefixes


@pytest.fixture(scope="session")
def reference(tiny_model):
    """``(messages, images, max_tokens, **sampling) -> (text, tokens)``: what ``Aria.chat`` replies to the request
    alone: the first ``max_tokens`` tokens of one ``REFERENCE_TOKENS`` run (greedy and sampled decoding pick each
    token from the ones before it alone, so a shorter run is its prefix), cut at the end of turn as chat cuts."""
    import numpy as np

    from aria_jax.inference.generation import generated_length

    cache = {}

    def run(messages, images=None, max_tokens=8, temperature=0.0, top_p=1.0, seed=0):
        assert max_tokens <= REFERENCE_TOKENS
        key = (repr(messages), id(images), temperature, top_p, seed)
        if key not in cache:
            batch = tiny_model.processor.chat_inputs(messages, images)
            sampled = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature else {}
            cache[key] = tiny_model.generate(
                batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("pixel_mask"),
                max_new_tokens=REFERENCE_TOKENS, stop_strings=["<|im_end|>"], seed=seed, **sampled)[0]
        tokens = np.asarray(cache[key][:max_tokens])
        n = generated_length(tokens, tiny_model._stop_rule(REFERENCE_TOKENS, 0, None, 0))
        ended = tiny_model._reply_text(tokens[:n])
        return ended, [int(t) for t in tokens[:n]]

    return run
