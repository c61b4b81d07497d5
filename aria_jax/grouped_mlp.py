"""Grouped expert SwiGLU MLP over rows sorted by expert, for CPU: no padding buffer, few wasted FLOPs, fast backward.

Each expert's contiguous rows run through its own weights in chunks of static sizes (``CHUNKS``): a chunk costs
about as much as 25 extra rows on CPU, so a remainder is covered by one chunk of the smallest size that holds it
(less than half of it wasted) rather than by many small ones. A chunk that runs past its expert's rows masks them
out; experts run in order, so the next expert overwrites whatever a tail wrote into its rows.

The VJP is written by hand: autodiff of a loop that indexes a closed-over (E, ...) weight accumulates the weight
cotangent as a full (E, ...) add per iteration (measured: 40% of a CPU training step). Here each expert's
gradient is summed over its own chunks and written once; the forward keeps the gate/up activations so the backward
does not recompute them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aria_jax.layers import swiglu

CHUNKS = (128, 64, 32, 16)  # rows per matmul, largest first
SLACK = CHUNKS[0]  # rows the caller appends after the last expert's rows (a last chunk may run past them)


def _expert_loop(start: jax.Array, size: jax.Array, carry, chunk_fn):
    """Runs ``chunk_fn(carry, pos, rows, valid)`` over one expert's rows [start, start + size) in chunks: the
    largest chunk while more rows are left than the next smaller chunk holds, then at most one of each smaller size.

    One while loop per chunk size (a ``switch`` between sizes would copy the carried buffers every chunk).
    """
    end = start + size
    pos = start
    for rows, smaller in zip(CHUNKS, (*CHUNKS[1:], 0), strict=True):

        def body(state, rows=rows):
            pos, carry = state
            return pos + rows, chunk_fn(carry, pos, rows, jnp.arange(rows) < end - pos)

        pos, carry = jax.lax.while_loop(lambda s, smaller=smaller: end - s[0] > smaller, body, (pos, carry))
    return carry


def _forward(rows, sizes, gate_up, down):
    starts = jnp.cumsum(sizes) - sizes
    out = jnp.zeros_like(rows)
    h_all = jnp.zeros((rows.shape[0], gate_up.shape[-1]), rows.dtype)

    def per_expert(carry, inputs):
        w1, w2, start, size = inputs

        def chunk(c, pos, n, valid):
            out, h_all = c
            x = jax.lax.dynamic_slice_in_dim(rows, pos, n)
            h = x @ w1
            y = jnp.where(valid[:, None], swiglu(h) @ w2, 0)
            return (jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), pos, 0),
                    jax.lax.dynamic_update_slice_in_dim(h_all, h, pos, 0))

        return _expert_loop(start, size, carry, chunk), None

    (out, h_all), _ = jax.lax.scan(per_expert, (out, h_all), (gate_up, down, starts, sizes))
    return out, h_all


@jax.custom_vjp
def grouped_mlp(rows: jax.Array, sizes: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """``rows`` (N + SLACK, D) sorted by expert, ``sizes`` (E,) rows per expert (sum <= N), gate_up (E, D, 2F),
    down (E, F, D) -> (N + SLACK, D): row i through its expert's SwiGLU MLP; rows past ``sum(sizes)`` give 0."""
    return _forward(rows, sizes, gate_up, down)[0]


def _grouped_mlp_fwd(rows, sizes, gate_up, down):
    out, h_all = _forward(rows, sizes, gate_up, down)
    return out, (rows, sizes, gate_up, down, h_all)


def _grouped_mlp_bwd(res, d_out):
    rows, sizes, gate_up, down, h_all = res
    starts = jnp.cumsum(sizes) - sizes
    acc = jnp.promote_types(gate_up.dtype, jnp.float32)  # bfloat16 weights sum their gradient in float32

    def per_expert(d_rows, inputs):
        w1, w2, start, size = inputs

        def chunk(c, pos, n, valid):
            d_rows, g1, g2 = c
            x = jax.lax.dynamic_slice_in_dim(rows, pos, n)
            dy = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(d_out, pos, n), 0)
            act, swiglu_vjp = jax.vjp(swiglu, jax.lax.dynamic_slice_in_dim(h_all, pos, n))
            (d_h,) = swiglu_vjp(dy @ w2.T)
            g1 = g1 + jnp.einsum("nd,nf->df", x, d_h, preferred_element_type=acc)
            g2 = g2 + jnp.einsum("nf,nd->fd", act, dy, preferred_element_type=acc)
            d_x = (d_h @ w1.T).astype(d_rows.dtype)
            return jax.lax.dynamic_update_slice_in_dim(d_rows, d_x, pos, 0), g1, g2

        init = (d_rows, jnp.zeros(w1.shape, acc), jnp.zeros(w2.shape, acc))
        d_rows, g1, g2 = _expert_loop(start, size, init, chunk)
        return d_rows, (g1.astype(w1.dtype), g2.astype(w2.dtype))

    d_rows, (g_gate_up, g_down) = jax.lax.scan(per_expert, jnp.zeros_like(rows), (gate_up, down, starts, sizes))
    return d_rows, None, g_gate_up, g_down


grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)
