"""The accelerators' expert kernels (kernels.pallas_gmm, kernels.grouped_experts) in Pallas interpret mode on CPU:
values and gradients against the dense reference computed in the same test, for float and quantized (int8, int4)
experts, with LoRA pairs, empty and uneven groups; and a whole model on the ``pallas`` backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import quant
from aria_jax.config import PRESETS
from aria_jax.inference.api import Aria
from aria_jax.kernels import experts as ex
from aria_jax.kernels import grouped_experts, pallas_gmm
from aria_jax.kernels.quantized import QWeight, dense
from tests.conftest import rel_err

KINDS = ["float32", "int8", "int4-packed", "int4"]
RANK = 4


def needs(backend: str) -> None:
    if backend == "tokamax":
        pytest.importorskip("tokamax")
    if backend == "megablox" and grouped_experts.megablox_gmm is None:
        pytest.skip("this jax has no megablox")


def qweight(w: np.ndarray, kind: str) -> QWeight:
    fmt, packed = kind.split("-")[0], kind.endswith("packed")
    q, scale = quant.quantize(w, 1, 1, quant.QuantSpec(fmt, 32), packed)
    return QWeight(jnp.asarray(q), jnp.asarray(scale), tuple(w.shape[2:]))


def case(t: int = 13, e: int = 6, d: int = 64, f: int = 24, k: int = 2, seed: int = 0):
    """Tokens routed over uneven experts, two of them (1 and 4) never chosen: groups of size 0."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, d)).astype(np.float32))
    gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32) * 0.1
    down = rng.standard_normal((e, f, d)).astype(np.float32) * 0.1
    chosen = np.array([0, 2, 3, 5])
    ids = np.stack([rng.choice(chosen, k, replace=False, p=[0.5, 0.3, 0.15, 0.05]) for _ in range(t)])
    weights = jnp.asarray(rng.uniform(size=(t, k)).astype(np.float32))
    normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1)  # noqa: E731
    lora = ex.ExpertLora((normal(e, d, RANK), normal(e, RANK, 2 * f)), (normal(e, f, RANK), normal(e, RANK, d)))
    return x, weights, jnp.asarray(ids.astype(np.int32)), gate_up, down, lora


@pytest.mark.parametrize("sizes", [[0, 5, 1, 0, 12, 3], [21], [0, 0, 7]])
def test_gmm_equals_the_per_row_matmul_in_values_and_gradients(sizes):
    rng = np.random.default_rng(len(sizes))
    m, g, k, n = sum(sizes), len(sizes), 48, 24  # three K slices of 16, three N tiles of 8
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((g, k, n)).astype(np.float32))
    groups = jnp.asarray(sizes, jnp.int32)
    row_group = jnp.asarray(np.repeat(np.arange(g), sizes))
    reference = lambda x, w: jnp.einsum("mk,mkn->mn", x, w[row_group])  # noqa: E731
    kernel = lambda x, w: pallas_gmm.gmm(x, w, groups, interpret=True, tm=8)  # noqa: E731
    assert rel_err(jax.jit(kernel)(x, w), reference(x, w)) <= 1e-5
    loss = lambda fn: lambda x, w: (fn(x, w) ** 2).sum()  # noqa: E731
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(reference), argnums=(0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-5
    assert not np.asarray(got[1][np.asarray(sizes) == 0]).any()  # an empty group's weight gets no gradient


def test_tile_layout_pads_each_group_to_whole_tiles():
    layout = pallas_gmm.tile_layout(jnp.asarray([3, 0, 9, 1], jnp.int32), 13, 4)
    assert layout.num_tiles == 4 + 4
    np.testing.assert_array_equal(layout.dest, [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16])
    np.testing.assert_array_equal(layout.tile_group, [0, 2, 2, 2, 3, 4, 4, 4])  # 4: unused tiles
    np.testing.assert_array_equal(layout.tile_start, [0, 1, 1, 4, 5])


def _weights(kind: str, gate_up, down):
    if kind == "float32":
        return jnp.asarray(gate_up), jnp.asarray(down), jnp.asarray(gate_up), jnp.asarray(down)
    qg, qd = qweight(gate_up, kind), qweight(down, kind)
    return qg, qd, dense(qg), dense(qd)


@pytest.mark.each_value_once
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["pallas", "megablox", "tokamax"])
def test_backend_equals_dense_values_and_gradients(backend, kind):
    needs(backend)
    x, weights, ids, gate_up, down, _ = case()
    gu, dn, ref_gu, ref_dn = _weights(kind, gate_up, down)

    def run(x, gu, dn):
        return ex.run_experts(x, weights, ids, ex.ExpertWeights(gu, dn), backend, "blocked", interpret=True)

    def reference(x, gu, dn):
        return ex.experts_dense(x, weights, ids, gu, dn)

    assert rel_err(jax.jit(run)(x, gu, dn), reference(x, ref_gu, ref_dn)) <= 1e-5
    loss = lambda fn: lambda *a: (fn(*a) ** 2).sum()  # noqa: E731
    argnums = (0, 1, 2) if kind == "float32" else (0,)  # quantized experts are frozen
    got = jax.jit(jax.grad(loss(run), argnums=argnums))(x, gu, dn)
    want = jax.grad(loss(reference), argnums=argnums)(x, ref_gu, ref_dn)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.each_value_once
@pytest.mark.parametrize("kind", ["float32", "int4-packed"])
@pytest.mark.parametrize("backend", ["pallas", "megablox", "tokamax"])
def test_backend_runs_lora_unmerged_with_the_gradients_of_the_merged_reference(backend, kind):
    needs(backend)
    x, weights, ids, gate_up, down, lora = case(seed=1)
    gu, dn, ref_gu, ref_dn = _weights(kind, gate_up, down)
    pairs = {"gate_up": lora.gate_up, "down": lora.down}

    def run(x, pairs):
        experts = ex.ExpertWeights(gu, dn, ex.ExpertLora(pairs["gate_up"], pairs["down"]))
        return ex.run_experts(x, weights, ids, experts, backend, "blocked", interpret=True)

    def reference(x, pairs):  # the pairs merged into the (dequantized) weights
        return ex.experts_dense(x, weights, ids, ref_gu, ref_dn, ex.ExpertLora(pairs["gate_up"], pairs["down"]))

    assert rel_err(jax.jit(run)(x, pairs), reference(x, pairs)) <= 1e-5
    loss = lambda fn: lambda *a: (fn(*a) ** 2).sum()  # noqa: E731
    got = jax.jit(jax.grad(loss(run), argnums=(0, 1)))(x, pairs)
    want = jax.grad(loss(reference), argnums=(0, 1))(x, pairs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_auto_keeps_gather_for_decode_and_takes_the_platform_kernel_for_more_rows():
    assert ex.choose_backend("auto", 8, 64, "pallas") == "gather"
    assert ex.choose_backend("auto", 512, 64, "pallas") == "pallas"
    assert ex.choose_backend("auto", 512, 64, "megablox") == "megablox"


def test_a_model_on_the_pallas_backend_equals_the_dense_one():
    config = PRESETS["tiny"]
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.text.vocab_size, (2, 9)), jnp.int32)
    dense = Aria.from_config(config, moe_backend="dense", layout="stacked")
    pallas = Aria(config, dense.params, moe_backend="pallas", layout="stacked")
    out = {"pallas": pallas.forward(ids), "dense": dense.forward(ids)}
    assert rel_err(out["pallas"], out["dense"]) <= 1e-5


def test_tokamax_is_listed_only_where_installed_and_its_absence_is_one_clear_error():
    names = ex.available_backends()
    assert {"pallas", "megablox", "gather", "dense"} <= set(names)
    assert ("tokamax" in names) == grouped_experts.tokamax_installed()
    if grouped_experts.tokamax_installed():
        return
    x, weights, ids, gate_up, down, _ = case()
    with pytest.raises(ImportError, match=r"pip install 'aria-jax\[gpu\]'"):
        ex.run_experts(x, weights, ids, ex.ExpertWeights(jnp.asarray(gate_up), jnp.asarray(down)), "tokamax")
