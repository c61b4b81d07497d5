"""The decoder's KV cache: preallocated, float or int8 with per-vector scales, as a typed pytree."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from aria_jax.config import AriaTextConfig


@flax.struct.dataclass
class LayerCache:
    """Keys (..., B, kv_heads, S, head_dim) and values (..., B, kv_heads, head_dim, S): a decode step's two
    matrix-vector products (scores = keys . query, output = values . probabilities) then contract each cache's minor
    axis, the layout XLA:CPU's matrix-vector kernel reads in place (the other way round it copied both caches,
    transposed, every step: most of a long-context decode step). The leading ``...`` is the layer axis of a stacked
    cache (scanned layers) and absent in a per-layer one. int8 caches carry float32 scales per (row, kv head,
    position): ``k_scale`` (..., S, 1), ``v_scale`` (..., 1, S)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


# One LayerCache with a leading layer axis (the stacked parameter layout), or a tuple of one per layer.
KVCache = LayerCache | tuple[LayerCache, ...]


def _quantize(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per vector along ``axis`` (head_dim): (int8 values, float32 scales with that axis kept)."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8), scale


def _put_rows(x: jax.Array, update: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``update`` written into ``x`` at slot ``index[b]`` of row ``b`` (``axis`` counted with the batch axis 0)."""
    return jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice_in_dim(row, new, i, axis=axis - 1))(
        x, update, index)


def cache_write(cache: LayerCache, k: jax.Array, v: jax.Array, index) -> LayerCache:
    """Write keys (B, kv, T, hd) and values (B, kv, hd, T) at slot ``index``; int8 caches also store scales.

    ``index``: one slot for every row (a scalar), or one per row (B,): rows that advance independently (the
    server's slot pool, aria_jax/serve)."""
    put = jax.lax.dynamic_update_slice_in_dim
    if getattr(index, "ndim", 0) == 1:
        put = _put_rows
    if cache.k_scale is None:
        return cache.replace(k=put(cache.k, k.astype(cache.k.dtype), index, axis=2),
                             v=put(cache.v, v.astype(cache.v.dtype), index, axis=3))
    (qk, sk), (qv, sv) = _quantize(k, axis=3), _quantize(v, axis=2)
    return LayerCache(put(cache.k, qk, index, axis=2), put(cache.v, qv, index, axis=3),
                      put(cache.k_scale, sk, index, axis=2), put(cache.v_scale, sv, index, axis=3))


def cache_read(cache: LayerCache, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    if cache.k_scale is None:
        return cache.k.astype(dtype), cache.v.astype(dtype)
    return ((cache.k.astype(jnp.float32) * cache.k_scale).astype(dtype),
            (cache.v.astype(jnp.float32) * cache.v_scale).astype(dtype))


def cache_round(cache: LayerCache, k: jax.Array, v: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Keys (B, kv, T, hd) and values (B, kv, hd, T) as ``cache_read`` will give them back once written."""
    if cache.k_scale is None:
        return k.astype(cache.k.dtype).astype(dtype), v.astype(cache.v.dtype).astype(dtype)
    (qk, sk), (qv, sv) = _quantize(k, axis=3), _quantize(v, axis=2)
    return (qk.astype(jnp.float32) * sk).astype(dtype), (qv.astype(jnp.float32) * sv).astype(dtype)


def cache_length(cache: KVCache) -> int:
    """The number of slots (S)."""
    return (cache[0] if isinstance(cache, tuple) else cache).v.shape[-1]


def init_cache(
    cfg: AriaTextConfig, batch: int, length: int, dtype: jnp.dtype, per_layer: bool = False, kv_int8: bool = False
) -> KVCache:
    """A zeroed KV cache of ``length`` slots for every layer: one ``LayerCache`` with a leading layer axis, or with
    ``per_layer`` (the per-layer parameter layouts) a tuple of one per layer.

    ``kv_int8``: keys and values stored as int8 with a float32 scale per (row, kv head, position), symmetric over
    head_dim; a quarter of a float32 cache's bytes plus 1/head_dim for the scales. The attention reads them
    dequantized.
    """
    kv, hd, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    shapes = {"k": (batch, kv, length, hd), "v": (batch, kv, hd, length)}
    dtypes = {"k": dtype, "v": dtype}
    if kv_int8:
        shapes.update(k_scale=(batch, kv, length, 1), v_scale=(batch, kv, 1, length))
        dtypes = {"k": jnp.int8, "v": jnp.int8, "k_scale": jnp.float32, "v_scale": jnp.float32}
    if per_layer:
        return tuple(LayerCache(**{k: jnp.zeros(s, dtypes[k]) for k, s in shapes.items()}) for _ in range(n))
    return LayerCache(**{k: jnp.zeros((n, *s), dtypes[k]) for k, s in shapes.items()})
