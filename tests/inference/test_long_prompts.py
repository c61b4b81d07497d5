"""Long prompts (issue 24): chunked prefill from the host through one compiled chunk program, equal to one prefill
and to transformers; compiled programs bounded across token budgets and growing prompts."""

import numpy as np
import torch
from hf_models import CONFIGS, image_batch, text_batch

from aria_jax.inference.generation import Decoder, StopRule, cache_slots, new_tokens_bucket
from aria_jax.inference.sampling import SamplingConfig


def hf_generate(model, max_new_tokens, **batch):
    inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].numpy()


def test_chunked_prefill_with_images_equals_one_prefill_and_transformers(hf_model, aria_model):
    name = "gqa"
    batch = image_batch(name, np.random.default_rng(30))  # image tokens straddle the 8-token chunks
    model = aria_model(name)
    rule = model._stop_rule(10, 0, None, batch["input_ids"].shape[1])  # the checkpoint's eos, as transformers
    args = (model.params, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["pixel_mask"],
            SamplingConfig(), rule)
    whole, whole_stats = Decoder(model.module).run(*args)
    chunked, stats = Decoder(model.module, prefill_chunk=4).run(*args)
    assert whole_stats.prefill_chunks == 0 and stats.prefill_chunks >= 3
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(chunked, hf_generate(hf_model(name), 10, **batch))


def test_chunked_text_prefill_equals_transformers_with_padding(hf_model, aria_model):
    ids, mask = text_batch(CONFIGS["top1"]["text_config"]["vocab_size"], np.random.default_rng(31),
                           lengths=(45, 20, 33))
    model = aria_model("top1")
    out, stats = Decoder(model.module, prefill_chunk=16).run(
        model.params, ids, mask, None, None, SamplingConfig(), model._stop_rule(8, 0, None, ids.shape[1]))
    assert stats.prefill_chunks == 3
    np.testing.assert_array_equal(out, hf_generate(hf_model("top1"), 8, input_ids=ids, attention_mask=mask))


def test_token_budgets_share_one_compilation(aria_model):
    """max_new_tokens 1 and 32 (and 20) on the same prompt: the second and third calls compile nothing."""
    model = aria_model("gqa")
    ids, mask = text_batch(CONFIGS["gqa"]["text_config"]["vocab_size"], np.random.default_rng(32), lengths=(9, 5))
    decoder = Decoder(model.module)
    compiled = []
    for max_new in (32, 1, 20):
        out, stats = decoder.run(model.params, ids, mask, None, None, SamplingConfig(),
                                 StopRule(eos_ids=(), pad_id=0, max_new=max_new))
        assert out.shape == (2, max_new)
        compiled.append(stats.compiles)
    assert compiled[0] >= 2 and compiled[1:] == [0, 0]
    assert new_tokens_bucket(1) == new_tokens_bucket(32) == 32 and new_tokens_bucket(33) == 64


def test_growing_prompt_reuses_the_chunk_and_decode_programs(aria_model):
    """A chat whose prompt grows turn by turn: chunked prompts of 7, 8 and 8 chunks share one cache length, so only
    the first compiles; a prompt past the cache's bucket compiles the chunk, start and decode programs again."""
    model = aria_model("gqa")
    vocab = CONFIGS["gqa"]["text_config"]["vocab_size"]
    decoder = Decoder(model.module, prefill_chunk=16)
    rng = np.random.default_rng(33)
    turns = rng.integers(10, vocab, (1, 200))
    compiled, chunks = [], []
    for length in (100, 120, 125, 140):
        ids = turns[:, :length]
        out, stats = decoder.run(model.params, ids, np.ones_like(ids), None, None, SamplingConfig(),
                                 StopRule(eos_ids=(), pad_id=0, max_new=6))
        compiled.append(stats.compiles)
        chunks.append(stats.prefill_chunks)
    assert chunks == [7, 8, 8, 9]
    assert cache_slots(112, 6) == cache_slots(128, 6) == 160 < cache_slots(144, 6)
    assert compiled[0] >= 3 and compiled[1:3] == [0, 0] and 1 <= compiled[3] <= compiled[0]


def test_decode_loop_updates_the_cache_in_place():
    """The compiled decode loop writes each layer's new key and value into the cache in place: no copy of a
    layer's cache anywhere (XLA:CPU copied every layer's keys and values twice per step when the write and the
    attention's reads of the cache were not ordered by a data dependency: model/attention.py)."""
    import re

    import jax

    from aria_jax import Aria, AriaConfig
    from aria_jax.runtime import Runtime

    for layout in ("unrolled", "per_layer"):  # (stacked: the layer scan's cache out is a new array; not yet)
        model = Aria.from_config(AriaConfig.preset("tiny"), seed=0, dtype="float32",
                                 runtime=Runtime("cpu", experts="dense", layout=layout))
        decoder, rule = Decoder(model.module), StopRule(eos_ids=(), pad_id=0, max_new=8).compiled_rule()
        ids = np.arange(3, 23, dtype=np.int32)[None]
        state = decoder._prefill(model.params, ids, np.ones_like(ids), None, None, jax.random.key(0),
                                 cache_len=512, sampling=SamplingConfig(), rule=rule)
        text = decoder._loop.lower(model.params, state, sampling=SamplingConfig(), rule=rule).compile().as_text()
        cache_shapes = {",".join(map(str, x.shape[-3:])) for x in jax.tree.leaves(state.cache)}
        copies = [line for line in text.splitlines() if re.search(r"= f32\[[0-9,]*\]\S* copy\(", line)
                  and any(line.split("=")[1].split("]")[0].endswith(shape) for shape in cache_shapes)]
        assert len(cache_shapes) == 2 and not copies, (layout, copies[:2])
