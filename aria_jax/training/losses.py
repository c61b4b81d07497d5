"""Training losses: transformers' causal-LM cross-entropy and the original Aria router losses (aria-spec.md §4.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def shift_labels(labels: jax.Array) -> jax.Array:
    """Labels for next-token prediction: position t predicts labels[t + 1]; the last position is ignored."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def lm_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of float32 cross-entropy over non-ignored shifted labels, their count), as ForCausalLMLoss."""
    target = shift_labels(labels)
    valid = target != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)


def lm_loss_sum_linear(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``lm_loss_sum(hidden @ kernel, labels)`` with lm_head fused into the loss and a hand-written backward.

    The logits are float32 (a float32-accumulated matmul). The forward keeps d loss / d logits instead of the logits,
    so the backward is two plain matmuls; autodiff of log_softmax + take_along_axis instead materialises a zeroed
    one-hot scatter and (on CPU) a transposed copy of the logits gradient (about a quarter of a CPU training step).
    """
    target = shift_labels(labels)
    valid = target != IGNORE_INDEX
    d = hidden.shape[-1]
    ce = _linear_cross_entropy(hidden.reshape(-1, d), kernel, jnp.where(valid, target, 0).reshape(-1),
                               valid.reshape(-1))
    return ce, jnp.sum(valid)


def _ce_terms(x, kernel, target, valid):
    logits = jnp.einsum("nd,dv->nv", x, kernel, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), logits, lse


@jax.custom_vjp
def _linear_cross_entropy(x: jax.Array, kernel: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    return _ce_terms(x, kernel, target, valid)[0]


def _linear_cross_entropy_fwd(x, kernel, target, valid):
    loss, logits, lse = _ce_terms(x, kernel, target, valid)
    d_logits = jnp.exp(logits - lse[:, None]).at[jnp.arange(target.shape[0]), target].add(-1.0)
    d_logits = jnp.where(valid[:, None], d_logits, 0.0).astype(x.dtype)
    return loss, (x, kernel, d_logits)


def _linear_cross_entropy_bwd(res, g):
    x, kernel, d_logits = res
    d_x = (jnp.einsum("nv,dv->nd", d_logits, kernel) * g.astype(x.dtype)).astype(x.dtype)
    d_kernel = jnp.einsum("nd,nv->dv", x * g.astype(x.dtype), d_logits).astype(kernel.dtype)
    return d_x, d_kernel, None, None


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def z_loss(router_logits: jax.Array) -> jax.Array:
    """Per layer ``mean_t logsumexp_e(z_t)^2`` summed over layers; router_logits (L, T, E), all tokens."""
    lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.mean(jnp.square(lse), axis=-1))


def load_balancing_loss(router_logits: jax.Array, top_k: int) -> jax.Array:
    """Per layer ``E / (T k) * sum_e mean_t softmax(z)_te * c_e`` summed over layers (c_e: top-k histogram)."""
    n_layers, t, e = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, ids = jax.lax.top_k(router_logits, top_k)
    counts = jax.lax.stop_gradient(jax.vmap(lambda i: jnp.bincount(i.reshape(-1), length=e))(ids))
    per_layer = jnp.sum(jnp.mean(probs, axis=1) * counts.astype(jnp.float32), axis=-1) * (e / (t * top_k))
    return jnp.sum(per_layer)
