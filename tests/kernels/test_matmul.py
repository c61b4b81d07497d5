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
