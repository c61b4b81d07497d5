"""Text decoder parity with transformers: RoPE tables, attention (GQA/MHA, padding), a whole decoder layer."""

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS

from aria_jax.text import Attention, DecoderLayer, causal_mask, rope_tables


def layer_params(model, i):
    return jax.tree.map(lambda x: x[i], model.params["language_model"]["layers"])


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
