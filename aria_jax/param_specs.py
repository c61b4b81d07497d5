"""Every parameter's shape and logical axes from the config alone, without tracing the model.

Flax Linen modules declare their parameters as they run, so the tree is otherwise known only by tracing an init
(``sharding.abstract_params``: about a second in a fresh process, a third of a 2 GB conversion). Conversion
needs the layout before its first write and takes it from this table; ``tests/test_param_specs.py`` checks the
table against the traced model for several configs, so the two cannot drift apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from aria_jax.config import AriaConfig

Spec = tuple[tuple[int, ...], tuple[str, ...]]


def _text(cfg: AriaConfig) -> dict[str, Spec]:
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


def _vision(cfg: AriaConfig) -> dict[str, Spec]:
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


def _projector(cfg: AriaConfig) -> dict[str, Spec]:
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


def param_specs(cfg: AriaConfig) -> dict[str, Spec]:
    """``"a/b/c"`` path -> (shape, logical axes) of every parameter of ``AriaModel(cfg)`` (stacked layout)."""
    return {**_text(cfg), **_vision(cfg), **_projector(cfg)}


def declared_params(cfg: AriaConfig, dtype: jnp.dtype) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical PartitionSpecs) trees, as ``sharding.abstract_params`` returns them."""
    shapes: dict = {}
    logical: dict = {}
    for path, (shape, axes) in param_specs(cfg).items():
        *parents, name = path.split("/")
        node_s, node_l = shapes, logical
        for key in parents:
            node_s, node_l = node_s.setdefault(key, {}), node_l.setdefault(key, {})
        node_s[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        node_l[name] = PartitionSpec(*axes)
    return shapes, logical
