"""Shared building blocks: ``project``'s single-row split matvec equals the plain contraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import layers


@pytest.mark.parametrize("lead, w_shape, n_in", [((1, 1), (64, 4, 8), 1), ((1, 1), (4, 8, 64), 2),
                                                 ((3, 5), (64, 96), 1), ((1,), (66, 10), 1), ((2, 1), (4, 8, 6), 2)])
def test_project_matches_tensordot(lead, w_shape, n_in):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, *w_shape[:n_in])).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    ref = np.tensordot(x.astype(np.float64), w.astype(np.float64), n_in)
    out = np.asarray(jax.jit(layers.project, static_argnums=2)(x, w, n_in))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_single_row_runs_as_a_batch_of_matvecs():
    """One row on CPU: a batched dot over MATVEC_SPLIT slices of the contraction (the multi-core matvec)."""
    x, w = jnp.ones((1, 1, 64)), jnp.ones((64, 32))
    dots = [e for e in jax.make_jaxpr(layers.project)(x, w).eqns if e.primitive.name == "dot_general"]
    batched = [e for e in dots if e.params["dimension_numbers"][1][0]]
    expect = 1 if jax.default_backend() == "cpu" and layers.MATVEC_SPLIT > 1 else 0
    assert len(dots) == 1 and len(batched) == expect
    many = jax.make_jaxpr(layers.project)(jnp.ones((2, 3, 64)), w).eqns
    assert not [e for e in many if e.primitive.name == "dot_general" and e.params["dimension_numbers"][1][0]]
