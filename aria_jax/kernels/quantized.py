"""Matmuls on weight-only quantized weights (formats: aria_jax.quant), float32 accumulation.

``QWeight`` is one quantized weight as a module holds it: ``q`` (*lead, N, K) int8, or (*lead, N, K/2) uint8 (int4
two per byte), and ``scale`` (*lead, N) or (*lead, N, K/group); with the logical output shape and ``fused_rows``
(``Runtime.quant_fused_rows``) as static fields. ``project`` (aria_jax.kernels.matmul) sends a QWeight here.

The forms (chosen by row count, measured on XLA:CPU in bench/HISTORY.md, session 8):
- one row, up to ``fused_rows`` > 0: ``x @ dequantize(w).T`` with x a vector: XLA:CPU fuses the int8 -> float
  conversion and the scales into its vector-matrix dot, reading the int8 bytes once (3.6x faster than a float32
  matvec of the same shape; a matrix x int8 dot materialises a float copy of the weight first);
- 2 .. ``fused_rows`` rows: ``sum(q * x[:, None, :], -1) * scale`` (per group of K for int4), an explicit
  multiply-reduce that XLA:CPU fuses the same way;
- more rows (prefill, training) or ``fused_rows`` 0 (GPU/TPU, where XLA fuses the dequantization into its dot):
  ``x @ dequantize(w).T``.

Nothing here is written by qwix (its QArray matmuls dequantize or run integer dots; neither gives these fusions on
XLA:CPU); its ``ragged_dot_general`` runs the ``ragged`` expert backend (``ragged_dot``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QWeight:
    q: jax.Array
    scale: jax.Array
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    fused_rows: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def in_features(self) -> int:
        return self.q.shape[-1] * (2 if self.q.dtype == jnp.uint8 else 1)

    @property
    def groups(self) -> int:
        """Scale groups along K (1: one scale per output channel)."""
        return 1 if self.scale.ndim == self.q.ndim - 1 else self.scale.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape with the contracted axes flattened: (*lead, K, *out)."""
        return (*self.q.shape[:-2], self.in_features, *self.out_shape)

    def index(self, i) -> QWeight:
        """The weight of one index along the first leading axis (an expert), ``i`` static or traced."""
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)  # noqa: E731
        return dataclasses.replace(self, q=pick(self.q), scale=pick(self.scale))


def unpack_int4(p: jax.Array, group: int) -> jax.Array:
    """uint8 (..., K/2) -> int8 (..., K) (aria_jax.quant.pack_int4's layout)."""
    *head, half = p.shape
    b = jax.lax.bitcast_convert_type(p, jnp.int8).reshape(*head, half * 2 // group, 1, group // 2)
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(b, jnp.int8(4)), jnp.int8(4))
    hi = jax.lax.shift_right_arithmetic(b, jnp.int8(4))
    return jnp.concatenate([lo, hi], axis=-2).reshape(*head, half * 2)


def values(w: QWeight) -> jax.Array:
    """The int8 values (*lead, N, K), unpacked if packed."""
    return unpack_int4(w.q, w.in_features // w.groups) if w.q.dtype == jnp.uint8 else w.q


def dequantize(w: QWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """(*lead, N, K) in ``dtype``: values times their scales."""
    q = values(w)
    *head, n, k = q.shape
    g = w.groups
    blocks = q.astype(jnp.float32).reshape(*head, n, g, k // g) * w.scale.reshape(*head, n, g, 1)
    return blocks.reshape(*head, n, k).astype(dtype)


def dense(w: QWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The logical (*lead, K, *out) float weight (the layout of the unquantized parameter, contracted axes flat)."""
    return jnp.swapaxes(dequantize(w, dtype), -1, -2).reshape(w.shape)


def qproject(x: jax.Array, w: QWeight, n_in: int = 1) -> jax.Array:
    """``x`` (..., *in) times the quantized weight (its last ``n_in`` axes contracted) -> (..., *out) in x's dtype."""
    lead = x.shape[:-n_in]
    rows, k = math.prod(lead), math.prod(x.shape[-n_in:])
    if k != w.in_features or w.q.ndim != 2:
        raise ValueError(f"quantized weight {w.shape} does not take inputs {x.shape} ({n_in} contracted axes)")
    x2 = x.reshape(rows, k)
    # The barrier keeps the dequantization next to its matmul: inside a decode loop XLA would otherwise hoist it out
    # as loop-invariant and carry a float copy of every weight through the loop (4x the bytes per step and memory).
    # Tied to ``x`` (which varies), the barrier cannot be hoisted itself.
    q, scale, x2 = jax.lax.optimization_barrier((w.q, w.scale, x2))
    w = dataclasses.replace(w, q=q, scale=scale)
    q = values(w)
    if rows == 1 and w.fused_rows and w.groups == 1:
        # one scale per output channel, applied after the dot: its consumer is then a multiply, never an add that
        # XLA:CPU would fuse into the dot as an output fusion (which takes no dequantizing producer)
        y = (jnp.dot(x2[0], q.astype(x.dtype).T, preferred_element_type=jnp.float32) * w.scale.reshape(-1))[None]
    elif rows == 1 and w.fused_rows:
        y = jnp.dot(x2[0], dequantize(w, x.dtype).T, preferred_element_type=jnp.float32)[None]
    elif rows <= w.fused_rows and w.groups == 1:
        y = jnp.sum(q.astype(jnp.float32)[None] * x2.astype(jnp.float32)[:, None, :], axis=-1) * w.scale.reshape(-1)
    elif rows <= w.fused_rows:  # one such reduction per group of K (a scale broadcast inside runs ~8x slower)
        size = k // w.groups
        y = sum(jnp.sum(q[:, i * size : (i + 1) * size].astype(jnp.float32)[None]
                        * x2[:, None, i * size : (i + 1) * size].astype(jnp.float32), axis=-1) * w.scale[:, i]
                for i in range(w.groups))
    else:
        y = jnp.einsum("rk,nk->rn", x2, dequantize(w, x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*lead, *w.out_shape)


def out_features(w) -> int:
    """Output width of a float (K, N) / (E, K, N) weight or of a QWeight."""
    return math.prod(w.out_shape) if isinstance(w, QWeight) else w.shape[-1]


def as_float(w, dtype: jnp.dtype) -> jax.Array:
    """A float weight as is; a QWeight dequantized to its logical layout (reference paths and LoRA merges)."""
    return dense(w, dtype) if isinstance(w, QWeight) else w


def zero_cotangent(w):
    """A cotangent of zeros for a frozen weight (float0 for integer leaves)."""
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.integer):
            return np.zeros(a.shape, jax.dtypes.float0)
        return jnp.zeros_like(a)

    return jax.tree.map(zero, w)
