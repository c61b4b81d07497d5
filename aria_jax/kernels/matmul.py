"""Matrix products with a CPU-specific form: a single row times a weight as a batch of partial matvecs.

XLA:CPU runs one matvec on one core but a batch of them on all cores (bench/HISTORY.md, session 6), so
``aria_jax.runtime`` sets ``matvec_split`` to 2 on CPU and 1 elsewhere; the model passes it here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from aria_jax.kernels.quantized import QWeight, qproject


def project(x: jax.Array, w: jax.Array | QWeight, n_in: int = 1, split: int = 1) -> jax.Array:
    """``x`` (..., *in) times ``w`` (*in, *out), contracting the last ``n_in`` axes of x with the first of w, as one
    2-D dot over the flattened leading axes. A single row with ``split`` > 1 runs as ``split`` partial matvecs over
    slices of the contraction, summed. A quantized weight runs ``kernels.quantized.qproject``."""
    if isinstance(w, QWeight):
        return qproject(x, w, n_in)
    size_in = math.prod(w.shape[:n_in])
    rows = math.prod(x.shape[:-n_in])
    if rows != 1 or split == 1 or size_in % split:
        # One (rows, in) x (in, out) dot, whatever the leading axes: autodiff then takes the weight's gradient as a
        # dot with one contracting axis, which XLA:CPU runs on the cotangent in place; over (batch, seq) it wrote a
        # transposed copy of the cotangent first, fused into the activation's backward (2 of 6.5 ms per SwiGLU MLP
        # backward at 512 x 384 -> 512: bench/HISTORY.md, session 14).
        y = jnp.dot(x.reshape(rows, size_in), w.reshape(size_in, -1))
        return y.reshape(*x.shape[:-n_in], *w.shape[n_in:])
    parts = jnp.einsum("sk,skn->sn", x.reshape(split, size_in // split), w.reshape(split, size_in // split, -1))
    return parts.sum(0).reshape(*x.shape[:-n_in], *w.shape[n_in:])
