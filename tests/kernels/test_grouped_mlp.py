"""The CPU grouped expert MLP and its hand-written VJP against a direct per-row computation and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from aria_jax.kernels.grouped_mlp import CHUNKS, SLACK, grouped_mlp, grouped_mlp_split


def reference(rows, sizes, gate_up, down):
    """Row i through expert e(i)'s SwiGLU MLP, rows past sum(sizes) zero: one row at a time, plain autodiff."""
    expert = np.repeat(np.arange(len(sizes)), sizes)
    n = len(expert)
    h = jnp.einsum("nd,ndf->nf", rows[:n], gate_up[expert])
    gate, up = jnp.split(h, 2, axis=-1)
    y = jnp.einsum("nf,nfd->nd", jax.nn.silu(gate) * up, down[expert])
    return jnp.concatenate([y, jnp.zeros((rows.shape[0] - n, rows.shape[1]), y.dtype)])


# Sizes exercising every chunk path: empty experts, exact chunk multiples, remainders just above a chunk size,
# several full chunks, and a last expert whose last chunk runs into the slack.
SIZES = {
    "mixed": [0, 1, 16, 17, 33, 64, 65, 128, 129, 300, 0, 97],
    "last_overshoots": [5, 0, 65],
    "one_expert": [257],
    "unowned_tail": [3, 40, 0],  # rows past sum(sizes) (other shards' pairs under expert parallelism) give zero
}


def split(chunks):
    """grouped_mlp_split (one array per expert) behind grouped_mlp's signature."""
    return lambda rows, sizes, gate_up, down: grouped_mlp_split(rows, sizes, tuple(gate_up), tuple(down), chunks)


# The stacked (E, ...) weights, and one array per expert with grouped_mlp's chunks or single rows (decode).
VARIANTS = {"stacked": grouped_mlp, "split": split(CHUNKS), "split_rows": split((1,))}


@pytest.mark.each_value_once
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(SIZES))
def test_forward_and_gradients_match_reference(case, variant):
    fn = VARIANTS[variant]
    sizes = np.asarray(SIZES[case], np.int32)
    rng = np.random.default_rng(len(case))
    e, d, f = len(sizes), 12, 10
    n = int(sizes.sum()) + (7 if case == "unowned_tail" else 0)
    rows = jnp.asarray(rng.standard_normal((n + SLACK, d)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((e, d, 2 * f)) * 0.3, jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32)
    probe = jnp.asarray(rng.standard_normal((n + SLACK, d)), jnp.float32)

    out = jax.jit(fn)(rows, sizes, gate_up, down)
    ref = reference(rows, sizes, gate_up, down)
    assert rel_err(out, ref) <= 1e-5
    assert not np.any(np.asarray(out[int(sizes.sum()):]))

    def loss(fn, rows, gate_up, down):
        return jnp.sum(fn(rows, sizes, gate_up, down) * probe)

    got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(rows, gate_up, down)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(rows, gate_up, down)
    for g, w, name in zip(got, want, ("rows", "gate_up", "down"), strict=True):
        assert rel_err(g, w) <= 1e-5, name
    assert not np.any(np.asarray(got[0][int(sizes.sum()):])), "no gradient may reach unowned or slack rows"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bfloat16_gradients_accumulate_in_float32(variant):
    sizes = np.asarray([200, 3], np.int32)
    rng = np.random.default_rng(3)
    rows = jnp.asarray(rng.standard_normal((203 + SLACK, 16)), jnp.bfloat16)
    gate_up = jnp.asarray(rng.standard_normal((2, 16, 8)) * 0.3, jnp.bfloat16)
    down = jnp.asarray(rng.standard_normal((2, 4, 16)) * 0.3, jnp.bfloat16)
    grads = jax.grad(lambda g, d: VARIANTS[variant](rows, sizes, g, d).astype(jnp.float32).sum(), argnums=(0, 1))(
        gate_up, down)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    f32 = jax.grad(lambda g, d: reference(rows.astype(jnp.float32), sizes, g, d).sum(), argnums=(0, 1))(
        gate_up.astype(jnp.float32), down.astype(jnp.float32))
    for g, w in zip(grads, f32, strict=True):
        assert rel_err(g.astype(jnp.float32), w) <= 2e-2


def test_chunks_are_descending_powers_of_two():
    assert list(CHUNKS) == sorted(CHUNKS, reverse=True) and all(c & (c - 1) == 0 for c in CHUNKS)
    assert SLACK >= CHUNKS[0] // 2
