"""Optimizer pieces against references: transformers' warmup + cosine schedule, frozen layers, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from aria_jax.training import steps as S
from aria_jax.training.config import TrainConfig


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_matches_transformers(kind):
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    total, warmup, lr = 20, 3, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    sched = make(opt, warmup, total)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [float(S.make_schedule(kind, lr, total, warmup)(i)) for i in range(total)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-10)


def test_frozen_layers_do_not_move_even_with_weight_decay():
    cfg = TrainConfig(model_config={}, weight_decay=0.1, learning_rate=0.1, freeze_llm_layers=[1])
    trainable = {"language_model": {"layers": {"w": jnp.ones((3, 4, 4))}, "lm_head": {"kernel": jnp.ones((4, 5))}}}
    schedule = S.make_schedule("constant", cfg.learning_rate, 10, 0)
    tx = S.make_optimizer(cfg, schedule, trainable)
    masks = S.layer_masks(traverse_util.flatten_dict(trainable), cfg.freeze_llm_layers, 3)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    grads = jax.tree.map(jnp.ones_like, trainable)
    new, _, _ = jax.jit(S.make_update(tx, masks, schedule))(state, grads)
    w = np.asarray(new["trainable"]["language_model"]["layers"]["w"])
    np.testing.assert_array_equal(w[1], 1.0)
    assert np.all(w[0] < 1.0) and np.all(w[2] < 1.0)
    assert np.all(np.asarray(new["trainable"]["language_model"]["lm_head"]["kernel"]) < 1.0)


def test_weight_decay_skips_norms_and_biases():
    mask = traverse_util.flatten_dict(S.decay_mask({"a": {"scale": 1, "kernel": 1, "in_q_bias": 1, "bias": 1}}))
    assert mask == {("a", "scale"): False, ("a", "kernel"): True, ("a", "in_q_bias"): False, ("a", "bias"): False}


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_big_batch(aria_model):
    from aria_jax.model.aria import AriaModel

    model = aria_model("gqa")
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 128, (4, 10)).astype(np.int32)
    labels = ids.copy()
    labels[:, :3] = -100
    labels[1, 5:] = -100  # uneven label counts: the token-weighted mean is over the whole accumulated step
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    denom = jnp.float32(np.sum(labels[:, 1:] != -100))
    spec = S.LossSpec(2, 0.0, 0.0, 1, None)
    grad = jax.jit(jax.grad(lambda p, b: S.make_objective(AriaModel(model.config, "ragged"), spec)(
        p, {}, b, jax.random.key(0), denom)[0]))
    full = grad(model.stacked_params(), {k: jnp.asarray(v) for k, v in batch.items()})
    halves = [grad(model.stacked_params(), {k: jnp.asarray(v[i:i + 2]) for k, v in batch.items()}) for i in (0, 2)]
    summed = jax.tree.map(jnp.add, *halves)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(summed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fused_lm_head_loss_equals_the_logits_path():
    """lm_head fused into the loss (custom VJP) gives the loss and gradients of lm_loss_sum(hidden @ kernel)."""
    from aria_jax.training.losses import lm_loss_sum, lm_loss_sum_linear

    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, (2, 9)), jnp.int32).at[0, :3].set(-100).at[1, 5].set(-100)

    def fused(h, k):
        return lm_loss_sum_linear(h, k, labels)[0]

    def plain(h, k):
        return lm_loss_sum(jnp.einsum("btd,dv->btv", h, k), labels)[0]

    assert lm_loss_sum_linear(hidden, kernel, labels)[1] == lm_loss_sum(hidden @ kernel, labels)[1] == 6 + 7
    np.testing.assert_allclose(jax.jit(fused)(hidden, kernel), plain(hidden, kernel), rtol=1e-6)
    got = jax.jit(jax.grad(lambda h, k: 3.0 * fused(h, k), argnums=(0, 1)))(hidden, kernel)
    want = jax.grad(lambda h, k: 3.0 * plain(h, k), argnums=(0, 1))(hidden, kernel)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got[0][0, :2])), "positions whose next label is ignored get no gradient"


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_gradient_clipping_matches_torch(scale):
    import torch

    rng = np.random.default_rng(5)
    grads = {"a": rng.standard_normal((7, 5)).astype(np.float32) * scale, "b": rng.standard_normal(3).astype(np.float32)}
    max_norm = 4.0
    clipped, _ = S.clip_by_global_norm(max_norm).update(jax.tree.map(jnp.asarray, grads), None)
    tensors = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
    for t, v in zip(tensors, grads.values(), strict=True):
        t.grad = torch.as_tensor(v.copy())
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    for t, v in zip(tensors, clipped.values(), strict=True):
        np.testing.assert_allclose(np.asarray(v), t.grad.numpy(), rtol=2e-6)
    norm = float(np.sqrt(sum((v**2).sum() for v in grads.values())))
    if norm < max_norm:
        np.testing.assert_array_equal(np.asarray(clipped["a"]), grads["a"])


@pytest.mark.parametrize("lm_head_lora", [False, True])
def test_objective_equals_the_model_logits_loss(aria_model, lm_head_lora):
    """The objective (lm_head fused into the loss, or through the model when lm_head has a LoRA pair) equals
    lm_loss_sum over the model's own logits; a LoRA pair on lm_head changes the value (it is not dropped)."""
    from aria_jax.model.aria import AriaModel
    from aria_jax.model.layers import LORA
    from aria_jax.training.lora import scale_lora
    from aria_jax.training.losses import lm_loss_sum

    model = aria_model("gqa")
    module = AriaModel(model.config, "dense")
    rng = np.random.default_rng(6)
    ids = rng.integers(10, 128, (2, 11)).astype(np.int32)
    labels = ids.copy()
    labels[0, :4] = -100
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "labels": jnp.asarray(labels)}
    denom = jnp.float32(np.sum(labels[:, 1:] != -100))
    d, v = model.stacked_params()["language_model"]["lm_head"]["kernel"].shape
    if lm_head_lora:
        trainable = {"language_model": {"lm_head": {
            "kernel_a": jnp.asarray(rng.standard_normal((d, 4)) * 0.3, jnp.float32),
            "kernel_b": jnp.asarray(rng.standard_normal((4, v)) * 0.3, jnp.float32)}}}
        spec, frozen = S.LossSpec(2, 0.0, 0.0, 1, 2.0), model.stacked_params()
        variables = {"params": model.stacked_params(), LORA: scale_lora(trainable, 2.0)}
    else:
        trainable, frozen = model.stacked_params(), {}
        spec, variables = S.LossSpec(2, 0.0, 0.0, 1, None), {"params": model.stacked_params()}
    value, _ = jax.jit(S.make_objective(module, spec))(trainable, frozen, batch, jax.random.key(0), denom)
    logits = module.apply(variables, batch["input_ids"], batch["attention_mask"])[0]
    np.testing.assert_allclose(value, lm_loss_sum(logits, batch["labels"])[0] / denom, rtol=1e-5)
    plain = module.apply({"params": model.stacked_params()}, batch["input_ids"], batch["attention_mask"])[0]
    assert (abs(float(value) - float(lm_loss_sum(plain, batch["labels"])[0] / denom)) > 1e-3) == lm_head_lora


def test_grad_fn_writes_into_the_spare_gradients():
    """make_grad_fn: the same values as value_and_grad, and the new gradients reuse the donated spare's buffers."""

    def objective(trainable, frozen, batch, rng, denom):
        y = jnp.tanh(batch["x"] @ trainable["w"] + frozen["b"]) @ trainable["v"]
        return jnp.sum(y**2) / denom, {"y": y}

    rng = np.random.default_rng(0)
    trainable = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                 "v": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}
    args = (trainable, {"b": jnp.ones(16)}, {"x": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)},
            jax.random.key(0), jnp.float32(5))
    (want, _), want_grads = jax.value_and_grad(objective, has_aux=True)(*args)
    grad_fn = S.make_grad_fn(objective)
    spare = jax.tree.map(jnp.zeros_like, trainable)
    pointers = {k: v.unsafe_buffer_pointer() for k, v in spare.items()}
    (value, _), grads = grad_fn(spare, *args)
    assert all(v.is_deleted() for v in spare.values())  # donated
    assert {k: v.unsafe_buffer_pointer() for k, v in grads.items()} == pointers  # written in place
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    for k in trainable:
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want_grads[k]), rtol=1e-5, atol=1e-6)
    assert grad_fn.lower(grads, *args).compile().memory_analysis().alias_size_in_bytes == 4 * (8 * 16 + 16 * 4)


def test_frozen_layers_do_not_move_in_the_per_layer_layout():
    """``freeze_llm_layers`` on the per-layer training layout (param_layout.unroll_layers, CPU default)."""
    from aria_jax.parallel import layout as param_layout

    cfg = TrainConfig(model_config={}, weight_decay=0.1, learning_rate=0.1, freeze_llm_layers=[1])
    trainable = param_layout.unroll_layers(
        {"language_model": {"layers": {"w": jnp.ones((3, 4, 4))}, "lm_head": {"kernel": jnp.ones((4, 5))}}})
    schedule = S.make_schedule("constant", cfg.learning_rate, 10, 0)
    tx = S.make_optimizer(cfg, schedule, trainable)
    masks = S.layer_masks(traverse_util.flatten_dict(trainable), cfg.freeze_llm_layers, 3)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    new, _, _ = jax.jit(S.make_update(tx, masks, schedule))(state, jax.tree.map(jnp.ones_like, trainable))
    text = new["trainable"]["language_model"]
    np.testing.assert_array_equal(np.asarray(text["layers_1"]["w"]), 1.0)
    assert np.all(np.asarray(text["layers_0"]["w"]) < 1.0) and np.all(np.asarray(text["layers_2"]["w"]) < 1.0)
