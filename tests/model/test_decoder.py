"""Text decoder parity with transformers: RoPE tables, attention (GQA/MHA, padding), a whole decoder layer."""

import functools

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS

from aria_jax.model.attention import Attention, causal_mask, rope_tables
from aria_jax.model.decoder import DecoderLayer
from aria_jax.model.kv_cache import LayerCache


def layer_params(model, i):
    return jax.tree.map(lambda x: x[i], model.stacked_params()["language_model"]["layers"])


def inputs(model, hf, seed):
    """Hidden states, left-padded mask, cos/sin for both sides, and transformers' additive 4-D mask."""
    rng = np.random.default_rng(seed)
    b, t, d = 2, 13, model.config.text.hidden_size
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    attention_mask = np.ones((b, t), np.int32)
    attention_mask[1, :5] = 0
    positions = np.broadcast_to(np.arange(t), (b, t)).copy()
    mask = np.asarray(causal_mask(attention_mask, b, t, t))
    additive = torch.as_tensor(np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32))
    with torch.no_grad():
        cos_ref, sin_ref = hf.model.language_model.rotary_emb(torch.as_tensor(x), torch.as_tensor(positions))
    cos, sin = rope_tables(positions, model.config.text.head_dim, model.config.text.rope_theta, np.float32)
    return x, mask, additive, (cos, sin), (cos_ref, sin_ref), attention_mask.astype(bool)


@pytest.mark.parametrize("theta", [10000.0, 5e6])
def test_rope_tables_match_transformers(theta):
    from transformers import AriaTextConfig
    from transformers.models.aria.modeling_aria import AriaTextRotaryEmbedding

    cfg = AriaTextConfig(
        hidden_size=2560, num_attention_heads=20, rope_parameters={"rope_type": "default", "rope_theta": theta}
    )
    positions = np.array([[0, 1, 2, 100, 4095, 65535]])
    with torch.no_grad():
        cos_ref, sin_ref = AriaTextRotaryEmbedding(cfg)(torch.zeros(1), torch.as_tensor(positions))
    cos, sin = rope_tables(positions, 128, theta, np.float32)
    # torch's float32 pow and XLA's differ by one ulp on one of the 64 frequencies at theta 5e6. At position
    # 4095 and 65535 that moves an angle by up to ~1e-5 rad (the float32 angle's own ulp there is 4e-3): 1e-4 there.
    near, far = slice(0, 4), slice(4, 6)
    for ours, ref in ((cos, cos_ref), (sin, sin_ref)):
        np.testing.assert_allclose(np.asarray(ours)[:, near], ref.numpy()[:, near], atol=2e-6)
        np.testing.assert_allclose(np.asarray(ours)[:, far], ref.numpy()[:, far], atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_matches_transformers(name, hf_model, aria_model):
    model, hf = aria_model(name), hf_model(name)
    x, mask, additive, (cos, sin), rope_ref, valid = inputs(model, hf, 15)
    with torch.no_grad():
        ref = hf.model.language_model.layers[0].self_attn(torch.as_tensor(x), rope_ref, additive)[0].numpy()
    params = layer_params(model, 0)["self_attn"]
    out, _ = Attention(model.config.text).apply({"params": params}, x, cos, sin, mask)
    assert rel_err(np.asarray(out)[valid], ref[valid]) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_layer_matches_transformers(name, hf_model, aria_model):
    model, hf = aria_model(name), hf_model(name)
    x, mask, additive, (cos, sin), rope_ref, valid = inputs(model, hf, 16)
    last = model.config.text.num_hidden_layers - 1
    with torch.no_grad():
        ref = hf.model.language_model.layers[last](
            torch.as_tensor(x), attention_mask=additive, position_embeddings=rope_ref
        ).numpy()
    out, _ = DecoderLayer(model.config.text).apply({"params": layer_params(model, last)}, x, cos, sin, mask)
    assert rel_err(np.asarray(out)[valid], ref[valid]) <= 1e-5


def _kl(p_logits, q_logits) -> np.ndarray:
    p, q = (jax.nn.log_softmax(np.asarray(x, np.float64), axis=-1) for x in (p_logits, q_logits))
    return np.asarray((np.exp(p) * (p - q)).sum(-1))


@pytest.mark.parametrize("layout", ["unrolled", "stacked"])
def test_int8_kv_cache_stays_close_to_the_float_cache(layout, aria_model):
    """Teacher-forced decode through an int8 and a float cache: the same tokens, next-token KL per step."""
    from aria_jax.inference.api import Aria
    from aria_jax.model.kv_cache import init_cache

    base = aria_model("gqa")
    model = Aria(base.config, base.params, "float32", layout=layout)
    cfg, module = model.config.text, model.module
    per_layer = layout == "unrolled"
    rng = np.random.default_rng(21)
    ids = rng.integers(10, cfg.vocab_size, (2, 24))
    prompt, slots = 8, 32
    mask = np.zeros((2, slots), np.int32)
    # one compiled program per shape (prompt, step) instead of op-by-op dispatch of every step
    apply = jax.jit(functools.partial(module.apply, last_only=True))
    logits = {}
    for int8 in (False, True):
        cache = init_cache(cfg, 2, slots, np.float32, per_layer, kv_int8=int8)
        if int8:
            leaves = cache[0] if per_layer else cache
            assert leaves.k.dtype == np.int8 and leaves.v_scale.dtype == np.float32
        steps = []
        for start, stop in [(0, prompt)] + [(i, i + 1) for i in range(prompt, ids.shape[1])]:
            mask[:, start:stop] = 1
            output = apply({"params": model.params}, ids[:, start:stop], mask,
                           positions=np.arange(start, stop)[None].repeat(2, 0), cache=cache, index=np.int32(start))
            cache = output.cache
            steps.append(np.asarray(output.logits[:, 0]))
        mask[:] = 0
        logits[int8] = np.stack(steps)
    kl = _kl(logits[False], logits[True])
    err = rel_err(logits[True], logits[False])
    print(f"int8 KV {layout}: rel err {err:.3g}, KL mean {kl.mean():.3g} max {kl.max():.3g}, top-1 "
          f"{(logits[True].argmax(-1) == logits[False].argmax(-1)).mean():.3f}")
    assert 0 < err < 0.2, err  # quantised for real, and close
    assert kl.mean() < 1e-3 and kl.max() < 1e-2, (kl.mean(), kl.max())
    assert (logits[True].argmax(-1) == logits[False].argmax(-1)).mean() >= 0.9


def test_int8_kv_cache_through_generate(aria_model):
    model = aria_model("gqa")
    ids = np.random.default_rng(22).integers(10, model.config.text.vocab_size, (2, 9))
    out = model.generate(ids, max_new_tokens=6, kv_cache="int8")
    assert out.shape == (2, 6)
    with pytest.raises(ValueError, match="kv_cache must be 'float' or 'int8', got 'fp8'"):
        model.generate(ids, max_new_tokens=6, kv_cache="fp8")


def test_attention_without_cache_equals_attention_over_a_cache():
    """The no-cache attention (batch-leading layouts, training and plain forward) against the cached one (decode
    layouts) over the same keys: GQA with 2 query heads per kv head, left padding, float32."""
    from aria_jax.model.attention import _attend, _attend_cached

    rng = np.random.default_rng(0)
    b, t, nh, nkv, hd = 2, 7, 4, 2, 8
    q, k, v = (jax.numpy.asarray(rng.standard_normal((b, t, n, hd)), jax.numpy.float32) for n in (nh, nkv, nkv))
    mask = causal_mask(jax.numpy.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * t]), b, t, t)
    cache = LayerCache(jax.numpy.zeros((b, nkv, t, hd)), jax.numpy.zeros((b, nkv, hd, t)))
    cached, _ = _attend_cached(q, k, v, mask, cache, 0)
    out = np.asarray(_attend(q, k, v, mask))
    assert out.shape == (b, t, nh, hd)
    # every query that reads a valid key; the two left-pad queries of row 0 read none (garbage in both forms: a mean
    # of the values over all keys, where the cached form also counts the cache's slots)
    valid = np.asarray(mask[:, 0].any(axis=-1))
    assert valid.sum() == b * t - 2
    assert rel_err(out[valid], np.asarray(cached)[valid]) < 1e-6
