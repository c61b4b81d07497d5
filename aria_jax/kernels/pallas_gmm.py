"""A grouped matmul written in Pallas: rows sorted by group (expert), each group's rows times its own weight.

The rows are laid out in tiles of ``tm`` rows that each belong to one group (``tile_layout``: every group padded to
whole tiles, the padding rows zero), so a tile's group is one number per tile, read by the kernel from a small
int32 input with the grid step's block. The grid runs over (row tile, output tile); each step loops over the
contracted axis in ``tk`` slices and accumulates in float32. Tiles past the last group's (at most one per group,
``num_tiles`` is a static bound) write zeros.

Weights come in two layouts and two kinds:
- float (G, K, N): ``x @ w[g]`` (``gmm_padded``); its VJP runs d_x through the same kernel on the transposed weight
  (the kernel reads (G, N, K) tiles transposed, no copy) and d_w as a second Pallas kernel (``_tgmm``): for each
  group and (tk, tn) output tile, the sum over that group's row tiles of ``x_tile^T @ dy_tile``;
- quantized (``QWeight``: (G, N, K) int8 values, scales per output channel or per group of K): dequantized per tile
  inside the kernel (``gmm_padded_quantized``); int4 packed two per byte is unpacked to int8 values before the call.
  The quantized weights are frozen: their cotangent is zero, d_x runs the kernel on the transposed tiles.

``interpret=True`` runs the kernels in Pallas' interpreter (CPU tests); otherwise they lower where Pallas lowers
a generic ``pallas_call`` (GPU, through Triton). Tile sizes are powers of two that divide the array's axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from aria_jax.kernels.quantized import QWeight, values

MAX_TILE = 128  # the largest tile along K and N


class Layout(NamedTuple):
    """Where each sorted row goes in the tiled buffer, each tile's group (``num_groups`` for an unused tile), and
    each group's first tile (``tile_start``, (G + 1,))."""

    dest: jax.Array
    tile_group: jax.Array
    tile_start: jax.Array
    tm: int
    num_tiles: int


class _Config(NamedTuple):
    tm: int
    num_groups: int
    interpret: bool


def row_tile(rows: int, num_groups: int) -> int:
    """Rows per tile: the power of two that holds the average group (at least 16, Triton's smallest dot; at most 64)."""
    per_group = max(1, -(-rows // num_groups))
    return int(min(64, max(16, 1 << (per_group - 1).bit_length())))


def tile_layout(group_sizes: jax.Array, rows: int, tm: int) -> Layout:
    """The tiled layout of ``rows`` rows sorted by group, ``group_sizes`` (G,) rows in each (summing to ``rows``)."""
    num_groups = group_sizes.shape[0]
    num_tiles = -(-rows // tm) + num_groups
    sizes = group_sizes.astype(jnp.int32)
    tiles = -(-sizes // tm)
    tile_end = jnp.cumsum(tiles)
    tile_start = jnp.concatenate([jnp.zeros(1, jnp.int32), tile_end]).astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    group = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), sizes, total_repeat_length=rows)
    dest = tile_start[group] * tm + jnp.arange(rows, dtype=jnp.int32) - starts[group]
    tile_group = jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right").astype(jnp.int32)
    return Layout(dest, tile_group, tile_start, tm, num_tiles)


def to_tiles(rows: jax.Array, layout: Layout) -> jax.Array:
    """Sorted rows (M, K) -> the tiled buffer (num_tiles * tm, K), padding rows zero."""
    buffer = jnp.zeros((layout.num_tiles * layout.tm, rows.shape[-1]), rows.dtype)
    return buffer.at[layout.dest].set(rows, unique_indices=True)


def from_tiles(buffer: jax.Array, layout: Layout) -> jax.Array:
    """The tiled buffer back to the sorted rows."""
    return jnp.take(buffer, layout.dest, axis=0)


def _tile(size: int, also: int | None = None) -> int:
    """The largest power of two up to MAX_TILE that divides ``size`` (and ``also``)."""
    t = MAX_TILE
    while t > 1 and (size % t or (also is not None and also % t)):
        t //= 2
    return t


def _gmm_call(x: jax.Array, w: jax.Array, tile_group: jax.Array, scale: jax.Array | None, transposed: bool,
              cfg: _Config) -> jax.Array:
    """(P, K) tiled rows times the (K, N) logical weight of each tile's group -> (P, N) in x's dtype.

    ``w`` is (G, K, N) (``transposed`` False) or (G, N, K) read as its transpose. With ``scale`` the stored array
    is quantized int8 (G, R, C) with scales (G, R, C / group) per row and group of columns: a tile is dequantized
    after its load."""
    tm, num_groups = cfg.tm, cfg.num_groups
    p, k = x.shape
    n = w.shape[1] if transposed else w.shape[2]
    group = None
    if scale is not None:  # group of stored columns (stored (R, C): C is K when transposed, else N)
        group = (w.shape[2] // scale.shape[2])
    tk = _tile(k, group if transposed else None)
    tn = _tile(n, None if transposed else group)

    def load(w_ref, s_ref, g, k0, n0):
        """The (tk, tn) float tile of the logical weight of group ``g`` at (k0, n0)."""
        if transposed:  # the w block is (G, tn, K)
            t = w_ref[g, :, pl.ds(k0, tk)]
            if s_ref is not None:
                t = t.astype(jnp.float32) * s_ref[g, pl.ds(n0, tn), k0 // group][:, None]
            return t.T
        t = w_ref[g, pl.ds(k0, tk), :]  # the w block is (G, K, tn)
        if s_ref is not None:
            t = t.astype(jnp.float32) * s_ref[g, pl.ds(k0, tk), n0 // group][:, None]
        return t

    def kernel(g_ref, x_ref, w_ref, *refs):
        s_ref, o_ref = refs if scale is not None else (None, refs[0])
        g = g_ref[0]
        valid = g < num_groups
        g = jnp.minimum(g, num_groups - 1)
        n0 = pl.program_id(1) * tn

        def step(i, acc):
            k0 = pl.multiple_of(i * tk, tk)
            xt = x_ref[:, pl.ds(k0, tk)]
            wt = load(w_ref, s_ref, g, k0, n0).astype(xt.dtype)
            return acc + jnp.dot(xt, wt, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k // tk, step, jnp.zeros((tm, tn), jnp.float32))
        o_ref[...] = jnp.where(valid, acc, 0.0).astype(o_ref.dtype)

    w_spec = (pl.BlockSpec((w.shape[0], tn, k), lambda i, j: (0, j, 0)) if transposed
              else pl.BlockSpec((w.shape[0], k, tn), lambda i, j: (0, 0, j)))
    in_specs = [pl.BlockSpec((1,), lambda i, j: (i,)), pl.BlockSpec((tm, k), lambda i, j: (i, 0)), w_spec]
    operands = [tile_group, x, w]
    if scale is not None:
        in_specs.append(pl.BlockSpec(scale.shape, lambda i, j: (0, 0, 0)))
        operands.append(scale.astype(jnp.float32))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p, n), x.dtype),
        grid=(p // tm, n // tn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=cfg.interpret,
    )(*operands)


def _tgmm(x: jax.Array, dy: jax.Array, tile_start: jax.Array, cfg: _Config, dtype) -> jax.Array:
    """d_w (G, K, N): for each group the sum over its row tiles of ``x_tile^T @ dy_tile``, float32 accumulation."""
    tm, num_groups = cfg.tm, cfg.num_groups
    p, k = x.shape
    n = dy.shape[1]
    tk, tn = _tile(k), _tile(n)

    def kernel(s_ref, x_ref, dy_ref, o_ref):
        g = pl.program_id(0)

        def step(t, acc):
            r0 = pl.multiple_of(t * tm, tm)
            xt, dyt = x_ref[pl.ds(r0, tm), :], dy_ref[pl.ds(r0, tm), :]
            return acc + jax.lax.dot_general(xt, dyt, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(s_ref[g], s_ref[g + 1], step, jnp.zeros((tk, tn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), dtype),
        grid=(num_groups, k // tk, n // tn),
        in_specs=[pl.BlockSpec((num_groups + 1,), lambda g, i, j: (0,)),
                  pl.BlockSpec((p, tk), lambda g, i, j: (0, i)),
                  pl.BlockSpec((p, tn), lambda g, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, i, j: (g, i, j)),
        interpret=cfg.interpret,
    )(tile_start, x, dy)


def _int_zero(a: jax.Array) -> np.ndarray:
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_float(x, w, tile_group, tile_start, cfg: _Config):
    return _gmm_call(x, w, tile_group, None, False, cfg)


def _gmm_float_fwd(x, w, tile_group, tile_start, cfg):
    return _gmm_call(x, w, tile_group, None, False, cfg), (x, w, tile_group, tile_start)


def _gmm_float_bwd(cfg, residuals, dy):
    x, w, tile_group, tile_start = residuals
    dx = _gmm_call(dy.astype(x.dtype), w, tile_group, None, True, cfg)
    dw = _tgmm(x, dy.astype(x.dtype), tile_start, cfg, w.dtype)
    return dx, dw, _int_zero(tile_group), _int_zero(tile_start)


_gmm_float.defvjp(_gmm_float_fwd, _gmm_float_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_quant(x, q, scale, tile_group, cfg: _Config):
    return _gmm_call(x, q, tile_group, scale, True, cfg)


def _gmm_quant_fwd(x, q, scale, tile_group, cfg):
    return _gmm_call(x, q, tile_group, scale, True, cfg), (q, scale, tile_group)


def _gmm_quant_bwd(cfg, residuals, dy):
    q, scale, tile_group = residuals
    dx = _gmm_call(dy, q, tile_group, scale, False, cfg)
    return dx, _int_zero(q), jnp.zeros_like(scale), _int_zero(tile_group)


_gmm_quant.defvjp(_gmm_quant_fwd, _gmm_quant_bwd)


def gmm_padded(x: jax.Array, w: jax.Array | QWeight, layout: Layout, interpret: bool = False) -> jax.Array:
    """Tiled rows ``x`` (num_tiles * tm, K) times their groups' weights: float (G, K, N) or a QWeight (G, N, K)
    (frozen: zero cotangent) -> (num_tiles * tm, N) in x's dtype; differentiable in x and a float w."""
    if isinstance(w, QWeight):
        scale = w.scale if w.scale.ndim == w.q.ndim else w.scale[..., None]
        cfg = _Config(layout.tm, w.q.shape[0], bool(interpret))
        return _gmm_quant(x, values(w), scale, layout.tile_group, cfg)
    cfg = _Config(layout.tm, w.shape[0], bool(interpret))
    return _gmm_float(x, w.astype(x.dtype), layout.tile_group, layout.tile_start, cfg)


def gmm(x: jax.Array, w: jax.Array | QWeight, group_sizes: jax.Array, interpret: bool = False,
        tm: int | None = None) -> jax.Array:
    """Rows ``x`` (M, K) sorted by group, ``group_sizes`` (G,) of them per group (summing to M), times their groups'
    weights -> (M, N): the same as ``jax.lax.ragged_dot`` on float (G, K, N) weights."""
    layout = tile_layout(group_sizes, x.shape[0], tm or row_tile(x.shape[0], group_sizes.shape[0]))
    return from_tiles(gmm_padded(to_tiles(x, layout), w, layout, interpret), layout)
