"""Generation against transformers' generate: greedy token-for-token, cache vs recomputation, sampling, stops."""

import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS, image_batch, text_batch

from aria_jax.inference.generation import StopRule, bucket, generated_length, stop_string_checker
from aria_jax.runtime import CPU_DECODE_OPTIONS


def hf_generate(model, max_new_tokens, **batch):
    inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].numpy()


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_greedy_with_images_equals_transformers(name, hf_model, aria_model):
    batch = image_batch(name, np.random.default_rng(20))  # two prompts of different lengths, left-padded
    ref = hf_generate(hf_model(name), 12, **batch)
    out = aria_model(name).generate(**batch, max_new_tokens=12)
    np.testing.assert_array_equal(out, ref)


def test_greedy_text_batch_with_eos_equals_transformers(hf_model, aria_model):
    ids, mask = text_batch(CONFIGS["top1"]["text_config"]["vocab_size"], np.random.default_rng(21), lengths=(9, 4, 6))
    model = aria_model("top1")
    first = model.generate(ids, mask, max_new_tokens=10)
    # Make a token some row really produces (first occurring at step j >= 1) the eos: that row must stop there.
    r, j = next((r, j) for j in range(1, 10) for r in range(3) if first[r, j] not in first[r, :j])
    eos = int(first[r, j])
    with torch.no_grad():
        ref = hf_model("top1").generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=10,
                                        do_sample=False, eos_token_id=eos, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    model.generation_config = {"pad_token_id": 0}
    out = model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos)
    model.generation_config = {}
    np.testing.assert_array_equal(out, ref)
    assert out[r, j] == eos and (out[r, j + 1 :] == 0).all()


def test_min_new_tokens_suppresses_eos_like_transformers(hf_model, aria_model):
    ids, mask = text_batch(CONFIGS["gqa"]["text_config"]["vocab_size"], np.random.default_rng(22), lengths=(5,))
    model = aria_model("gqa")
    eos = int(model.generate(ids, mask, max_new_tokens=4)[0, 1])
    with torch.no_grad():
        ref = hf_model("gqa").generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=8,
                                       min_new_tokens=5, do_sample=False, eos_token_id=eos)
    out = model.generate(ids, mask, max_new_tokens=8, min_new_tokens=5, eos_token_id=eos)
    np.testing.assert_array_equal(out, ref[:, ids.shape[1]:].numpy())
    assert out.shape[1] >= 5 and eos not in out[0, :4]


def test_cached_decoding_equals_full_recomputation(aria_model):
    batch = image_batch("gqa", np.random.default_rng(23))
    model = aria_model("gqa")
    new = model.generate(**batch, max_new_tokens=10)
    full_ids = np.concatenate([batch["input_ids"], new], axis=1)
    full_mask = np.concatenate([batch["attention_mask"], np.ones_like(new)], axis=1)
    logits = np.asarray(model.forward(full_ids, full_mask, batch["pixel_values"], batch["pixel_mask"]))
    t = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(logits[:, t - 1 : -1].argmax(-1), new)


def test_sampling_is_reproducible_and_seeded(aria_model):
    ids, mask = text_batch(CONFIGS["gqa"]["text_config"]["vocab_size"], np.random.default_rng(24), lengths=(6, 3))
    model = aria_model("gqa")
    opts = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, mask, seed=1, **opts)
    np.testing.assert_array_equal(a, model.generate(ids, mask, seed=1, **opts))
    assert (a != model.generate(ids, mask, seed=2, **opts)).any()
    greedy = model.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(model.generate(ids, mask, seed=3, **{**opts, "top_k": 1}), greedy)


def test_top_p_and_top_k_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from aria_jax.inference.sampling import SamplingConfig, filter_logits

    logits = np.random.default_rng(25).standard_normal((4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(1.0, 0, 0.8), (0.7, 10, 1.0), (1.3, 7, 0.5), (1.0, 0, 0.05)]:
        ref = torch.as_tensor(logits)
        ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = np.asarray(filter_logits(logits, SamplingConfig(True, temperature, top_k, top_p)))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
        finite = ~np.isinf(ours)
        assert rel_err(ours[finite], ref.numpy()[finite]) <= 1e-6


def test_prompt_lengths_in_one_bucket_compile_once(aria_model):
    model = aria_model("top1")
    vocab = CONFIGS["top1"]["text_config"]["vocab_size"]
    compiled = []
    for n in (11, 13, 16, 17):
        ids, mask = text_batch(vocab, np.random.default_rng(n), lengths=(n, 2, 5, 1, 7))
        model.generate(ids, mask, max_new_tokens=5)
        compiled.append(model._decoder._prefill._cache_size())
    assert compiled[1:3] == compiled[:1] * 2 and compiled[3] == compiled[0] + 1  # 11, 13, 16 share; 17 does not
    assert bucket(11) == bucket(16) == 16 and bucket(17) == 20


def test_decode_loop_runs_eigen_dots_on_cpu(aria_model):
    """The decode loop is compiled without YNNPACK dot fusions on CPU (few-row matmuls run faster as Eigen dots);
    the prefill keeps them."""
    model = aria_model("top1")
    assert model.runtime.decode_options == CPU_DECODE_OPTIONS
    ids, mask = text_batch(CONFIGS["top1"]["text_config"]["vocab_size"], np.random.default_rng(0), lengths=(5, 3))
    decoder, captured = model._decoder, {}
    prefill, loop = decoder._prefill, decoder._loop

    def spy(name, fn):
        def call(*args, **kwargs):
            captured[name] = fn.lower(*args, **kwargs).compile().as_text()
            return fn(*args, **kwargs)
        return call

    decoder._prefill, decoder._loop = spy("prefill", prefill), spy("loop", loop)
    try:
        model.generate(ids, mask, max_new_tokens=3)
    finally:
        decoder._prefill, decoder._loop = prefill, loop
    assert "ynn_fusion" in captured["prefill"] and "ynn_fusion" not in captured["loop"]


def test_buckets_pad_at_most_a_quarter():
    sizes = [bucket(n) for n in range(1, 5000)]
    assert all(n <= b <= max(16, 1.25 * n) for n, b in zip(range(1, 5000), sizes, strict=True))
    assert len({b for b in sizes if 1024 < b <= 2048}) == 4  # four compiled lengths per octave


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=10_000), r"prompt \(4 tokens\) \+ max_new_tokens \(10000\) exceeds the context length 2048"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(min_new_tokens=9, max_new_tokens=4), r"min_new_tokens must be in 0..max_new_tokens \(4\), got 9"),
        (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number > 0, got nan"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), "top_k must be an integer >= 0, got -1"),
        (dict(stop_strings=["x"]), "stop_strings need a tokenizer"),
    ],
)
def test_bad_generation_arguments_are_value_errors(options, message, aria_model):
    with pytest.raises(ValueError, match=message):
        aria_model("gqa").generate(np.array([[20, 21, 22, 23]]), **options)


def test_stop_string_checker_finds_strings_across_token_boundaries():
    vocab = {1: "Hel", 2: "lo <|im", 3: "_end|>", 4: " more", 5: "x"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    check = stop_string_checker(decode, ["<|im_end|>"])
    assert not check(np.array([1, 2]))
    assert check(np.array([1, 2, 3]))  # the stop string ends inside the newest token
    assert not check(np.array([5, 5, 4]))
    assert generated_length(np.array([5, 2, 7, 2]), StopRule((2,), 0, 4)) == 2
