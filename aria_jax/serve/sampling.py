"""Next tokens for a pool of rows that each sample their own way: greedy where a row's temperature is 0, else
temperature then top-p (nucleus), as ``inference.sampling`` does for one configuration, here one value per row so
the decode step compiles once for any mix of requests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """(B, V) logits scaled by each row's temperature (B,), outside each row's top-p mass (B,) set to -inf: the
    same cut as ``inference.sampling.filter_logits`` (drop the low tail whose mass is <= 1 - top_p, keep the top)."""
    logits = logits.astype(jnp.float32) / temperature[:, None]
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = (cumulative <= 1.0 - top_p[:, None]) & (top_p[:, None] < 1.0)
    remove = remove.at[..., -1].set(False)
    threshold = jnp.max(jnp.where(remove, sorted_logits, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits <= threshold, -jnp.inf, logits)


def select_rows(logits: jax.Array, keys: jax.Array, steps: jax.Array, temperature: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """(B, V) logits -> (B,) tokens. ``keys`` (B, 2) uint32: each row's ``jax.random.key(seed)`` data; ``steps``
    (B,): tokens the row has generated, folded into its key (as ``Decoder`` folds its step). Rows with temperature
    0 take the argmax; the sampling branch runs only when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = nucleus(logits, jnp.where(temperature > 0, temperature, 1.0), top_p)

        def one(data, step, row):
            key = jax.random.fold_in(jax.random.wrap_key_data(data), step)
            return jax.random.categorical(key, row[None], axis=-1)[0].astype(jnp.int32)

        return jnp.where(temperature > 0, jax.vmap(one)(keys, steps, scaled), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
