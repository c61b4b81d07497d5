"""QLoRA's gradients through the routed experts: every expert backend on quantized (int8, int4 packed and unpacked)
stacked expert weights gives the LoRA pairs the gradients of the dense reference on the dequantized weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import quant
from aria_jax.kernels import experts as ex
from aria_jax.kernels.quantized import QWeight, dense
from tests.conftest import rel_err

FORMATS = [("int8", True), ("int4", True), ("int4", False)]
RANK = 4


def qweight(w: np.ndarray, fmt: str, packed: bool, fused_rows: int) -> QWeight:
    """A stacked (E, in, out) expert weight quantized per expert and channel (lead=1, n_in=1)."""
    q, scale = quant.quantize(w, 1, 1, quant.QuantSpec(fmt), packed)
    return QWeight(jnp.asarray(q), jnp.asarray(scale), tuple(w.shape[2:]), fused_rows)


def case(t: int, e: int = 6, d: int = 256, f: int = 64, k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)).astype(np.float32))
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32) * 0.1
    down = rng.standard_normal((e, f, d)).astype(np.float32) * 0.1
    ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32))
    weights = jnp.asarray(rng.uniform(size=(t, k)).astype(np.float32))
    normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1)  # noqa: E731
    lora = {"gate_up": (normal(e, d, RANK), normal(e, RANK, 2 * f)), "down": (normal(e, f, RANK), normal(e, RANK, d))}
    return x, weights, ids, gate_up, down, lora


def lora_grads(backend: str, x, weights, ids, gate_up, down, lora) -> dict:
    """d/d(A, B) of sum(out**2) through ``run_experts``."""
    def loss(pairs):
        experts = ex.ExpertWeights(gate_up, down, ex.ExpertLora(pairs["gate_up"], pairs["down"]))
        out = ex.run_experts(x, weights, ids, experts, backend, "blocked")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss))(lora)


def assert_close(grads: dict, ref: dict, tol: float) -> None:
    for site in ("gate_up", "down"):
        for i, name in enumerate("ab"):
            err = rel_err(grads[site][i], ref[site][i])
            assert err <= tol, (site, name, err)


@pytest.mark.each_value_once
@pytest.mark.parametrize("fmt,packed", FORMATS)
@pytest.mark.parametrize("backend", sorted(ex.available_backends()))
@pytest.mark.parametrize("fused_rows", [0, 16])
def test_lora_gradient_on_quantized_experts_equals_the_dense_reference(fmt, packed, backend, fused_rows):
    x, weights, ids, gate_up, down, lora = case(37)
    qg, qd = qweight(gate_up, fmt, packed, fused_rows), qweight(down, fmt, packed, fused_rows)
    grads = lora_grads(backend, x, weights, ids, qg, qd, lora)
    ref = lora_grads("dense", x, weights, ids, dense(qg), dense(qd), lora)  # float arrays: the dequantized weights
    assert_close(grads, ref, 1e-5)


@pytest.mark.parametrize("backend", ["gather", "blocked", "ragged"])
def test_decode_sized_batches_too(backend):
    """A few rows (gather's regime, blocks of one expert's rows) on int4 one value per byte, as the CPU holds it."""
    x, weights, ids, gate_up, down, lora = case(2, seed=1)
    qg, qd = qweight(gate_up, "int4", False, 16), qweight(down, "int4", False, 16)
    grads = lora_grads(backend, x, weights, ids, qg, qd, lora)
    ref = lora_grads("dense", x, weights, ids, dense(qg), dense(qd), lora)
    assert_close(grads, ref, 1e-5)


def test_the_reference_sees_the_quantization():
    """The comparison can fail: the LoRA gradients over the int4 weights differ from those over the float ones by far
    more than the tolerance, so a backend that read the float weights (or lost the scales) would be caught."""
    x, weights, ids, gate_up, down, lora = case(37)
    qg, qd = qweight(gate_up, "int4", True, 0), qweight(down, "int4", True, 0)
    quantized = lora_grads("blocked", x, weights, ids, qg, qd, lora)
    float_base = lora_grads("dense", x, weights, ids, jnp.asarray(gate_up), jnp.asarray(down), lora)
    assert rel_err(quantized["gate_up"][0], float_base["gate_up"][0]) > 1e-3
