"""Blockwise ("flash") attention: softmax(q k^T * scale, masked) v over blocks of queries and keys with an online
softmax, never holding a (heads, T, S) score array, and a hand-written backward that recomputes each block's
probabilities from the saved output and log-sum-exp (flash-attention 2).

Layouts: queries become (query blocks, B, K, G * block_q, H) and keys / values (key blocks, B, K, block_k, H) (K kv
heads, G = N / K query heads per kv head: query head n reads kv head n // G, as transformers' ``repeat_kv``), so
every block's matmuls, forward and backward, are plain batched matmuls with batch and kv head leading.

Masking is ``masked_softmax``'s (aria_jax.kernels.attention): a masked score gets the float32 minimum added. Causal:
query i sits at absolute position ``q_offset + i`` and reads keys j <= q_offset + i; ``kv_len``: keys at or past it
are not read (the unfilled part of a KV cache). Only key blocks a query block can read are visited: a loop with a
dynamic trip count per query block (blocks above the causal diagonal and past ``kv_len`` are skipped), so one
compiled program serves every ``q_offset`` and ``kv_len``.

Scores, running maximum and sum and the output accumulator are float32 for every input dtype; the output is cast to
the queries' dtype. A query that reads no valid key (left padding) gets what ``einsum`` gives it, the mean of v over
all S keys; its gradient reaches v (each key gets 1/S of the row's output gradient) but not q or k, where ``einsum``
passes the gradient of a uniform softmax through the masked scores. Training batches are right-padded, so every
query there reads its row's first key and the gradients equal ``einsum``'s.

On XLA:CPU (bench/attention.py, T 1024-4096, 16 heads) it is several times faster than ``einsum`` and transformers'
eager attention, forward and forward + backward, and its temporaries are O(T) instead of O(heads * T * S).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

MIN = float(jnp.finfo(jnp.float32).min)
DEFAULT_BLOCK_Q = 128  # tuned on XLA:CPU (bench/attention.py): a block of scores for 16 heads is 1 MiB, in L2
DEFAULT_BLOCK_K = 128


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    causal: bool = True,
    q_offset: int | jax.Array = 0,
    kv_len: int | jax.Array | None = None,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """softmax(q k^T * scale, masked) v: (B, T, N, H) from queries (B, T, N, H), keys / values (B, S, K, H).

    ``key_valid`` (B, S) bool: the keys a query may read (None: all); ``causal``: query i reads keys
    j <= q_offset + i; ``q_offset``: the first query's absolute position (an int or a traced int32 scalar: a chunk
    of a prompt over a KV cache of S slots); ``kv_len``: only keys below it are read (int or traced; None: S);
    ``scale``: 1/sqrt(H) unless given; ``block_q`` / ``block_k``: the block sizes (capped at T and S).
    """
    b, t, nh, hd = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != hd:
        raise ValueError(f"keys {k.shape} and values {v.shape} do not match queries {q.shape} as (B, S, K, H)")
    s, nkv = k.shape[1], k.shape[2]
    if nkv == 0 or nh % nkv:
        raise ValueError(f"{nh} query heads cannot share {nkv} key/value heads")
    if t == 0 or s == 0:
        raise ValueError(f"flash attention needs at least one query and one key, got {t} and {s}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    if key_valid is not None and key_valid.shape != (b, s):
        raise ValueError(f"key_valid must be (B, S) = {(b, s)}, got {key_valid.shape}")
    g = nh // nkv
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    qb = _pad(q, 1, nq * bq).reshape(b, nq, bq, nkv, g, hd).transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, nkv, g * bq, hd)
    kb = _pad(k, 1, nk * bk).reshape(b, nk, bk, nkv, hd).transpose(1, 0, 3, 2, 4)  # (nk, B, K, bk, H)
    vb = _pad(v, 1, nk * bk).reshape(b, nk, bk, nkv, hd).transpose(1, 0, 3, 2, 4)
    valid = jnp.ones((b, s), bool) if key_valid is None else key_valid.astype(bool)
    valid = _pad(valid, 1, nk * bk).reshape(b, nk, bk).transpose(1, 0, 2)  # (nk, B, bk); padded keys invalid
    kv_hi = jnp.int32(s) if kv_len is None else jnp.clip(jnp.asarray(kv_len, jnp.int32), 0, s)
    offset = jnp.asarray(q_offset, jnp.int32)
    scale = float(hd**-0.5 if scale is None else scale)
    out = _flash(_Static(bool(causal), scale, t, s, bq), qb, kb, vb, valid, offset, kv_hi)
    out = out.reshape(nq, b, nkv, g, bq, hd).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, nh, hd)
    return out[:, :t]


class _Static(NamedTuple):
    """The kernel's compile-time facts: causal, scale, the real query and key counts, queries per block."""

    causal: bool
    scale: float
    t: int
    s: int
    bq: int


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``x`` zero-padded (False for booleans) along ``axis`` to ``size``."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _ceil_div(a: jax.Array, b: int) -> jax.Array:
    return (jnp.maximum(a, 0) + b - 1) // b


def _key_blocks(st: _Static, bk: int, i, offset, kv_hi) -> jax.Array:
    """How many key blocks query block ``i`` reads: those below ``kv_hi`` and, causal, up to its last real query.
    The backward visits exactly these (query, key) block pairs too: a padded query row past T never reads a block
    its forward did not, so its recomputed probabilities stay <= 1."""
    if not st.causal:
        return _ceil_div(kv_hi, bk)
    end = offset + jnp.minimum((i + 1) * st.bq, st.t)  # one past the last real query's position
    return _ceil_div(jnp.minimum(kv_hi, end), bk)


def _scores(st: _Static, q_i, k_j, valid_j, i, j, offset, kv_hi) -> jax.Array:
    """Block (i, j)'s float32 scores (B, K, G * bq, bk), masked as ``masked_softmax`` masks (+ float32 minimum):
    keys not valid, at or past ``kv_hi``, and, causal, later than the query."""
    b, nkv, rows, _ = q_i.shape
    bk = k_j.shape[2]
    bq = st.bq
    s = jnp.einsum("bkqh,bksh->bkqs", q_i, k_j, preferred_element_type=jnp.float32) * st.scale
    k_pos = j * bk + jnp.arange(bk)
    ok = (valid_j & (k_pos < kv_hi)[None])[:, None, None, None, :]  # (B, 1, 1, 1, bk)
    if st.causal:
        q_pos = offset + i * bq + jnp.arange(bq)
        ok = ok & (q_pos[:, None] >= k_pos[None, :])  # (B, 1, 1, bq, bk)
    bias = jnp.where(ok, 0.0, MIN)
    return (s.reshape(b, nkv, rows // bq, bq, bk) + bias).reshape(b, nkv, rows, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, qb, kb, vb, valid, offset, kv_hi):
    return _forward(st, qb, kb, vb, valid, offset, kv_hi)[0]


def _forward(st: _Static, qb, kb, vb, valid, offset, kv_hi):
    """Every query block over its key blocks with an online softmax: the output and the residuals, among them the
    log-sum-exp per row (0 for a row without a valid key, so that its recomputed probabilities are 0) and ``has``,
    the rows that read a valid key (the others get the mean of v over the S keys)."""
    nq, b, nkv, rows, hd = qb.shape
    bk = kb.shape[3]
    dtype = qb.dtype
    v_mean = jnp.sum(vb.astype(jnp.float32), axis=(0, 3)) / st.s  # (B, K, H)

    def query_block(args):
        i, q_i = args

        def key_block(j, carry):
            m, total, acc = carry
            sc = _scores(st, q_i, kb[j], valid[j], i, j, offset, kv_hi)
            m_new = jnp.maximum(m, sc.max(axis=-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkqs,bksh->bkqh", p.astype(dtype), vb[j], preferred_element_type=jnp.float32)
            return m_new, total * corr + p.sum(axis=-1), acc * corr[..., None] + pv

        init = (jnp.full((b, nkv, rows), MIN, jnp.float32), jnp.zeros((b, nkv, rows), jnp.float32),
                jnp.zeros((b, nkv, rows, hd), jnp.float32))
        m, total, acc = jax.lax.fori_loop(0, _key_blocks(st, bk, i, offset, kv_hi), key_block, init)
        has = m > MIN / 2  # a valid score is far above it; a masked one is MIN (plus the score, rounded)
        total = jnp.where(has, total, 1.0)
        out = jnp.where(has[..., None], acc / total[..., None], v_mean[:, :, None, :]).astype(dtype)
        return out, jnp.where(has, m + jnp.log(total), 0.0), has

    out, lse, has = jax.lax.map(query_block, (jnp.arange(nq), qb))
    return out, (qb, kb, vb, valid, offset, kv_hi, out, lse, has)


def _backward(st: _Static, res, d_out):
    """Flash-attention 2's backward: for each key block (as many as any query reads), the query blocks that read it
    (causal: from the first whose last query reaches the block), probabilities recomputed from the log-sum-exp;
    dk, dv accumulate per key block, dq across them. Rows without a valid key pass 1/S of their output gradient to
    every key's value (their output is the mean of v) and nothing to q, k."""
    qb, kb, vb, valid, offset, kv_hi, out, lse, has = res
    nq, b, nkv, rows, hd = qb.shape
    nk, bk = kb.shape[0], kb.shape[3]
    dtype = qb.dtype
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # (nq, B, K, rows): rowsum(dO * O)

    def key_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j = kb[j], vb[j]

        def query_block(i, c):
            dq, dk_j, dv_j = c
            q_i, do_i = qb[i], d_out[i]
            p = jnp.exp(_scores(st, q_i, k_j, valid[j], i, j, offset, kv_hi) - lse[i][..., None])
            dv_j = dv_j + jnp.einsum("bkqs,bkqh->bksh", p.astype(dtype), do_i.astype(dtype),
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqh,bksh->bkqs", do_i.astype(dtype), v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None])).astype(dtype)
            dq_i = jnp.einsum("bkqs,bksh->bkqh", ds, k_j, preferred_element_type=jnp.float32)
            dk_j = dk_j + jnp.einsum("bkqs,bkqh->bksh", ds, q_i, preferred_element_type=jnp.float32)
            return dq.at[i].add(dq_i), dk_j, dv_j

        first = jnp.maximum((j * bk - offset) // st.bq, 0) if st.causal else 0
        zero = jnp.zeros((b, nkv, bk, hd), jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(first, nq, query_block, (dq, zero, zero))
        return dq, dk.at[j].set(dk_j), dv.at[j].set(dv_j)

    n_keys = _key_blocks(st, bk, nq - 1, offset, kv_hi)  # the last query block reads the most
    zeros = jnp.zeros((nk, b, nkv, bk, hd), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, n_keys, key_block, (jnp.zeros(qb.shape, jnp.float32), zeros, zeros))
    lost = jnp.sum(jnp.where(has[..., None], 0.0, d_out), axis=(0, 3)) / st.s  # (B, K, H)
    dv = dv + lost[None, :, :, None, :]
    return (dq * st.scale).astype(dtype), (dk * st.scale).astype(kb.dtype), dv.astype(vb.dtype), None, None, None


_flash.defvjp(_forward, _backward)
