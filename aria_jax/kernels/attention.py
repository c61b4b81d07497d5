"""Attention's kernel: the one place that picks how softmax(q k^T * scale + mask) v runs (``Runtime.attention``).

Every caller (the decoder's self-attention without a KV cache, the vision tower, the projector's cross-attention)
passes queries (B, T, N, H), keys and values (B, S, K, H) with N a multiple of K (GQA: query head n reads kv head
n // (N / K), as transformers' ``repeat_kv``), which keys are valid (``key_valid`` (B, S), None: all) and whether
the attention is causal (query i sees keys j <= i; then T == S). The implementations:

- ``einsum``: two batched matmuls with batch and kv head leading every operand and a float32 softmax with the
  masked scores set to the dtype minimum (``masked_softmax``): transformers' eager attention step for step, in its
  dtypes; the CPU choice (tuned there: bench/HISTORY.md).
- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``: float32 scores for every input dtype (more exact
  than transformers' bfloat16 ones), the masks added as ``einsum`` adds them (so float32 values and gradients match
  it everywhere).
- ``flash``: blocks of queries and keys with an online softmax and a backward that recomputes each block
  (aria_jax.kernels.flash_attention): never holds the (B, N, T, S) scores, skips blocks above the causal diagonal;
  values and gradients equal ``einsum``'s for every query that reads a valid key (a query that reads none gets the
  same value, the mean of v, but passes no gradient to q and k). The CPU choice.
- ``cudnn``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``; named,
  because ``implementation=None`` still runs the XLA one (jax 0.10/0.11). cuDNN masks only by sequence lengths (no
  bias tensor, the fast path): the valid keys are moved to the front of each row in their order (a stable sort, so
  causality among them is unchanged) and attended as the first ``sum(key_valid)`` keys; causal queries move with
  them and their outputs move back. Queries and keys of float32 or head dims cuDNN does not take (not a multiple
  of 8, over 128) run the ``xla`` implementation.

All four give the same result for every valid query, and for every query of non-causal attention. A causal padded
query differs in ``cudnn`` only: it reads all of its row's valid keys there, which is the masked result when they
all precede it (right padding: training batches, whose padded positions reach the router losses), and otherwise not
(left padding: ``einsum`` and ``xla`` give a query that sees no valid key a uniform distribution over all keys, as
transformers' eager attention). Finite everywhere; no valid query ever reads a padded position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aria_jax.kernels.flash_attention import flash_attention
from aria_jax.runtime import ATTENTION_KERNELS

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 holds on every GPU cuDNN's flash attention runs on


def masked_softmax(scores: jax.Array, mask: jax.Array | None, out_dtype: jnp.dtype) -> jax.Array:
    """Softmax in float32 over the last axis; masked-out entries get the dtype minimum, as transformers' eager path.

    The mask is added as a 0 / minimum bias of the mask's own (broadcast) shape: ``s + min`` rounds to ``min`` for
    any score below ~1e31, so this equals selecting the minimum, and XLA:CPU fuses the add into a vectorised
    softmax where a select against a broadcast boolean mask runs several times slower (bench/HISTORY.md, session 6).
    """
    scores = scores.astype(jnp.float32)
    if mask is not None:
        scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(out_dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_valid: jax.Array | None = None,
    *,
    causal: bool = False,
    implementation: str = "einsum",
    scale: float | None = None,
    query_chunk: int | None = None,
) -> jax.Array:
    """softmax(q k^T * scale, masked) v: (B, T, N, H) from queries (B, T, N, H), keys/values (B, S, K, H).

    ``key_valid`` (B, S) bool: the keys a query may read (None: all); ``causal``: query i reads keys j <= i;
    ``scale``: 1/sqrt(H) unless given; ``query_chunk``: ``einsum`` and ``xla`` compute the scores of this many
    queries at a time (their (B, N, chunk, S) float32 block bounds the memory; ``cudnn`` never holds the scores).
    """
    if implementation not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel '{implementation}'; choose one of {', '.join(ATTENTION_KERNELS)}")
    b, t, nh, hd = q.shape
    if k.shape[2] == 0 or nh % k.shape[2]:
        raise ValueError(f"{nh} query heads cannot share {k.shape[2]} key/value heads")
    if causal and t != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {t} and {k.shape[1]}")
    scale = hd**-0.5 if scale is None else scale
    if implementation == "cudnn" and cudnn_fits(q):
        return _by_lengths(q, k, v, key_valid, causal, scale, "cudnn")
    if implementation == "flash":
        return flash_attention(q, k, v, key_valid, causal=causal, scale=scale)
    chunk = t if query_chunk is None else max(1, min(query_chunk, t))
    if implementation == "einsum":
        return _einsum(q, k, v, key_valid, causal, scale, chunk)
    if chunk == t:
        return _xla(q, k, v, _mask(key_valid, causal, 0, t, k.shape[1]), scale)
    return jnp.concatenate(  # query chunks bound the (B, heads, chunk, keys) score block
        [_xla(q[:, i : i + chunk], k, v, _mask(key_valid, causal, i, min(chunk, t - i), k.shape[1]), scale)
         for i in range(0, t, chunk)],
        axis=1,
    )


def cudnn_fits(q: jax.Array) -> bool:
    """Whether cuDNN's flash attention takes these queries (and the keys/values of the same dtype and head dim)."""
    return q.dtype in CUDNN_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= CUDNN_MAX_HEAD_DIM


def _mask(key_valid: jax.Array | None, causal: bool, start: int, rows: int, keys: int) -> jax.Array | None:
    """(B or 1, 1, rows or 1, S) boolean for the queries ``start`` .. ``start + rows``, or None (nothing masked)."""
    mask = None if key_valid is None else key_valid.astype(bool)[:, None, None, :]
    if causal:
        allowed = (start + jnp.arange(rows))[:, None] >= jnp.arange(keys)[None, :]
        mask = allowed[None, None] if mask is None else mask & allowed
    return mask


def _einsum(
    q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, causal: bool, scale: float, chunk: int
) -> jax.Array:
    """Batch and kv head lead every operand, so both matmuls and their gradients are plain batched matmuls (XLA:CPU
    transposed the mixed layouts per call); keys and values are transposed once for all query chunks."""
    b, t, nh, hd = q.shape
    s, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    q = q.reshape(b, t, nkv, g, hd).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, H)

    def block(start: int, rows: int) -> jax.Array:
        rows_q = q[:, :, :, start : start + rows].reshape(b, nkv, g * rows, hd)
        scores = jnp.einsum("bkqh,bksh->bkqs", rows_q, k) * scale
        mask = _mask(key_valid, causal, start, rows, s)
        probs = masked_softmax(scores.reshape(b, nkv, g, rows, s), None if mask is None else mask[:, :, None], q.dtype)
        return jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, nkv, g * rows, s), v).reshape(b, nkv, g, rows, hd)

    out = block(0, t) if chunk >= t else jnp.concatenate(
        [block(i, min(chunk, t - i)) for i in range(0, t, chunk)], axis=3
    )
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, nh, hd)


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """The mask as ``masked_softmax`` applies it, an added float32 minimum (not dot_product_attention's ``mask``, a
    select): a query with no valid key then gets the same values and the same gradients (the scores' gradient
    passes the addition; a select blocks it), as in ``einsum`` and transformers' eager attention."""
    bias = None if mask is None else jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")


def _by_lengths(
    q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, causal: bool, scale: float,
    implementation: str,
) -> jax.Array:
    """Attention masked by key counts only (cuDNN's flash attention has no other cheap mask): each row's valid keys
    first, in order, and ``key_value_seq_lengths`` their count. A causal query moves with its key, so a valid query
    still reads the valid keys up to itself; a padded one, placed after the row's valid keys, reads them all (see
    the module docstring). ``implementation``: ``cudnn``, or ``xla``, which takes the same arguments (the tests run
    this function on CPU with it)."""
    if key_valid is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=implementation)
    valid = key_valid.astype(bool)
    order = jnp.argsort(~valid, axis=1, stable=True)  # (B, S): the valid keys' positions first, in order
    lengths = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.int32)  # a row without valid keys reads its first key
    take = jax.vmap(lambda x, idx: x[idx])
    k, v = take(k, order), take(v, order)
    if not causal:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                            implementation=implementation)
    out = jax.nn.dot_product_attention(take(q, order), k, v, scale=scale, is_causal=True,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return take(out, jnp.argsort(order, axis=1))  # back to the queries' own positions
