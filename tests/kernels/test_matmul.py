"""``project``'s single-row split matvec equals the plain contraction; the runtime picks the split on CPU only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax.kernels.matmul import project
from aria_jax.runtime import Runtime, detect, platform


@pytest.mark.parametrize("lead, w_shape, n_in", [((1, 1), (64, 4, 8), 1), ((1, 1), (4, 8, 64), 2),
                                                 ((3, 5), (64, 96), 1), ((1,), (66, 10), 1), ((2, 1), (4, 8, 6), 2)])
def test_project_matches_tensordot(lead, w_shape, n_in):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, *w_shape[:n_in])).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    ref = np.tensordot(x.astype(np.float64), w.astype(np.float64), n_in)
    out = np.asarray(jax.jit(project, static_argnums=(2, 3))(x, w, n_in, 2))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_single_row_runs_as_a_batch_of_matvecs():
    """One row with split 2: a batched dot over two slices of the contraction (the multi-core matvec); several rows
    or split 1: one plain dot. The runtime asks for 2 on CPU only."""
    x, w = jnp.ones((1, 1, 64)), jnp.ones((64, 32))

    def dots(x, split):
        eqns = [e for e in jax.make_jaxpr(lambda x, w: project(x, w, split=split))(x, w).eqns
                if e.primitive.name == "dot_general"]
        return len(eqns), len([e for e in eqns if e.params["dimension_numbers"][1][0]])

    assert dots(x, 2) == (1, 1) and dots(x, 1) == (1, 0) and dots(jnp.ones((2, 3, 64)), 2) == (1, 0)
    assert detect().matvec_split == (2 if platform() == "cpu" else 1) and Runtime().matvec_split == 1


def test_several_rows_run_as_one_2d_dot_and_so_do_the_gradients():
    """Leading axes are flattened into one row axis: the forward dot and both gradient dots are 2-D with a single
    contracting axis (XLA:CPU otherwise writes a transposed copy of the cotangent for the weight's gradient), and
    the gradients equal float64 references."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8, 6)).astype(np.float32)
    ct = rng.standard_normal((2, 3, 6)).astype(np.float32)

    def loss(x, w):
        return jnp.sum(project(x, w, 2) * ct)

    eqns = [e for e in jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).eqns if e.primitive.name == "dot_general"]
    assert len(eqns) == 3
    for e in eqns:
        (contract_lhs, contract_rhs), (batch_lhs, _) = e.params["dimension_numbers"]
        assert [v.aval.ndim for v in e.invars] == [2, 2] and len(contract_lhs) == len(contract_rhs) == 1 and not batch_lhs

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    x64, w64, ct64 = (a.astype(np.float64) for a in (x, w, ct))
    np.testing.assert_allclose(dw, np.tensordot(x64, ct64, ((0, 1), (0, 1))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.tensordot(ct64, w64, ((2,), (2,))), rtol=1e-5, atol=1e-5)
