"""Router + experts parity with transformers' AriaTextMoELayer; every expert backend against the others."""

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS

from aria_jax.kernels.experts import EXPERT_BACKENDS, available_backends, experts_split, split_block
from aria_jax.model.moe import MoE, route


def layer_params(model, i):
    return jax.tree.map(lambda x: x[i], model.stacked_params()["language_model"]["layers"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_router_topk_then_softmax_over_selected(name, hf_model, aria_model):
    model = aria_model(name)
    router = hf_model(name).model.language_model.layers[1].mlp.router
    x = np.random.default_rng(12).standard_normal((50, model.config.text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref_logits, ref_weights, ref_ids = (t.numpy() for t in router(torch.as_tensor(x)))
    logits, weights, ids = route(x, layer_params(model, 1)["mlp"]["router_kernel"], model.config.text.moe_topk)
    assert rel_err(logits, ref_logits) <= 1e-5
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    assert rel_err(weights, ref_weights) <= 1e-5
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.each_value_once
@pytest.mark.parametrize("backend", sorted(("auto", *available_backends())))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_moe_layer_matches_transformers(name, backend, hf_model, aria_model):
    model = aria_model(name)
    mlp = hf_model(name).model.language_model.layers[0].mlp
    x = np.random.default_rng(13).standard_normal((2, 37, model.config.text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = mlp(torch.as_tensor(x)).numpy()
    out, router_logits = MoE(model.config.text, backend).apply({"params": layer_params(model, 0)["mlp"]}, x)
    assert router_logits.shape == (74, model.config.text.moe_num_experts)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_split_expert_layout_matches_transformers(name, hf_model, aria_model):
    """The unrolled inference layout: one array per expert (``gate_up_{e}``), run by ``experts_split``."""
    model = aria_model(name)
    assert model.layout == "unrolled"  # the default on one CPU device
    mlp = hf_model(name).model.language_model.layers[1].mlp
    params = model.params["language_model"]["layers_1"]["mlp"]
    for t in (1, 4, 37):  # matvec blocks (<= 2 rows per expert) and multi-row blocks
        x = np.random.default_rng(t).standard_normal((2, t, model.config.text.hidden_size)).astype(np.float32)
        with torch.no_grad():
            ref = mlp(torch.as_tensor(x)).numpy()
        out, _ = MoE(model.config.text, split_experts=True).apply({"params": params}, x)
        assert rel_err(out, ref) <= 1e-5, t


def test_ragged_handles_empty_experts_and_one_token():
    """Dropless with idle experts: all tokens routed to a subset, and a single token."""
    rng = np.random.default_rng(14)
    e, d, f, k = 6, 16, 8, 2
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32)
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    for t in (1, 9):
        x = rng.standard_normal((t, d)).astype(np.float32)
        ids = np.stack([np.full(t, 4), np.full(t, 1)], axis=1)  # experts 0, 2, 3, 5 idle
        weights = rng.uniform(size=(t, k)).astype(np.float32)
        # Independent reference: the per-token loop of the spec (aria-spec.md §4.3).
        ref = np.zeros((t, d))
        for ti in range(t):
            for j in range(k):
                h = x[ti] @ gate_up[ids[ti, j]]
                a = h[:f] / (1 + np.exp(-h[:f])) * h[f:]
                ref[ti] += weights[ti, j] * (a @ down[ids[ti, j]])
        for name in available_backends():
            assert rel_err(EXPERT_BACKENDS[name](x, weights, ids, gate_up, down), ref) <= 1e-5, name
        assert rel_err(experts_split(x, weights, ids, list(gate_up), list(down)), ref) <= 1e-5


def test_split_blocks_cover_every_row():
    """experts_split with blocks of 1, 2^n rows and idle experts equals the dense reference for many sizes."""
    rng = np.random.default_rng(16)
    e, d, f, k = 7, 8, 4, 3
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32)
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    blocks = set()
    for t in (1, 3, 5, 6, 17, 64, 300):
        x = rng.standard_normal((t, d)).astype(np.float32)
        ids = np.stack([rng.permutation(e - 2)[:k] for _ in range(t)])  # the last two experts idle
        weights = rng.uniform(size=(t, k)).astype(np.float32)
        ref = EXPERT_BACKENDS["dense"](x, weights, ids, gate_up, down)
        assert rel_err(experts_split(x, weights, ids, list(gate_up), list(down)), ref) <= 1e-5, t
        blocks.add(split_block(t * k, e))
    assert {1, 8, 32, 256} <= blocks, blocks  # 256: the cap
    # a big expert: a few rows as one matmul of 4 (not one matvec per row), unless every expert has at most one row
    big = 8 << 20
    assert split_block(32, 16, big) == 4 and split_block(32, 16) == 1 and split_block(8, 16, big) == 1
    x = rng.standard_normal((9, d)).astype(np.float32)
    ids = np.stack([rng.permutation(e - 2)[:k] for _ in range(9)])
    weights = rng.uniform(size=(9, k)).astype(np.float32)
    import aria_jax.kernels.experts as experts_module

    limit, experts_module.MATVEC_LOOP_MAX_BYTES = experts_module.MATVEC_LOOP_MAX_BYTES, 0  # these tiny experts too
    try:
        out = experts_split(x, weights, ids, list(gate_up), list(down))
    finally:
        experts_module.MATVEC_LOOP_MAX_BYTES = limit
    assert rel_err(out, EXPERT_BACKENDS["dense"](x, weights, ids, gate_up, down)) <= 1e-5


def test_unknown_backend_is_rejected(aria_model):
    model = aria_model("gqa")
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        MoE(model.config.text, "fast").apply(
            {"params": layer_params(model, 0)["mlp"]}, np.zeros((1, 2, 64), np.float32)
        )


def test_backends_have_equal_gradients():
    """Training differentiates through the routed experts: every backend's gradients equal the dense reference."""
    rng = np.random.default_rng(15)
    t, e, d, f, k = 40, 5, 12, 6, 2
    x = rng.standard_normal((t, d)).astype(np.float32)
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32)
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    weights = rng.uniform(size=(t, k)).astype(np.float32)

    def grads(backend):
        loss = lambda x, w, gu, dn: (backend(x, w, ids, gu, dn) ** 2).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, weights, gate_up, down)

    ref = grads(EXPERT_BACKENDS["dense"])
    for name in ("ragged", "gather", "blocked"):
        for g, r in zip(grads(EXPERT_BACKENDS[name]), ref, strict=True):
            assert rel_err(g, r) <= 1e-5, name
