"""One training step's loss and gradients against transformers, and the router losses against numpy (spec §4.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from conftest import rel_err
from flax import traverse_util
from hf_models import IMAGE_TOKEN, image_batch

from aria_jax.checkpoint.hf_keys import to_hub_name
from aria_jax.model.aria import AriaModel
from aria_jax.model.schema import tensor_specs
from aria_jax.training import steps as S
from aria_jax.training.losses import IGNORE_INDEX, load_balancing_loss, z_loss

TOL = 1e-4


def _right_padded(batch):
    """The training collator's convention (and the original's): right padding. With left padding transformers'
    gradient differs by design: the last pad position predicts the first real token through a fully masked
    attention row, whose score gradient torch propagates through ``scores + finfo.min`` although the rounded
    forward does not depend on the scores."""
    for r in range(len(batch["input_ids"])):
        shift = int(np.argmax(batch["attention_mask"][r]))
        for k in ("input_ids", "attention_mask"):
            batch[k][r] = np.roll(batch[k][r], -shift)
    return batch


def _labels(batch):
    labels = batch["input_ids"].copy()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[labels == IMAGE_TOKEN] = IGNORE_INDEX
    return labels


def test_loss_and_grads_match_transformers(hf_model, aria_model):
    name = "gqa"
    batch = _right_padded(image_batch(name, np.random.default_rng(5)))
    assert batch["attention_mask"][:, -1].min() == 0
    batch["labels"] = _labels(batch)
    hf = hf_model(name)
    hf.zero_grad()
    out = hf(**{k: torch.as_tensor(v) for k, v in batch.items()})
    out.loss.backward()
    hf_grads = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}

    model = aria_model(name)
    module = AriaModel(model.config, moe_backend="ragged")
    spec = S.LossSpec(top_k=model.config.text.moe_topk, aux_coeff=0.0, z_coeff=0.0, grad_accum=1, lora_scale=None)
    objective = S.make_objective(module, spec)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    denom = jnp.float32(np.sum(batch["labels"][:, 1:] != IGNORE_INDEX))
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(model.stacked_params(), {}, jbatch, jax.random.key(0), denom)
    assert abs(float(loss) - out.loss.item()) / abs(out.loss.item()) <= TOL

    flat = traverse_util.flatten_dict(jax.device_get(grads))
    hub = {to_hub_name(k, "transformers5"): v for k, v in hf_grads.items()}
    errors = {}
    for key, (_, targets) in tensor_specs(model.config).items():
        for t in targets:
            if t.path[-1] in ("k_bias", "in_k_bias"):
                continue  # key biases: the exact gradient is 0 (softmax shift invariance); both hold rounding noise
            ours = flat[t.path] if t.layer is None else flat[t.path][t.layer]
            ref = t.transform(hub[key])
            assert np.abs(ref).max() > 0, key
            errors[key, t.path] = rel_err(ours, ref)
    worst = max(errors, key=errors.get)
    print(f"loss rel err {abs(float(loss) - out.loss.item()) / out.loss.item():.2e}; worst grad rel err "
          f"{errors[worst]:.2e} ({worst[0]}) over {len(errors)} tensors")
    assert len(errors) > 60
    assert errors[worst] <= TOL, worst


def _np_router_losses(z: np.ndarray, k: int) -> tuple[float, float]:
    """aria-spec.md §4.4, per layer then summed: z-loss mean_t lse^2; LBL E/(T k) sum_e mean_t p_te c_e."""
    zl = lbl = 0.0
    for layer in z.astype(np.float64):
        t, e = layer.shape
        m = layer.max(-1, keepdims=True)
        lse = np.log(np.exp(layer - m).sum(-1)) + m[:, 0]
        zl += np.mean(lse**2)
        p = np.exp(layer - lse[:, None])
        top = np.argsort(-layer, axis=-1, kind="stable")[:, :k]
        c = np.bincount(top.reshape(-1), minlength=e)
        lbl += e / (t * k) * np.sum(p.mean(0) * c)
    return zl, lbl


def test_router_losses_match_numpy():
    z = np.random.default_rng(0).normal(0, 3, (3, 50, 8)).astype(np.float32)
    ref_z, ref_lbl = _np_router_losses(z, 3)
    assert abs(float(z_loss(jnp.asarray(z))) - ref_z) / ref_z < 1e-5
    assert abs(float(load_balancing_loss(jnp.asarray(z), 3)) - ref_lbl) / ref_lbl < 1e-5


def test_router_loss_gradients_flow_only_through_softmax():
    z = jnp.asarray(np.random.default_rng(1).normal(0, 1, (2, 16, 4)).astype(np.float32))
    g = jax.grad(lambda x: load_balancing_loss(x, 2))(z)
    # d/dz of (E/(T k)) sum_e mean_t softmax(z)_te c_e with c fixed: softmax Jacobian times c_e * E/(T k T).
    p = jax.nn.softmax(z, -1)
    _, ids = jax.lax.top_k(z, 2)
    c = jax.vmap(lambda i: jnp.bincount(i.reshape(-1), length=4))(ids).astype(jnp.float32)
    w = c[:, None, :] * 4 / (16 * 2 * 16)
    ref = p * (w - jnp.sum(p * w, -1, keepdims=True))
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-7)
