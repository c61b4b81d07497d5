"""Quantized weights (aria_jax.quant, aria_jax.kernels.quantized): the formats' math, every matmul form and every
expert backend against the dense reference on the dequantized weights, and the CPU decode forms' compiled HLO
(they must read the int8 bytes, not a float copy of the weight)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aria_jax import quant
from aria_jax.kernels import experts as ex
from aria_jax.kernels.matmul import project
from aria_jax.kernels.quantized import QWeight, dense, unpack_int4
from tests.conftest import rel_err

FORMATS = [("int8", True), ("int4", True), ("int4", False)]


def qweight(w: np.ndarray, lead: int, n_in: int, fmt: str, packed: bool, fused_rows: int = 0, group: int = 128
            ) -> QWeight:
    spec = quant.QuantSpec(fmt, group)
    q, scale = quant.quantize(w, lead, n_in, spec, packed)
    return QWeight(jnp.asarray(q), jnp.asarray(scale), tuple(w.shape[lead + n_in :]), fused_rows)


@given(st.integers(1, 4), st.sampled_from([2, 4, 16, 128]), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_and_jax_matches_numpy(groups, group, seed):
    q = np.random.default_rng(seed).integers(-8, 8, (3, groups * group)).astype(np.int8)
    packed = quant.pack_int4(q, group)
    assert packed.dtype == np.uint8 and packed.shape == (3, groups * group // 2)
    np.testing.assert_array_equal(quant.unpack_int4(packed, group), q)
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed), group)), q)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_rounds_to_the_nearest_level_and_dequantize_inverts_the_layout(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 256, 5, 7)).astype(np.float32)  # (lead, in, *out): out axes kept
    w[1, :, 2] = 0.0  # an all-zero channel keeps a finite scale
    spec = quant.QuantSpec(fmt)
    q, scale = quant.quantize(w, 1, 1, spec)
    q_shape, s_shape, dtype = quant.stored_shapes(w.shape, 1, 1, spec)
    assert q.shape == q_shape and scale.shape == s_shape and q.dtype == dtype and np.isfinite(scale).all()
    back = quant.dequantize(q, scale, w.shape, 1, 1)
    assert back.shape == w.shape
    step = np.abs(w).max() / quant.QMAX[fmt]
    assert np.abs(back - w).max() <= step / 2 + 1e-6  # within half a level everywhere
    assert np.abs(back - w).max() > 0  # and really rounded
    np.testing.assert_array_equal(back[1, :, 2], 0.0)


def test_int4_groups_a_k_that_128_does_not_divide():
    assert quant.group_size(256, 128) == 128
    assert quant.group_size(96, 128) == 96
    assert quant.group_size(160, 128) == 80
    with pytest.raises(ValueError):
        quant.QuantSpec("int3")


@pytest.mark.each_value_once
@pytest.mark.parametrize("fmt,packed", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("fused_rows", [0, 16])
def test_every_matmul_form_equals_the_dequantized_weight(fmt, packed, rows, fused_rows):
    rng = np.random.default_rng(rows)
    for shape, n_in in (((256, 4, 6), 1), ((4, 64, 40), 2)):  # q_kernel-like (in, heads, hd); o_kernel-like
        w = rng.standard_normal(shape).astype(np.float32)
        qw = qweight(w, 0, n_in, fmt, packed, fused_rows)
        x = jnp.asarray(rng.standard_normal((rows, *shape[:n_in])).astype(np.float32))
        ref = jnp.tensordot(x, dense(qw).reshape(shape), n_in)
        out = jax.jit(lambda x, qw, n_in=n_in: project(x, qw, n_in))(x, qw)
        assert out.shape == (rows, *shape[n_in:])
        assert rel_err(out, ref) <= 1e-5


def routed_case(t: int, e: int = 6, d: int = 256, f: int = 64, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, d)).astype(np.float32)
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32)
    down = rng.standard_normal((e, f, d)).astype(np.float32)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(size=(t, k)).astype(np.float32)
    return x, weights, ids, gate_up, down


@pytest.mark.each_value_once
@pytest.mark.parametrize("fmt,packed", FORMATS)
@pytest.mark.parametrize("backend", ["gather", "blocked", "ragged", "dense", "auto"])
@pytest.mark.parametrize("t", [1, 4, 37])
def test_every_expert_backend_equals_the_dense_reference(fmt, packed, backend, t):
    x, weights, ids, gate_up, down = routed_case(t)
    qg, qd = (qweight(w, 1, 1, fmt, packed, fused_rows=16) for w in (gate_up, down))
    ref_gu, ref_dn = dense(qg), dense(qd)

    def run(x):
        return ex.run_experts(x, weights, ids, ex.ExpertWeights(qg, qd), backend, "blocked")

    def reference(x):
        return ex.experts_dense(x, weights, ids, ref_gu, ref_dn)

    assert rel_err(jax.jit(run)(x), reference(x)) <= 1e-5
    loss = lambda fn: lambda x: (fn(x) ** 2).sum()  # noqa: E731
    assert rel_err(jax.grad(loss(run))(x), jax.grad(loss(reference))(x)) <= 1e-5


@pytest.mark.parametrize("fmt,packed", FORMATS)
def test_per_expert_arrays_run_quantized(fmt, packed):
    """The unrolled layout's one array per expert (experts_split) on quantized weights."""
    x, weights, ids, gate_up, down = routed_case(23)
    qg = tuple(qweight(w, 0, 1, fmt, packed, 16) for w in gate_up)
    qd = tuple(qweight(w, 0, 1, fmt, packed, 16) for w in down)
    out = jax.jit(lambda x: ex.run_experts(x, weights, ids, ex.ExpertWeights(qg, qd)))(x)
    ref = ex.experts_dense(x, weights, ids, jnp.stack([dense(w) for w in qg]), jnp.stack([dense(w) for w in qd]))
    assert rel_err(out, ref) <= 1e-5


def float_buffers(hlo: str, min_elements: int) -> list[str]:
    """Float arrays of at least ``min_elements`` that a compiled module writes to memory: the results of the
    instructions of its top-level computations (ENTRY, loop bodies), not the values inside fusions."""
    found, inside_fusion = [], False
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")):  # a computation's header
            inside_fusion = bool(re.match(r"%(fused|wrapped|[\w.-]*fusion|[\w.-]*computation)", line))
            continue
        if inside_fusion or "=" not in line:
            continue
        for dims in re.findall(r"= (?:bf16|f16|f32)\[([\d,]*)\]", line):
            if dims and np.prod([int(v) for v in dims.split(",")]) >= min_elements:
                found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cpu_decode_forms_read_the_int8_bytes_without_a_float_copy(fmt):
    """One row and a few rows (the fused forms) compile to fusions that read the int8 values: no float array of
    the weight's size is written. The many-row form does write one (the check can fail)."""
    n, k = 512, 1024
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    qw = qweight(w, 0, 1, fmt, packed=False, fused_rows=16)
    for rows, copies in ((1, False), (8, False), (64, True)):
        x = jnp.ones((rows, k), jnp.float32)
        hlo = jax.jit(lambda x, qw: project(x, qw)).lower(x, qw).compile().as_text()
        assert bool(float_buffers(hlo, n * k)) == copies, (rows, float_buffers(hlo, n * k))
    # the routed experts' decode form: one fused matvec per (token, slot) pair, no gathered float copy
    x, weights, ids, gate_up, down = routed_case(2, e=8, d=512, f=256)
    qg, qd = (qweight(m, 1, 1, fmt, False, 16) for m in (gate_up, down))
    hlo = jax.jit(lambda x, qg, qd: ex.experts_gather(x, weights, ids, qg, qd)).lower(x, qg, qd).compile().as_text()
    assert not float_buffers(hlo, 256 * 512), float_buffers(hlo, 256 * 512)
