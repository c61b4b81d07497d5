"""Grouped expert SwiGLU MLP over rows sorted by expert, for CPU: no padding buffer, few wasted FLOPs, fast backward.

Each expert's contiguous rows run through its own weights in chunks of static sizes (``CHUNKS``): a chunk costs
about as much as 25 extra rows on CPU, so a remainder is covered by one chunk of the smallest size that holds it
(less than half of it wasted) rather than by many small ones. A chunk that runs past its expert's rows masks them
out; experts run in order, so the next expert overwrites whatever a tail wrote into its rows.

The VJP is written by hand: autodiff of a loop that indexes a closed-over (E, ...) weight accumulates the weight
cotangent as a full (E, ...) add per iteration (a large share of a CPU training step: bench/HISTORY.md). Each expert's
gradient is summed over its own chunks and written once; the forward keeps the gate/up activations so the backward
does not recompute them.

``grouped_mlp`` takes stacked (E, ...) weights and scans over the experts; ``grouped_mlp_split`` takes one array per
expert (the unrolled layout, aria_jax.parallel.layout) and unrolls that loop, so XLA reads every weight in place
where the scan copies each expert's slice first, at the price of compiling each expert's loops separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from aria_jax.kernels.activations import swiglu
from aria_jax.kernels.matmul import project
from aria_jax.kernels.quantized import QWeight, dense, out_features, zero_cotangent

CHUNKS = (128, 64, 32, 16)  # rows per matmul, largest first
SLACK = CHUNKS[0]  # rows the caller appends after the last expert's rows (a last chunk may run past them)


def _expert_loop(start: jax.Array, size: jax.Array, carry, chunk_fn, chunks: tuple[int, ...] = CHUNKS):
    """Runs ``chunk_fn(carry, pos, rows, valid)`` over one expert's rows [start, start + size) in chunks: the
    largest chunk while more rows are left than the next smaller chunk holds, then at most one of each smaller size.

    One while loop per chunk size (a ``switch`` between sizes would copy the carried buffers every chunk).
    """
    end = start + size
    pos = start
    for rows, smaller in zip(chunks, (*chunks[1:], 0), strict=True):

        def body(state, rows=rows):
            pos, carry = state
            return pos + rows, chunk_fn(carry, pos, rows, jnp.arange(rows) < end - pos)

        pos, carry = jax.lax.while_loop(lambda s, smaller=smaller: end - s[0] > smaller, body, (pos, carry))
    return carry


def _forward_chunk(rows, w1, w2, split: int = 1):
    def chunk(c, pos, n, valid):
        out, h_all = c
        x = jax.lax.dynamic_slice_in_dim(rows, pos, n)
        h = project(x, w1, split=split)
        y = jnp.where(valid[:, None], project(swiglu(h), w2, split=split), 0)
        return (jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), pos, 0),
                jax.lax.dynamic_update_slice_in_dim(h_all, h, pos, 0))

    return chunk


def _backward_chunk(rows, d_out, h_all, w1, w2):
    acc = jnp.promote_types(w1.dtype, jnp.float32)  # bfloat16 weights sum their gradient in float32

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

    def run(d_rows, start, size, chunks):
        init = (d_rows, jnp.zeros(w1.shape, acc), jnp.zeros(w2.shape, acc))
        d_rows, g1, g2 = _expert_loop(start, size, init, chunk, chunks)
        return d_rows, g1.astype(w1.dtype), g2.astype(w2.dtype)

    return run


def _starts(sizes):
    return jnp.cumsum(sizes) - sizes


def _forward(rows, sizes, gate_up, down):
    def per_expert(carry, inputs):
        w1, w2, start, size = inputs
        return _expert_loop(start, size, carry, _forward_chunk(rows, w1, w2)), None

    init = (jnp.zeros_like(rows), jnp.zeros((rows.shape[0], out_features(gate_up)), rows.dtype))
    (out, h_all), _ = jax.lax.scan(per_expert, init, (gate_up, down, _starts(sizes), sizes))
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
    frozen = isinstance(gate_up, QWeight)  # quantized weights are frozen: only the rows' cotangent is computed

    def per_expert(d_rows, inputs):
        w1, w2, start, size = inputs
        if frozen:
            w1, w2 = dense(w1, rows.dtype), dense(w2, rows.dtype)
        d_rows, g1, g2 = _backward_chunk(rows, d_out, h_all, w1, w2)(d_rows, start, size, CHUNKS)
        return d_rows, (None, None) if frozen else (g1, g2)

    d_rows, (g_gate_up, g_down) = jax.lax.scan(per_expert, jnp.zeros_like(rows), (gate_up, down, _starts(sizes), sizes))
    if frozen:
        return d_rows, None, zero_cotangent(gate_up), zero_cotangent(down)
    return d_rows, None, g_gate_up, g_down


grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)


def _forward_split(rows, sizes, gate_up, down, chunks, split):
    starts = _starts(sizes)
    carry = (jnp.zeros_like(rows), jnp.zeros((rows.shape[0], out_features(gate_up[0])), rows.dtype))
    for e, (w1, w2) in enumerate(zip(gate_up, down, strict=True)):
        carry = _expert_loop(starts[e], sizes[e], carry, _forward_chunk(rows, w1, w2, split), chunks)
    return carry


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def grouped_mlp_split(
    rows: jax.Array, sizes: jax.Array, gate_up: Sequence[jax.Array], down: Sequence[jax.Array],
    chunks: tuple[int, ...] = CHUNKS,
    split: int = 1,
) -> jax.Array:
    """``grouped_mlp`` with one (D, 2F) / (F, D) array per expert (the unrolled layout, aria_jax.parallel.layout):
    every weight is read in place and every expert's gradient is its own array, written once. ``rows`` carries
    ``chunks[0]`` rows of slack after the last expert's rows; ``split``: ``matmul.project``'s single-row form."""
    return _forward_split(rows, sizes, gate_up, down, chunks, split)[0]


def _split_fwd(rows, sizes, gate_up, down, chunks, split):
    out, h_all = _forward_split(rows, sizes, gate_up, down, chunks, split)
    return out, (rows, sizes, gate_up, down, h_all)


def _split_bwd(chunks, split, res, d_out):
    rows, sizes, gate_up, down, h_all = res
    starts = _starts(sizes)
    d_rows, g_gate_up, g_down = jnp.zeros_like(rows), [], []
    for e, (w1, w2) in enumerate(zip(gate_up, down, strict=True)):
        d_rows, g1, g2 = _backward_chunk(rows, d_out, h_all, w1, w2)(d_rows, starts[e], sizes[e], chunks)
        g_gate_up.append(g1)
        g_down.append(g2)
    return d_rows, None, type(gate_up)(g_gate_up), type(down)(g_down)


grouped_mlp_split.defvjp(_split_fwd, _split_bwd)
