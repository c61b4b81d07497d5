"""Every parameter's shape and logical axes from the config alone, without tracing the model.

Flax Linen modules declare their parameters as they run, so the tree is otherwise known only by tracing an init
(``sharding.abstract_params``: about a second in a fresh process, a third of a 2 GB conversion). Conversion
needs the layout before its first write and takes it from this table; ``tests/model/test_schema.py`` checks the
table against the traced model for several configs, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from aria_jax.config import AriaConfig
from aria_jax.quant import QuantSpec, quantized_weight, stored_axes, stored_shapes

ParamSpec = tuple[tuple[int, ...], tuple[str, ...]]


def _text(cfg: AriaConfig) -> dict[str, ParamSpec]:
    t = cfg.text
    n, d, e, f, fs = t.num_hidden_layers, t.hidden_size, t.moe_num_experts, t.intermediate_size, (
        t.shared_intermediate_size)
    nh, nkv, hd, vocab = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size
    layer = {
        "input_layernorm/scale": ((d,), ("embed",)),
        "post_attention_layernorm/scale": ((d,), ("embed",)),
        "self_attn/q_kernel": ((d, nh, hd), ("embed", "q_heads", "head_dim")),
        "self_attn/k_kernel": ((d, nkv, hd), ("embed", "kv_heads", "head_dim")),
        "self_attn/v_kernel": ((d, nkv, hd), ("embed", "kv_heads", "head_dim")),
        "self_attn/o_kernel": ((nh, hd, d), ("q_heads", "head_dim", "embed")),
        "mlp/router_kernel": ((d, e), ("embed", "expert_router")),
        "mlp/gate_up": ((e, d, 2 * f), ("expert", "expert_embed", "expert_mlp")),
        "mlp/down": ((e, f, d), ("expert", "expert_mlp", "expert_embed")),
        "mlp/shared_experts/gate_proj/kernel": ((d, fs), ("embed", "mlp")),
        "mlp/shared_experts/up_proj/kernel": ((d, fs), ("embed", "mlp")),
        "mlp/shared_experts/down_proj/kernel": ((fs, d), ("mlp", "embed")),
    }
    specs = {f"layers/{k}": ((n, *s), ("layers", *a)) for k, (s, a) in layer.items()}
    specs.update({
        "embed_tokens": ((vocab, d), ("vocab", "embed")),
        "norm/scale": ((d,), ("embed",)),
        "lm_head/kernel": ((d, vocab), ("embed", "vocab")),
    })
    return {f"language_model/{k}": v for k, v in specs.items()}


def _vision(cfg: AriaConfig) -> dict[str, ParamSpec]:
    v = cfg.vision
    d, nh, hd, m, n = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size, cfg.vision_layers_used
    heads = ("vision_embed", "vision_heads", "vision_head_dim")
    layer = {
        "layer_norm1/scale": ((d,), ("vision_embed",)),
        "layer_norm1/bias": ((d,), ("vision_embed",)),
        "layer_norm2/scale": ((d,), ("vision_embed",)),
        "layer_norm2/bias": ((d,), ("vision_embed",)),
        **{f"self_attn/{p}_kernel": ((d, nh, hd), heads) for p in "qkv"},
        **{f"self_attn/{p}_bias": ((nh, hd), heads[1:]) for p in "qkv"},
        "self_attn/out_kernel": ((nh, hd, d), ("vision_heads", "vision_head_dim", "vision_embed")),
        "self_attn/out_bias": ((d,), ("vision_embed",)),
        "fc1/kernel": ((d, m), ("vision_embed", "vision_mlp")),
        "fc1/bias": ((m,), ("vision_mlp",)),
        "fc2/kernel": ((m, d), ("vision_mlp", "vision_embed")),
        "fc2/bias": ((d,), ("vision_embed",)),
    }
    specs = {f"layers/{k}": ((n, *s), ("layers", *a)) for k, (s, a) in layer.items()} if n else {}
    specs.update({
        "embeddings/patch_kernel": ((v.num_channels * v.patch_size**2, d), ("vision_patch", "vision_embed")),
        "embeddings/patch_bias": ((d,), ("vision_embed",)),
        "embeddings/position_embedding": ((v.patches_per_side**2, d), ("vision_pos", "vision_embed")),
    })
    return {f"vision_tower/{k}": v for k, v in specs.items()}


def _projector(cfg: AriaConfig) -> dict[str, ParamSpec]:
    d, nh = cfg.vision.hidden_size, cfg.vision.num_attention_heads
    hd, dt = d // nh, cfg.text.hidden_size
    square = ((d, d), ("vision_embed", "vision_embed_out"))
    norm = {"scale": ((d,), ("vision_embed",)), "bias": ((d,), ("vision_embed",))}
    attn = {
        **{f"{p}_proj/kernel": square for p in "qkv"},
        **{f"in_{p}_kernel": ((d, nh, hd), ("vision_embed", "vision_heads", "vision_head_dim")) for p in "qkv"},
        **{f"in_{p}_bias": ((nh, hd), ("vision_heads", "vision_head_dim")) for p in "qkv"},
        "out_kernel": ((nh, hd, d), ("vision_heads", "vision_head_dim", "vision_embed")),
        "out_bias": ((d,), ("vision_embed",)),
        "linear/kernel": square,
        "linear/bias": ((d,), ("vision_embed_out",)),
        **{f"layer_norm/{k}": s for k, s in norm.items()},
        **{f"layer_norm_kv/{k}": s for k, s in norm.items()},
    }
    specs = {f"cross_attn/{k}": v for k, v in attn.items()}
    specs.update({
        "query": ((cfg.num_queries, d), ("queries", "vision_embed")),
        **{f"layer_norm/{k}": s for k, s in norm.items()},
        "linear_in/kernel": ((d, dt), ("vision_embed", "mlp")),
        "linear_out/kernel": ((dt, dt), ("mlp", "embed")),
    })
    return {f"projector/{k}": v for k, v in specs.items()}


def param_specs(cfg: AriaConfig) -> dict[str, ParamSpec]:
    """``"a/b/c"`` path -> (shape, logical axes) of every parameter of ``AriaModel(cfg)`` (stacked layout)."""
    return {**_text(cfg), **_vision(cfg), **_projector(cfg)}


def stored_specs(cfg: AriaConfig, dtype: jnp.dtype, quant: QuantSpec | None = None, packed: bool = True
                 ) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...], np.dtype]]:
    """``param_specs`` with dtypes, each weight ``quant`` covers replaced by its ``_q`` / ``_scale`` pair
    (aria_jax.quant; ``packed``: int4 two per byte)."""
    out = {}
    for path, (shape, axes) in param_specs(cfg).items():
        rule = quantized_weight(path, quant)
        if rule is None:
            out[path] = (shape, axes, np.dtype(dtype))
            continue
        q_shape, s_shape, q_dtype = stored_shapes(shape, *rule, quant, packed)
        q_axes, s_axes = stored_axes(axes, *rule, quant)
        out[path + "_q"] = (q_shape, q_axes, q_dtype)
        out[path + "_scale"] = (s_shape, s_axes, np.dtype(np.float32))
    return out


def declared_params(cfg: AriaConfig, dtype: jnp.dtype, quant: QuantSpec | None = None, packed: bool = True
                    ) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical PartitionSpecs) trees, as ``sharding.abstract_params`` returns them."""
    shapes: dict = {}
    logical: dict = {}
    for path, (shape, axes, leaf_dtype) in stored_specs(cfg, dtype, quant, packed).items():
        *parents, name = path.split("/")
        node_s, node_l = shapes, logical
        for key in parents:
            node_s, node_l = node_s.setdefault(key, {}), node_l.setdefault(key, {})
        node_s[name] = jax.ShapeDtypeStruct(shape, leaf_dtype)
        node_l[name] = PartitionSpec(*axes)
    return shapes, logical


Fn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor -> parameter (``forward``) and parameter -> its piece of the HF tensor (``inverse``).

    A tensor's pieces, one per target, are concatenated along axis 0 and reshaped to its disk shape.
    """

    forward: Fn
    inverse: Fn


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]  # into params
    layer: int | None  # index along the stacked layer axis, if the parameter is scanned
    transform: Fn
    inverse: Fn = lambda w: w

    @property
    def is_identity(self) -> bool:
        """Whether the parameter holds the tensor's bytes unchanged (same shape and element order)."""
        return self.transform is _ident_fwd


def _t_fwd(w: np.ndarray) -> np.ndarray:
    return w.T


def _ident_fwd(w: np.ndarray) -> np.ndarray:
    return w


_t = Transform(_t_fwd, _t_fwd)  # [out, in] <-> [in, out]


_ident = Transform(_ident_fwd, _ident_fwd)


def _heads_in(n: int, h: int) -> Transform:
    # (n*h, D) <-> (D, n, h)
    return Transform(lambda w: contiguous(w.T).reshape(w.shape[1], n, h), lambda p: p.reshape(p.shape[0], -1).T)


def _heads_out(n: int, h: int) -> Transform:
    # (D, n*h) <-> (n, h, D)
    return Transform(lambda w: contiguous(w.T).reshape(n, h, w.shape[0]), lambda p: p.reshape(-1, p.shape[-1]).T)


def _heads_bias(n: int, h: int) -> Transform:
    return Transform(lambda b: b.reshape(n, h), lambda p: p.reshape(-1))


def _rows(i: int, size: int, then: Transform) -> Transform:
    # One block of rows of a packed tensor; the inverse gives the block, concatenated with its siblings.
    return Transform(lambda w: then.forward(w[i * size : (i + 1) * size]), then.inverse)


# (O, C, kh, kw) <-> (C*kh*kw, O); the inverse's (O, C*kh*kw) is reshaped to the disk shape by the caller.
_patch = Transform(lambda w: w.reshape(w.shape[0], -1).T, _t_fwd)


TensorSpec = tuple[tuple[int, ...], list[Target]]


@functools.lru_cache(maxsize=16)
def tensor_specs(cfg: AriaConfig) -> dict[str, TensorSpec]:
    """Every tensor an Aria checkpoint holds (hub names) -> (its shape on disk, the parameters it fills)."""
    t, v = cfg.text, cfg.vision
    specs: dict[str, TensorSpec] = {}

    def add(key: str, shape: tuple[int, ...], *targets: tuple[tuple[str, ...], int | None, Transform]):
        specs[key] = (shape, [Target(p, i, f.forward, f.inverse) for p, i, f in targets])

    # Vision tower.
    dv, nhv, hdv, fv = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size
    emb = ("vision_tower", "embeddings")
    vt = "vision_tower.embeddings."
    add(
        vt + "patch_embedding.weight",
        (dv, v.num_channels, v.patch_size, v.patch_size),
        (emb + ("patch_kernel",), None, _patch),
    )
    add(vt + "patch_embedding.bias", (dv,), (emb + ("patch_bias",), None, _ident))
    add(vt + "position_embedding.weight", (v.patches_per_side**2, dv), (emb + ("position_embedding",), None, _ident))
    for i in range(v.num_hidden_layers):
        pre = f"vision_tower.encoder.layers.{i}."
        used = i < cfg.vision_layers_used  # layers past vision_feature_layer are read and dropped

        def vadd(key, shape, path, fn, _pre=pre, _i=i, _used=used):
            add(_pre + key, shape, *([(("vision_tower", "layers") + path, _i, fn)] if _used else []))

        for name in ("q", "k", "v"):
            vadd(f"self_attn.{name}_proj.weight", (dv, dv), ("self_attn", f"{name}_kernel"), _heads_in(nhv, hdv))
            vadd(f"self_attn.{name}_proj.bias", (dv,), ("self_attn", f"{name}_bias"), _heads_bias(nhv, hdv))
        vadd("self_attn.out_proj.weight", (dv, dv), ("self_attn", "out_kernel"), _heads_out(nhv, hdv))
        vadd("self_attn.out_proj.bias", (dv,), ("self_attn", "out_bias"), _ident)
        for ln in ("layer_norm1", "layer_norm2"):
            vadd(f"{ln}.weight", (dv,), (ln, "scale"), _ident)
            vadd(f"{ln}.bias", (dv,), (ln, "bias"), _ident)
        vadd("mlp.fc1.weight", (fv, dv), ("fc1", "kernel"), _t)
        vadd("mlp.fc1.bias", (fv,), ("fc1", "bias"), _ident)
        vadd("mlp.fc2.weight", (dv, fv), ("fc2", "kernel"), _t)
        vadd("mlp.fc2.bias", (dv,), ("fc2", "bias"), _ident)

    # Projector.
    pj, ca = ("projector",), ("projector", "cross_attn")
    mp = "multi_modal_projector."
    add(mp + "query", (cfg.num_queries, dv), (pj + ("query",), None, _ident))
    for name in ("q_proj", "k_proj", "v_proj"):
        add(mp + f"cross_attn.{name}.weight", (dv, dv), (ca + (name, "kernel"), None, _t))
    add(
        mp + "cross_attn.multihead_attn.in_proj_weight",
        (3 * dv, dv),
        *[(ca + (f"in_{n}_kernel",), None, _rows(i, dv, _heads_in(nhv, hdv))) for i, n in enumerate("qkv")],
    )
    add(
        mp + "cross_attn.multihead_attn.in_proj_bias",
        (3 * dv,),
        *[(ca + (f"in_{n}_bias",), None, _rows(i, dv, _heads_bias(nhv, hdv))) for i, n in enumerate("qkv")],
    )
    add(mp + "cross_attn.multihead_attn.out_proj.weight", (dv, dv), (ca + ("out_kernel",), None, _heads_out(nhv, hdv)))
    add(mp + "cross_attn.multihead_attn.out_proj.bias", (dv,), (ca + ("out_bias",), None, _ident))
    add(mp + "cross_attn.linear.weight", (dv, dv), (ca + ("linear", "kernel"), None, _t))
    add(mp + "cross_attn.linear.bias", (dv,), (ca + ("linear", "bias"), None, _ident))
    for key, path in (
        ("cross_attn.layer_norm", ca + ("layer_norm",)),
        ("cross_attn.layer_norm_kv", ca + ("layer_norm_kv",)),
        ("layer_norm", pj + ("layer_norm",)),
    ):
        add(mp + key + ".weight", (dv,), (path + ("scale",), None, _ident))
        add(mp + key + ".bias", (dv,), (path + ("bias",), None, _ident))
    add(mp + "feed_forward.linear_in.weight", (t.hidden_size, dv), (pj + ("linear_in", "kernel"), None, _t))
    add(
        mp + "feed_forward.linear_out.weight", (t.hidden_size, t.hidden_size), (pj + ("linear_out", "kernel"), None, _t)
    )

    # Text decoder.
    d, nh, nkv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    e, f, fs = t.moe_num_experts, t.intermediate_size, t.shared_intermediate_size
    lm = ("language_model",)
    add("language_model.model.embed_tokens.weight", (t.vocab_size, d), (lm + ("embed_tokens",), None, _ident))
    add("language_model.model.norm.weight", (d,), (lm + ("norm", "scale"), None, _ident))
    add("language_model.lm_head.weight", (t.vocab_size, d), (lm + ("lm_head", "kernel"), None, _t))
    for i in range(t.num_hidden_layers):
        pre = f"language_model.model.layers.{i}."
        lay = lm + ("layers",)
        add(pre + "self_attn.q_proj.weight", (nh * hd, d), (lay + ("self_attn", "q_kernel"), i, _heads_in(nh, hd)))
        add(pre + "self_attn.k_proj.weight", (nkv * hd, d), (lay + ("self_attn", "k_kernel"), i, _heads_in(nkv, hd)))
        add(pre + "self_attn.v_proj.weight", (nkv * hd, d), (lay + ("self_attn", "v_kernel"), i, _heads_in(nkv, hd)))
        add(pre + "self_attn.o_proj.weight", (d, nh * hd), (lay + ("self_attn", "o_kernel"), i, _heads_out(nh, hd)))
        add(pre + "input_layernorm.weight", (d,), (lay + ("input_layernorm", "scale"), i, _ident))
        add(pre + "post_attention_layernorm.weight", (d,), (lay + ("post_attention_layernorm", "scale"), i, _ident))
        add(pre + "mlp.router.weight", (e, d), (lay + ("mlp", "router_kernel"), i, _t))
        add(pre + "mlp.experts.fc1.weight", (e, d, 2 * f), (lay + ("mlp", "gate_up"), i, _ident))
        add(pre + "mlp.experts.fc2.weight", (e, f, d), (lay + ("mlp", "down"), i, _ident))
        for name, shape in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
            add(
                pre + f"mlp.shared_experts.{name}.weight",
                shape,
                (lay + ("mlp", "shared_experts", name, "kernel"), i, _t),
            )
    return specs


def contiguous(x: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """``np.ascontiguousarray(x, dtype)``, with transposed 2-D views copied in row tiles (about 5x faster: a plain
    strided copy of a large transposed matrix misses the cache on every element)."""
    dtype = np.dtype(dtype or x.dtype)
    if x.flags.c_contiguous or x.ndim != 2 or not x.flags.f_contiguous or x.size < 1 << 16:
        return np.ascontiguousarray(x, dtype=dtype)
    out = np.empty(x.shape, dtype)
    tile = 256
    source = x.T  # C-contiguous (cols, rows)
    for i in range(0, source.shape[0], tile):
        out[:, i : i + tile] = source[i : i + tile].T
    return out


def parameter_counts(cfg: AriaConfig) -> dict[str, int]:
    """Total parameters (as loaded: without the unused post_layernorm) and those active per text token."""
    t = cfg.text
    attention = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    expert = 3 * t.hidden_size * t.intermediate_size
    shared = 3 * t.hidden_size * t.shared_intermediate_size
    router = t.hidden_size * t.moe_num_experts
    norms = 2 * t.hidden_size
    active_layer = attention + router + t.moe_topk * expert + shared + norms
    total = sum(math.prod(shape) for shape, _ in tensor_specs(cfg).values())
    return {
        "total": total,
        "routed_experts": t.num_hidden_layers * t.moe_num_experts * expert,
        # Per text token: every layer's attention, router, top-k experts, shared experts and norms, the final
        # norm and lm_head (the embedding row lookup is not a matmul and is not counted).
        "active_per_token": t.num_hidden_layers * active_layer + t.hidden_size + t.vocab_size * t.hidden_size,
    }
