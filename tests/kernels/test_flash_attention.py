"""Blockwise attention (aria_jax.kernels.flash_attention) against the ``einsum`` path (aria_jax.kernels.attention),
values and gradients, computed in the same test: causal + left / right padding, GQA and MHA, blocks that split the
padding and do not divide T, chunks of a sequence at a traced offset over a longer cache, ``kv_len``, non-causal key
padding, bfloat16; and that it skips the blocks it must not read and never holds the (heads, T, S) scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from aria_jax.kernels import attention as plain
from aria_jax.kernels import flash_attention as flash

einsum = jax.jit(plain.attention, static_argnames=("causal", "implementation", "scale", "query_chunk"))
blockwise = jax.jit(flash.flash_attention, static_argnames=("causal", "scale", "block_q", "block_k"))


def qkv(b, t, s, nh, nkv, hd, seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype)
                 for kk, shape in zip(keys, [(b, t, nh, hd), (b, s, nkv, hd), (b, s, nkv, hd)], strict=True))


def padding(b, t, kind, n=5):
    """(B, T) validity: row 0 full, row 1 padded by ``n`` on the left (generation) or right (training)."""
    valid = np.ones((b, t), bool)
    if kind == "left":
        valid[1, :n] = False
    elif kind == "right":
        valid[1, t - n:] = False
    return valid


def grads(fn, q, k, v, weight):
    """d/d(q, k, v) of sum(fn(q, k, v) * weight)."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weight), argnums=(0, 1, 2)))(q, k, v)


def reads_a_key(valid, causal):
    """(B, T) the queries that read at least one valid key (T == S)."""
    if not causal:
        return np.repeat(valid.any(1, keepdims=True), valid.shape[1], axis=1)
    return np.cumsum(valid, axis=1) > 0


# T=29: a partial last block of each size; (4, 8) splits the 5 left-padded keys across key blocks, (8, 4) the 5
# right-padded ones (test_random_shapes_equal_einsum: more shapes and block sizes, values only)
@pytest.mark.parametrize("pad,heads,hd,blocks", [
    ("left", (4, 2), 32, (4, 8)),
    ("right", (4, 4), 64, (8, 4)),
])
def test_causal_values_and_gradients_equal_einsum(pad, heads, hd, blocks):
    nh, nkv = heads
    t = 29
    q, k, v = qkv(2, t, t, nh, nkv, hd, seed=hd + nh + nkv)
    valid = padding(2, t, pad)
    ref = einsum(q, k, v, jnp.asarray(valid), causal=True)
    out = blockwise(q, k, v, jnp.asarray(valid), block_q=blocks[0], block_k=blocks[1])
    # every row, the left-padded ones without a valid key too (the mean of v, as einsum gives them)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= 1e-5
    rows = reads_a_key(valid, causal=True)
    weight = jax.random.normal(jax.random.key(1), q.shape) * rows[:, :, None, None]
    theirs = grads(lambda a, b_, c: einsum(a, b_, c, jnp.asarray(valid), causal=True), q, k, v, weight)
    ours = grads(lambda a, b_, c: blockwise(a, b_, c, jnp.asarray(valid), block_q=blocks[0], block_k=blocks[1]),
                 q, k, v, weight)
    for a, b_ in zip(ours, theirs, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        assert rel_err(a, b_) <= 1e-5


def test_a_query_without_a_valid_key_passes_its_gradient_to_v_only():
    """Documented difference: einsum also passes a (meaningless) gradient to q and k through the masked scores."""
    q, k, v = qkv(2, 12, 12, 4, 2, 16, seed=3)
    valid = jnp.asarray(padding(2, 12, "left"))
    weight = jnp.zeros(q.shape).at[1, :5].set(1.0)  # only the rows that read nothing
    theirs = grads(lambda a, b_, c: einsum(a, b_, c, valid, causal=True), q, k, v, weight)
    ours = grads(lambda a, b_, c: blockwise(a, b_, c, valid, block_q=4, block_k=4), q, k, v, weight)
    assert rel_err(ours[2], theirs[2]) <= 1e-5
    assert float(jnp.abs(ours[0]).max()) == 0.0 and float(jnp.abs(ours[1]).max()) == 0.0


def test_chunks_at_a_traced_offset_equal_one_full_pass():
    """Chunked prefill: chunks of 8 queries at offsets 0, 8, 16, 24 over a 40-slot cache (30 tokens filled, the rest
    garbage), one compiled program for every offset; each chunk's rows equal einsum's full pass, values and
    gradients."""
    b, total, slots, nh, nkv, hd, chunk = 2, 30, 40, 4, 2, 32, 8
    q, k, v = qkv(b, total, slots, nh, nkv, hd, seed=4)
    k = k.at[:, total:].multiply(100.0)  # unfilled slots: never read (masked inside a block, skipped past it)
    v = v.at[:, total:].multiply(100.0)
    valid = padding(b, slots, "left")
    ref = einsum(q, k[:, :total], v[:, :total], jnp.asarray(valid[:, :total]), causal=True)

    def run(q_c, k_, v_, offset, kv_len):
        return flash.flash_attention(q_c, k_, v_, jnp.asarray(valid), q_offset=offset, kv_len=kv_len,
                                     block_q=4, block_k=8)

    step = jax.jit(run)
    ours_grads = jax.jit(jax.grad(lambda a, b_, c, w, s, e: jnp.sum(run(a, b_, c, s, e) * w), argnums=(0, 1, 2)))
    theirs_grads = jax.jit(jax.grad(
        lambda a, b_, c, w: jnp.sum(plain.attention(a, b_, c, jnp.asarray(valid[:, :total]), causal=True) * w),
        argnums=(0, 1, 2)))
    rows = reads_a_key(valid[:, :total], causal=True)
    weight = jax.random.normal(jax.random.key(5), q.shape) * rows[:, :, None, None]
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        q_c = jnp.pad(q[:, start:stop], ((0, 0), (0, chunk - (stop - start)), (0, 0), (0, 0)))  # a fixed chunk
        out = step(q_c, k, v, jnp.int32(start), jnp.int32(stop))[:, : stop - start]
        keep = rows[:, start:stop]
        assert rel_err(np.asarray(out)[keep], np.asarray(ref[:, start:stop])[keep]) <= 1e-5
        # a query without a valid key: the mean of v over the cache's S slots (the cached einsum path's result)
        np.testing.assert_allclose(np.asarray(out)[~keep], np.broadcast_to(
            np.repeat(np.asarray(v).mean(1), nh // nkv, axis=1)[:, None], out.shape)[~keep], rtol=1e-5, atol=1e-6)
        w_c = jnp.zeros(q_c.shape).at[:, : stop - start].set(weight[:, start:stop])
        ours = ours_grads(q_c, k, v, w_c, jnp.int32(start), jnp.int32(stop))
        w_full = jnp.zeros(q.shape).at[:, start:stop].set(weight[:, start:stop])
        theirs = theirs_grads(q, k[:, :total], v[:, :total], w_full)
        assert rel_err(ours[0][:, : stop - start], theirs[0][:, start:stop]) <= 1e-5
        for ours_kv, theirs_kv in zip(ours[1:], theirs[1:], strict=True):
            assert rel_err(ours_kv[:, :total], theirs_kv) <= 1e-5
            assert float(jnp.abs(ours_kv[:, total:]).max()) == 0.0
    assert step._cache_size() == 1 and ours_grads._cache_size() == 1  # one program for every offset


def test_kv_len_reads_only_the_filled_keys():
    """Non-causal queries over a cache filled to ``kv_len``: einsum over the filled keys; the slots past it NaN."""
    q, k, v = qkv(2, 6, 24, 4, 4, 16, seed=6)
    valid = padding(2, 24, "left", n=3)
    for kv_len in (5, 13):
        ref = einsum(q, k[:, :kv_len], v[:, :kv_len], jnp.asarray(valid[:, :kv_len]))
        bad_k, bad_v = (x.at[:, 16:].set(jnp.nan) for x in (k, v))  # whole blocks past kv_len: never read
        out = blockwise(q, bad_k, bad_v, jnp.asarray(valid), causal=False, kv_len=jnp.int32(kv_len),
                        block_q=4, block_k=8)
        assert rel_err(out, ref) <= 1e-5


def test_causal_blocks_above_the_diagonal_are_not_read():
    """NaN keys and values in the last key block: the query blocks that end before it stay exact (a masked read
    would give NaN: NaN + the float32 minimum is NaN)."""
    t = 32
    q, k, v = qkv(1, t, t, 4, 2, 16, seed=7)
    ref = einsum(q, k, v, None, causal=True)
    bad_k, bad_v = (x.at[:, 24:].set(jnp.nan) for x in (k, v))
    out = blockwise(q, bad_k, bad_v, None, block_q=8, block_k=8)
    assert rel_err(out[:, :24], ref[:, :24]) <= 1e-5
    assert np.isnan(np.asarray(out[:, 24:])).all()  # and the ones that reach it do read it


@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_non_causal_key_padding_equals_einsum(heads):
    """The vision tower's form: no causality, a non-contiguous patch mask, a row with a single valid patch."""
    nh, nkv = heads
    q, k, v = qkv(3, 16, 16, nh, nkv, 8, seed=8)
    valid = np.ones((3, 16), bool)
    valid[1, [2, 3, 6, 7, 10, 11, 14, 15]] = False
    valid[2, 1:] = False
    ref = einsum(q, k, v, jnp.asarray(valid))
    run = lambda a, b_, c: blockwise(a, b_, c, jnp.asarray(valid), causal=False, block_q=8, block_k=4)  # noqa: E731
    assert rel_err(run(q, k, v), ref) <= 1e-5
    weight = jax.random.normal(jax.random.key(9), q.shape)
    theirs = grads(lambda a, b_, c: einsum(a, b_, c, jnp.asarray(valid)), q, k, v, weight)
    for a, b_ in zip(grads(run, q, k, v, weight), theirs, strict=True):
        assert rel_err(a, b_) <= 1e-5


def test_bfloat16_within_bfloat16_and_accumulated_in_float32():
    q, k, v = qkv(2, 40, 40, 4, 2, 32, seed=10, dtype=jnp.bfloat16)
    valid = jnp.asarray(padding(2, 40, "right"))
    exact = einsum(*(x.astype(jnp.float32) for x in (q, k, v)), valid, causal=True)
    out = blockwise(q, k, v, valid, block_q=8, block_k=8)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, exact) <= 1e-2  # float32 scores and sums (einsum's bfloat16 scores need 2e-2)
    weight = jax.random.normal(jax.random.key(11), q.shape)
    theirs = grads(lambda a, b_, c: einsum(a, b_, c, valid, causal=True), *(x.astype(jnp.float32) for x in (q, k, v)),
                   weight)
    ours = grads(lambda a, b_, c: blockwise(a, b_, c, valid, block_q=8, block_k=8), q, k, v, weight)
    for a, b_ in zip(ours, theirs, strict=True):
        assert a.dtype == jnp.bfloat16
        assert rel_err(a, b_) <= 3e-2


def test_never_holds_the_whole_score_array():
    """The compiled forward + backward's temporaries stay far below one (heads, T, S) float32 score array (einsum's
    hold several)."""
    t, nh, hd = 512, 4, 16
    q, k, v = qkv(1, t, t, nh, nh, hd, seed=12)
    scores_bytes = nh * t * t * 4

    def temp(fn):
        step = jax.jit(jax.grad(lambda a, b_, c: jnp.sum(fn(a, b_, c)), argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp(lambda a, b_, c: plain.attention(a, b_, c, causal=True)) >= scores_bytes  # the measure can fail
    assert temp(lambda a, b_, c: flash.flash_attention(a, b_, c, block_q=64, block_k=64)) < scores_bytes / 4


@pytest.mark.slow  # a compilation per example (~1 s)
@settings(max_examples=max(20, settings().max_examples // 12))  # 20; HYPOTHESIS_PROFILE=slow: 166
@given(data=st.data())
def test_random_shapes_equal_einsum(data):
    causal = data.draw(st.booleans(), "causal")
    nkv = data.draw(st.integers(1, 3), "kv heads")
    nh = nkv * data.draw(st.integers(1, 3), "group")
    t = data.draw(st.integers(1, 24), "T")
    s = t if causal else data.draw(st.integers(1, 24), "S")
    hd = data.draw(st.sampled_from([8, 16]), "H")
    bq, bk = data.draw(st.integers(1, 16), "block_q"), data.draw(st.integers(1, 16), "block_k")
    valid = np.asarray(data.draw(st.lists(st.booleans(), min_size=2 * s, max_size=2 * s), "valid")).reshape(2, s)
    q, k, v = qkv(2, t, s, nh, nkv, hd, seed=t * 31 + s)
    ref = einsum(q, k, v, jnp.asarray(valid), causal=causal)
    out = blockwise(q, k, v, jnp.asarray(valid), causal=causal, block_q=bq, block_k=bk)
    assert rel_err(out, ref) <= 1e-5


def test_bad_arguments_say_what_is_wrong():
    q, k, v = qkv(1, 4, 6, 4, 3, 8, seed=13)
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        flash.flash_attention(q, k, v)
    with pytest.raises(ValueError, match=r"keys \(1, 6, 3, 8\) and values \(1, 5, 3, 8\) do not match"):
        flash.flash_attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"key_valid must be \(B, S\) = \(1, 6\), got \(1, 4\)"):
        flash.flash_attention(q, k[:, :, :2], v[:, :, :2], jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="block sizes must be positive, got block_q=0"):
        flash.flash_attention(q, k[:, :, :2], v[:, :, :2], block_q=0)
