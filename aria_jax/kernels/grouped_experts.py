"""The routed experts through the accelerators' grouped matmuls (``kernels.experts`` registers them as backends):

- ``pallas``: this project's Pallas grouped matmul (``kernels.pallas_gmm``): the (token, slot) rows sorted by expert
  and padded per expert to whole row tiles once, both expert matmuls (and the LoRA branch) on that layout, float32
  accumulation; quantized weights dequantized per tile inside the kernel. GPU's fallback when tokamax is absent;
  CPU in interpret mode.
- ``megablox``: ``jax.experimental.pallas.ops.tpu.megablox.gmm`` (TPU; interpret mode elsewhere) on the sorted rows,
  the row count padded to its row tile.
- ``tokamax``: ``tokamax.ragged_dot`` (openxla/tokamax, the optional ``gpu`` extra; needs jax >= 0.11), which picks
  its best implementation for the device (Mosaic GPU / TPU, Triton, XLA).

Quantized (``QWeight``) experts on megablox and tokamax are dequantized to the activations' dtype before the call
(one float copy of the stacked weights per step, frozen: no gradient). LoRA pairs run unmerged through the same
grouped matmul: ``gmm(gmm(dropout(x), A), B)``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from aria_jax.kernels import pallas_gmm
from aria_jax.kernels.activations import swiglu
from aria_jax.kernels.quantized import QWeight, dequantize
from aria_jax.runtime import detect

try:  # part of jax (jax.experimental); absent from some builds
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
except ImportError:  # pragma: no cover
    megablox_gmm = None

Weight = jax.Array | QWeight  # (E, K, N) float, or quantized (E, N, K)
Dot = Callable[[jax.Array, jax.Array | QWeight, jax.Array], jax.Array]  # (rows, weight, group sizes) -> rows


def combine(ys: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Expert-sorted (token, slot) outputs back in (token, slot) order, summed with the routing weights."""
    t, k = weights.shape
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def _branch(dot: Dot, x: jax.Array, pair, groups, dropout) -> jax.Array | int:
    """The LoRA branch through the same grouped matmul (0 without a pair)."""
    if pair is None:
        return 0
    return dot(dot(dropout(x), pair[0].astype(x.dtype), groups), pair[1].astype(x.dtype), groups)


def _mlp(dot: Dot, xs: jax.Array, gate_up, down, lora, groups) -> jax.Array:
    """swiglu(xs @ gate_up) @ down per expert, with the LoRA branches (``lora``: an ExpertLora or None)."""
    gu_pair, dn_pair, dropout = (None, None, None) if lora is None else (lora.gate_up, lora.down, lora.dropout)
    act = swiglu(dot(xs, gate_up, groups) + _branch(dot, xs, gu_pair, groups, dropout))
    return dot(act, down, groups) + _branch(dot, act, dn_pair, groups, dropout)


def experts_sorted(dot: Dot, x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Weight, down: Weight,
                   lora: Any = None) -> jax.Array:
    """Dropless routed experts through a ragged-dot-like ``dot`` on the (token, slot) rows sorted by expert."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    groups = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    return combine(_mlp(dot, xs, gate_up, down, lora, groups), order, weights)


def _float_rhs(w: jax.Array | QWeight, dtype) -> tuple[jax.Array, bool]:
    """A float weight for a library's grouped matmul: (G, K, N) as is, or a frozen QWeight dequantized (G, N, K)
    (returned with True: the library reads it transposed)."""
    if isinstance(w, QWeight):
        return jax.lax.stop_gradient(dequantize(w, dtype)), True
    return w.astype(dtype), False


def megablox_dot(x: jax.Array, w: jax.Array | QWeight, groups: jax.Array, interpret: bool = False) -> jax.Array:
    """megablox ``gmm`` on sorted rows: the rows padded to a whole row tile (the padding counted in the last group:
    zero rows, zero outputs), K and N tiles of 128 or the whole axis."""
    if megablox_gmm is None:
        raise ImportError("the megablox expert backend needs jax.experimental.pallas.ops.tpu.megablox")
    rhs, transposed = _float_rhs(w, x.dtype)
    m, k = x.shape
    n = rhs.shape[1] if transposed else rhs.shape[2]
    tm = min(128, -(-m // 16) * 16)  # whole bfloat16 sublane tiles on TPU
    pad = -m % tm
    rows = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    sizes = groups.at[-1].add(pad) if pad else groups
    tiling = (tm, k if k < 128 else 128, n if n < 128 else 128)
    out = megablox_gmm(rows, rhs, sizes, jnp.float32, tiling, transpose_rhs=transposed, interpret=interpret)
    return out[:m].astype(x.dtype)


def _interpret(flag: bool | None) -> bool:
    """``flag``, or where the caller left it None the runtime's choice (``Runtime.pallas_interpret``)."""
    return detect().pallas_interpret if flag is None else bool(flag)


def tokamax_installed() -> bool:
    return importlib.util.find_spec("tokamax") is not None


@functools.cache
def _tokamax():
    """tokamax, imported the first time its backend runs (an optional dependency: the ``gpu`` extra)."""
    try:
        return importlib.import_module("tokamax")
    except ImportError as e:
        raise ImportError("the tokamax expert backend needs tokamax (pip install 'aria-jax[gpu]'; jax >= 0.11)"
                          ) from e


def tokamax_dot(x: jax.Array, w: jax.Array | QWeight, groups: jax.Array) -> jax.Array:
    """``tokamax.ragged_dot`` (jax.lax.ragged_dot's API) with float32 accumulation."""
    rhs, transposed = _float_rhs(w, x.dtype)
    if transposed:
        rhs = jnp.swapaxes(rhs, 1, 2)
    return _tokamax().ragged_dot(x, rhs, groups, preferred_element_type=jnp.float32).astype(x.dtype)


def experts_megablox(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Weight, down: Weight, lora: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The routed experts through megablox ``gmm`` (TPU; interpret mode elsewhere)."""
    dot = functools.partial(megablox_dot, interpret=_interpret(interpret))
    return experts_sorted(dot, x, weights, ids, gate_up, down, lora)


def experts_tokamax(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Weight, down: Weight, lora: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The routed experts through ``tokamax.ragged_dot`` (its own implementation choice: ``interpret`` unused)."""
    del interpret
    return experts_sorted(tokamax_dot, x, weights, ids, gate_up, down, lora)


def experts_pallas(
    x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: Weight, down: Weight, lora: Any = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The routed experts through ``kernels.pallas_gmm``: the sorted rows padded per expert to whole row tiles
    once; both expert matmuls and the LoRA branches run on that layout (padding rows stay zero: swiglu(0) = 0)."""
    k = ids.shape[1]
    num_experts = gate_up.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    groups = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    layout = pallas_gmm.tile_layout(groups, flat.size, pallas_gmm.row_tile(flat.size, num_experts))
    rows = pallas_gmm.to_tiles(jnp.take(x, order // k, axis=0), layout)
    interpret = _interpret(interpret)
    dot = lambda a, w, _: pallas_gmm.gmm_padded(a, w, layout, interpret)  # noqa: E731
    out = _mlp(dot, rows, gate_up, down, lora, groups)
    return combine(pallas_gmm.from_tiles(out, layout), order, weights)
