"""Runtime.attention through the model: the text attention, the vision tower, the projector and a whole tiny Aria
give the same values and gradients with ``jax.nn.dot_product_attention`` (``xla``) as with the einsum path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from aria_jax import Aria, AriaConfig
from aria_jax.model.attention import Attention, causal_mask, rope_tables
from aria_jax.model.kv_cache import init_cache
from aria_jax.model.projector import Projector
from aria_jax.model.vision import VisionTower
from aria_jax.runtime import Runtime

TINY = AriaConfig.preset("tiny")


def assert_trees_close(ours, theirs, tol: float = 1e-5):
    """Leaf by leaf within ``tol`` of the leaf's largest value, or of 1e-2 of the tree's: gradients that are zero in
    exact arithmetic (a key bias: softmax ignores a shift shared by every key) are rounding noise in both."""
    leaves = list(zip(jax.tree.leaves_with_path(ours), jax.tree.leaves(theirs), strict=True))
    assert leaves
    scale = max(float(np.abs(np.asarray(b)).max()) for _, b in leaves)
    for (path, a), b in leaves:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.isfinite(a).all(), jax.tree_util.keystr(path)
        floor = max(np.abs(b).max(), 1e-2 * scale)
        assert np.abs(a - b).max() <= tol * floor, (jax.tree_util.keystr(path), np.abs(a - b).max() / floor)


def same_values_and_grads(module_of, params, args, loss_of):
    """``module_of(impl).apply`` with ``xla`` equals ``einsum``: the output and d(loss)/d(params, first arg)."""
    results = {}
    for impl in ("einsum", "xla"):
        def loss(p, x, impl=impl):
            out = module_of(impl).apply({"params": p}, x, *args[1:])
            return loss_of(out), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, args[0])
        results[impl] = (out, grads)
    (out_x, grads_x), (out_e, grads_e) = results["xla"], results["einsum"]
    for a, b in zip(jax.tree.leaves(out_x), jax.tree.leaves(out_e), strict=True):
        assert rel_err(a, b) <= 1e-5
    assert_trees_close(grads_x, grads_e)


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (the tiny preset) and MHA (Aria's own)
def test_text_attention_causal_left_padded(kv_heads):
    cfg = dataclasses.replace(TINY.text, num_key_value_heads=kv_heads)
    b, t = 2, 11
    x = jax.random.normal(jax.random.key(0), (b, t, cfg.hidden_size))
    valid = np.ones((b, t), np.int32)
    valid[1, :4] = 0
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, jnp.float32)
    mask = causal_mask(jnp.asarray(valid), b, t, t)
    params = jax.jit(Attention(cfg).init)(jax.random.key(1), x, cos, sin, mask)["params"]
    weight = jax.random.normal(jax.random.key(2), x.shape)
    same_values_and_grads(lambda impl: Attention(cfg, attention=impl), params, (x, cos, sin, mask),
                          lambda out: jnp.sum(out[0] * weight))


@pytest.mark.parametrize("impl", ["einsum", "flash", "xla"])
@pytest.mark.parametrize("kv_int8", [False, True])
def test_prefill_from_slot_zero_runs_the_kernel_over_its_own_keys(impl, kv_int8):
    """Given a KV cache and ``index`` the Python int 0 (a prompt written from the start), the kernel attends the
    prompt's own keys: the same output and cache as the cached form over every slot (``index`` traced)."""
    cfg = TINY.text
    b, t, slots = 2, 7, 12
    x = jax.random.normal(jax.random.key(10), (b, t, cfg.hidden_size))
    valid = np.zeros((b, slots), np.int32)
    valid[0, :t], valid[1, 3:t] = 1, 1  # row 1 left-padded; slots after the prompt empty
    positions = np.maximum(np.cumsum(valid[:, :t], axis=1) - 1, 0)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, jnp.float32)
    mask = causal_mask(jnp.asarray(valid), b, t, slots)
    cache = jax.tree.map(lambda c: c[0], init_cache(cfg, b, slots, jnp.float32, kv_int8=kv_int8))
    params = jax.jit(Attention(cfg).init)(jax.random.key(11), x, cos, sin, mask, cache, 0)["params"]
    module = Attention(cfg, attention=impl)
    out_s, cache_s = module.apply({"params": params}, x, cos, sin, mask, cache, 0)
    out_c, cache_c = jax.jit(module.apply)({"params": params}, x, cos, sin, mask, cache, jnp.int32(0))
    rows = valid[:, :t].astype(bool)  # the left-pad queries: no valid key in reach, garbage in both forms
    assert rel_err(np.asarray(out_s)[rows], np.asarray(out_c)[rows]) <= 1e-5
    # and the kernel did run over the prompt alone: a left-pad query averages its 7 keys there, all 12 slots in
    # the cached form
    assert rel_err(np.asarray(out_s)[~rows], np.asarray(out_c)[~rows]) > 1e-3
    for a, c in zip(jax.tree.leaves(cache_s), jax.tree.leaves(cache_c), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-6)


def test_vision_tower_with_a_pixel_mask():
    cfg = TINY.vision
    pixels = jax.random.uniform(jax.random.key(3), (2, 3, 490, 490), minval=-1, maxval=1)
    pixel_mask = np.ones((2, 490, 490), bool)
    pixel_mask[1, :, 280:] = False  # the right 3 of 7 patch columns are padding
    tower = VisionTower(cfg, 2)
    params = jax.jit(tower.init)(jax.random.key(4), pixels, pixel_mask)["params"]
    weight = jax.random.normal(jax.random.key(5), (2, 49, cfg.hidden_size))
    same_values_and_grads(lambda impl: VisionTower(cfg, 2, attention=impl), params, (pixels, pixel_mask),
                          lambda out: jnp.sum(out[0] * weight))


def test_projector_with_a_key_mask():
    features = jax.random.normal(jax.random.key(6), (3, 49, TINY.vision.hidden_size))
    key_mask = np.ones((3, 49), bool)
    key_mask[0, 20:] = False
    key_mask[2, 1:] = False  # a single valid patch
    params = jax.jit(Projector(TINY).init)(jax.random.key(7), features, key_mask)["params"]
    weight = jax.random.normal(jax.random.key(8), (3, 4, TINY.text.hidden_size))
    same_values_and_grads(lambda impl: Projector(TINY, attention=impl), params, (features, key_mask),
                          lambda out: jnp.sum(out * weight))


def test_whole_model_forward_and_training_gradient():
    """A left-padded image + text batch through Aria.from_config("tiny"): logits and the gradient of a training
    loss (cross-entropy on valid tokens + a router z-loss over every token, padding included) agree."""
    rng = np.random.default_rng(0)
    b, t, queries = 2, 14, 4  # one 490 px image per row: 49 patches -> 4 image tokens
    ids = rng.integers(10, TINY.text.vocab_size, (b, t)).astype(np.int32)
    ids[:, 3 : 3 + queries] = TINY.image_token_id
    mask = np.ones((b, t), np.int32)
    mask[1, :2] = 0
    pixels = rng.uniform(-1, 1, (b, 3, 490, 490)).astype(np.float32)
    pixel_mask = np.ones((b, 490, 490), bool)
    pixel_mask[0, 350:] = False
    labels = np.where(mask > 0, np.roll(ids, -1, axis=1), -100)
    results = {}
    base = Aria.from_config(TINY, runtime=Runtime("cpu", experts="dense", layout="stacked"))
    for impl in ("einsum", "xla"):
        model = Aria(TINY, base.params, runtime=base.runtime.replace(attention=impl))
        assert model.module.runtime.attention == impl

        def loss(params, model=model):
            out = model.module.apply({"params": params}, ids, mask, pixels, pixel_mask)
            logp = jax.nn.log_softmax(out.logits, axis=-1)
            picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
            ce = -jnp.sum(jnp.where(labels >= 0, picked, 0.0)) / jnp.sum(labels >= 0)
            z = jnp.mean(jax.nn.logsumexp(out.router_logits, axis=-1) ** 2)
            return ce + 1e-2 * z, out.logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)
        results[impl] = value, logits, grads
    (v_x, l_x, g_x), (v_e, l_e, g_e) = results["xla"], results["einsum"]
    assert abs(float(v_x) - float(v_e)) <= 1e-5 * abs(float(v_e))
    assert rel_err(l_x, l_e) <= 1e-5  # every position: the left-pad ones average all keys in both
    assert jax.tree.structure(g_x) == jax.tree.structure(g_e)
    assert_trees_close(g_x, g_e)
