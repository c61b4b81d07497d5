"""The attention kernel's implementations (aria_jax.kernels.attention) against a float64 reference of transformers'
eager attention and against each other, values and gradients: causal + left/right padding, GQA/MHA, key padding,
query chunks, and cuDNN's sequence-length form run through XLA on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from aria_jax.kernels import attention as kernel
from aria_jax.kernels.attention import cudnn_fits
from aria_jax.runtime import ATTENTION_KERNELS

# jitted: one compilation per form instead of one per operation
attention = jax.jit(kernel.attention, static_argnames=("causal", "implementation", "scale", "query_chunk"))
_by_lengths = jax.jit(kernel._by_lengths, static_argnums=(4, 5, 6))


def reference(q, k, v, key_valid, causal, scale=None) -> np.ndarray:
    """transformers' eager attention in float64: repeat_kv, scores * scale, the float32 minimum where masked."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, nh, hd = q.shape
    s, nkv = k.shape[1], k.shape[2]
    k, v = np.repeat(k, nh // nkv, axis=2), np.repeat(v, nh // nkv, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) * (hd**-0.5 if scale is None else scale)
    mask = np.ones((b, 1, t, s), bool)
    if key_valid is not None:
        mask &= np.asarray(key_valid, bool)[:, None, None, :]
    if causal:
        mask &= np.tril(np.ones((t, s), bool))
    scores = scores + np.where(mask, 0.0, np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


def qkv(b, t, s, nh, nkv, hd, seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype)
                 for kk, shape in zip(keys, [(b, t, nh, hd), (b, s, nkv, hd), (b, s, nkv, hd)], strict=True))


def padding(b, t, kind):
    """(B, T) validity: row 0 full; row 1 padded on the left (generation), right (training batches) or with holes."""
    valid = np.ones((b, t), bool)
    if kind == "left":
        valid[1, :5] = False
    elif kind == "right":
        valid[1, -4:] = False
    elif kind == "holes":
        valid[1, [0, 3, 4, 9]] = False
    return jnp.asarray(valid)


def grads(fn, q, k, v, weight):
    """d/d(q, k, v) of sum(fn(q, k, v) * weight)."""
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weight), argnums=(0, 1, 2)))(q, k, v)


HEADS = {"gqa": (4, 2), "mha": (4, 4), "mqa": (4, 1)}


@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_xla_equals_einsum_causal_padded(heads, pad):
    nh, nkv = HEADS[heads]
    q, k, v = qkv(2, 13, 13, nh, nkv, 16, seed=1)
    valid = padding(2, 13, pad)
    ref = reference(q, k, v, valid, causal=True)
    outs = {impl: attention(q, k, v, valid, causal=True, implementation=impl) for impl in ("einsum", "xla")}
    # every row, the fully masked left-pad ones too: both give them a uniform distribution over all keys
    for out in outs.values():
        assert np.isfinite(np.asarray(out)).all()
        assert rel_err(out, ref) <= 1e-5
    assert rel_err(outs["xla"], outs["einsum"]) <= 1e-5
    weight = jax.random.normal(jax.random.key(9), q.shape)
    g = {}
    for impl in ("einsum", "xla"):
        g[impl] = grads(lambda a, b_, c, impl=impl: attention(a, b_, c, valid, causal=True, implementation=impl),
                        q, k, v, weight)
    for ours, theirs in zip(g["xla"], g["einsum"], strict=True):
        assert rel_err(ours, theirs) <= 1e-5


def test_the_padding_mask_is_applied():
    q, k, v = qkv(2, 13, 13, 4, 2, 16, seed=2)
    out = attention(q, k, v, padding(2, 13, "left"), causal=True, implementation="xla")
    unmasked = reference(q, k, v, None, causal=True)
    assert rel_err(np.asarray(out)[1, 5:], unmasked[1, 5:]) > 1e-2  # ignoring the padding would pass otherwise
    assert rel_err(np.asarray(out)[0], unmasked[0]) <= 1e-5


@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_bfloat16_implementations_agree_within_bfloat16(heads):
    nh, nkv = HEADS[heads]
    q, k, v = qkv(2, 13, 13, nh, nkv, 16, seed=3, dtype=jnp.bfloat16)
    valid = padding(2, 13, "left")
    ref = reference(q, k, v, valid, causal=True)
    outs = {impl: attention(q, k, v, valid, causal=True, implementation=impl) for impl in ("einsum", "xla")}
    for out in outs.values():
        assert out.dtype == jnp.bfloat16
        assert rel_err(out, ref) <= 2e-2  # einsum rounds the scores to bfloat16 (as transformers), xla does not
    assert rel_err(outs["xla"], outs["einsum"]) <= 2e-2


@pytest.mark.parametrize("chunk", [None, 7, 16])
def test_key_padding_with_query_chunks(chunk):
    """The vision tower's form: no causality, a non-contiguous patch mask, queries in chunks."""
    q, k, v = qkv(3, 16, 16, 4, 4, 8, seed=4)
    valid = np.ones((3, 16), bool)
    valid[1, [2, 3, 6, 7, 10, 11, 14, 15]] = False  # a 4x4 patch grid whose right half is padding
    valid[2, 1:] = False  # a single valid patch
    valid = jnp.asarray(valid)
    ref = reference(q, k, v, valid, causal=False)
    weight = jax.random.normal(jax.random.key(8), q.shape)
    g = {}
    for impl in ("einsum", "xla"):
        run = lambda a, b_, c, impl=impl: attention(a, b_, c, valid, implementation=impl, query_chunk=chunk)  # noqa: E731
        assert rel_err(run(q, k, v), ref) <= 1e-5
        g[impl] = grads(run, q, k, v, weight)
    for ours, theirs in zip(g["xla"], g["einsum"], strict=True):
        assert rel_err(ours, theirs) <= 1e-5


def test_cross_attention_with_a_prescaled_query():
    """The projector's form: fewer queries than keys, the scale already in the query (scale=1)."""
    q, k, v = qkv(2, 4, 9, 2, 2, 8, seed=5)
    valid = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [3]]))
    ref = reference(q * 0.5, k, v, valid, causal=False, scale=1.0)
    for impl in ("einsum", "xla"):
        assert rel_err(attention(q * 0.5, k, v, valid, implementation=impl, scale=1.0), ref) <= 1e-5


@pytest.mark.parametrize("pad", ["left", "right", "holes", "none"])
@pytest.mark.parametrize("causal", [True, False])
def test_sequence_length_form_equals_the_masked_one(pad, causal):
    """cuDNN's form (valid keys moved first, masked by count) run through XLA: every valid query is exact, values
    and gradients, and so is every row of a right-padded batch (training's) and of non-causal attention."""
    q, k, v = qkv(2, 13, 13, 4, 2, 16, seed=6)
    valid = None if pad == "none" else padding(2, 13, pad)
    ours = _by_lengths(q, k, v, valid, causal, 16**-0.5, "xla")
    ref = reference(q, k, v, valid, causal)
    rows = np.ones((2, 13), bool)
    if causal and pad != "none":  # a padded query reads all its row's valid keys here: exact after the last one
        mask = np.asarray(valid)
        last = np.array([np.flatnonzero(m).max() for m in mask])
        rows = mask | (np.arange(13)[None, :] >= last[:, None])
    assert np.isfinite(np.asarray(ours)).all()
    assert rel_err(np.asarray(ours)[rows], ref[rows]) <= 1e-5
    weight = jax.random.normal(jax.random.key(7), q.shape) * rows[:, :, None, None]
    masked = grads(lambda a, b_, c: attention(a, b_, c, valid, causal=causal, implementation="xla"), q, k, v, weight)
    by_length = grads(lambda a, b_, c: _by_lengths(a, b_, c, valid, causal, 16**-0.5, "xla"), q, k, v, weight)
    for a, b_ in zip(by_length, masked, strict=True):
        assert rel_err(a, b_) <= 1e-5


def test_cudnn_takes_half_precision_and_its_head_dims_only():
    assert cudnn_fits(jnp.zeros((1, 2, 1, 128), jnp.bfloat16)) and cudnn_fits(jnp.zeros((1, 2, 1, 72), jnp.float16))
    assert not cudnn_fits(jnp.zeros((1, 2, 1, 128), jnp.float32))
    assert not cudnn_fits(jnp.zeros((1, 2, 1, 12), jnp.bfloat16))
    assert not cudnn_fits(jnp.zeros((1, 2, 1, 256), jnp.bfloat16))
    q, k, v = qkv(2, 13, 13, 4, 2, 16, seed=7)  # float32: cudnn runs the xla implementation (here, on CPU)
    valid = padding(2, 13, "left")
    np.testing.assert_array_equal(attention(q, k, v, valid, causal=True, implementation="cudnn"),
                                  attention(q, k, v, valid, causal=True, implementation="xla"))


def test_bad_arguments_say_what_is_wrong():
    q, k, v = qkv(1, 4, 6, 4, 3, 8, seed=8)
    assert ATTENTION_KERNELS == ("einsum", "flash", "xla", "cudnn")
    with pytest.raises(ValueError, match="unknown attention kernel 'splash'"):
        kernel.attention(q, k[:, :, :2], v[:, :, :2], implementation="splash")
    with pytest.raises(ValueError, match="4 query heads cannot share 3 key/value heads"):
        kernel.attention(q, k, v)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys, got 4 and 6"):
        kernel.attention(q, k[:, :, :2], v[:, :, :2], causal=True)
