"""Activations as torch evaluates them: in float32, rounded once to the input dtype (it matters in bfloat16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax(x: jax.Array) -> jax.Array:
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def swiglu(h: jax.Array) -> jax.Array:
    """``silu(gate) * up`` of a fused (..., 2F) gate/up projection; the first half is the SiLU gate in every Aria
    version."""
    gate, up = jnp.split(h, 2, axis=-1)
    return silu(gate) * up


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)
