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
