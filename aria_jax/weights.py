"""HF safetensors checkpoints -> the Flax params pytree, for all three Aria key layouts (aria-spec.md §8).

Every layout is first renamed to the hub's legacy names (``language_model.model.*``, ``experts.fc1.weight``),
then one table maps each tensor to its parameter(s) with the transform it needs: torch ``nn.Linear`` weights
are [out, in] and become [in, out] kernels (split into heads where the model uses heads); the expert tensors
are already [in, out]; the packed ``in_proj_weight`` splits into q, k, v.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.config import AriaConfig
from aria_jax.safetensors_io import CheckpointError, SafetensorsFile, contiguous, open_checkpoint

LAYOUTS = ("transformers5", "hub", "original")

_TO_HUB: dict[str, list[tuple[str, str]]] = {
    "transformers5": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.weight$", "language_model.lm_head.weight"),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"\.mlp\.experts\.gate_up_proj$", ".mlp.experts.fc1.weight"),
        (r"\.mlp\.experts\.down_proj$", ".mlp.experts.fc2.weight"),
    ],
    "hub": [],
    # The order of convert_aria_weights_to_hf.py: "ln_ffn" before "ffn".
    "original": [
        (r"^vision_tower\.vision_model\.", "vision_tower."),
        (r"ln_ffn", "layer_norm"),
        (r"ffn", "feed_forward"),
        (r"ln_kv", "layer_norm_kv"),
    ],
}
_FROM_HUB: dict[str, list[tuple[str, str]]] = {
    "transformers5": [
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"\.mlp\.experts\.fc1\.weight$", ".mlp.experts.gate_up_proj"),
        (r"\.mlp\.experts\.fc2\.weight$", ".mlp.experts.down_proj"),
    ],
    "hub": [],
}
_IGNORED = re.compile(r"(^vision_tower\.post_layernorm\.|\.inv_freq$)")


def detect_layout(keys: list[str], where: str = "checkpoint") -> str:
    """Which of the three key layouts a set of tensor names uses."""
    if any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in keys):
        return "transformers5"
    if any(k.startswith("vision_tower.vision_model.") or re.search(r"\.(ln_kv|ln_ffn|ffn)\.", k) for k in keys):
        return "original"
    if any(k.startswith("language_model.model.") for k in keys):
        return "hub"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise CheckpointError(f"{where}: unknown key layout (expected Aria tensors, found {sample})")


def to_hub_name(key: str, layout: str) -> str:
    for pattern, replacement in _TO_HUB[layout]:
        key = re.sub(pattern, replacement, key)
    return key


Fn = Callable[[np.ndarray], np.ndarray]


def from_hub_name(key: str, layout: str) -> str:
    """Inverse of ``to_hub_name`` for the layouts that can be written (hub, transformers5)."""
    for pattern, replacement in _FROM_HUB[layout]:
        key = re.sub(pattern, replacement, key)
    return key


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


Spec = tuple[tuple[int, ...], list[Target]]


@functools.lru_cache(maxsize=16)
def tensor_specs(cfg: AriaConfig) -> dict[str, Spec]:
    """Every tensor an Aria checkpoint holds (hub names) -> (its shape on disk, the parameters it fills)."""
    t, v = cfg.text, cfg.vision
    specs: dict[str, Spec] = {}

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


def _set_layer_impl(stacked: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)


_set_layer = jax.jit(_set_layer_impl, donate_argnums=0)


@functools.lru_cache(maxsize=256)
def _placed_ops(sharding: jax.sharding.Sharding, shape: tuple[int, ...], dtype: jnp.dtype):
    """(zeros, set_layer) that keep a stacked parameter on ``sharding``: each device holds only its slice."""
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return zeros, jax.jit(_set_layer_impl, donate_argnums=0, out_shardings=sharding)


def _nested_set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class Item:
    """One source tensor and the parameters it fills."""

    key: str
    file: object  # SafetensorsFile, or convert.PickleFile with --allow-pickle
    targets: list[Target]

    @property
    def nbytes(self) -> int:
        return self.file.nbytes(self.key)


def _position(key: str, reader) -> tuple[str, int]:
    """File order: by file, then by offset (or the pickle's own order)."""
    if isinstance(reader, SafetensorsFile):
        return reader.path, reader._entries[key][2]
    return reader.path, reader.order(key)


def plan_tensors(tensors: dict, cfg: AriaConfig, where: str) -> tuple[str, list[Item]]:
    """Check every tensor's name, shape and dtype against the config before anything is read.

    Returns (layout, the tensors that fill parameters, in file order). Unexpected, duplicate, mis-shaped,
    non-float and missing tensors fail with one message naming the tensor and its file.
    """
    layout = detect_layout(list(tensors), where)
    specs = tensor_specs(cfg)
    seen: dict[str, str] = {}
    items = []
    for key in sorted(tensors, key=lambda k: _position(k, tensors[k])):
        reader = tensors[key]
        name = to_hub_name(key, layout)
        if _IGNORED.search(name):
            continue
        if name not in specs:
            raise CheckpointError(f"{reader.path}: unexpected tensor '{key}' (not part of this Aria config)")
        if name in seen:
            raise CheckpointError(f"{reader.path}: tensor '{key}' appears twice (also as '{seen[name]}')")
        seen[name] = key
        shape, targets = specs[name]
        if tuple(reader.shape(key)) != shape:
            raise CheckpointError(
                f"{reader.path}: tensor '{key}' has shape {list(reader.shape(key))}, config.json implies {list(shape)}"
            )
        if not jnp.issubdtype(reader.dtype(key), jnp.floating):
            raise CheckpointError(f"{reader.path}: tensor '{key}' has non-float dtype {reader.dtype(key)}")
        if targets:
            items.append(Item(key, reader, targets))
    missing = sorted(set(specs) - set(seen))
    if missing:
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    return layout, items


def load_params(
    directory: str | os.PathLike, cfg: AriaConfig, param_shapes: dict, dtype: jnp.dtype, shardings: dict | None = None
) -> tuple[dict, str]:
    """Read an HF safetensors directory into a params pytree shaped like ``param_shapes``; returns (params, layout).

    Tensors are streamed one at a time from memory maps, cast to ``dtype`` on the host and placed on the
    device (with ``shardings``, a tree like ``param_shapes`` of target shardings, each device receives only its
    slice); stacked (scanned) parameters are filled layer by layer in place.
    """
    directory = os.fspath(directory)
    layout, items = plan_tensors(open_checkpoint(directory), cfg, directory)
    shapes = {
        tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes)
    }
    placement = (
        {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
        if shardings is not None
        else {}
    )
    params: dict = {}
    stacked: dict[tuple[str, ...], jax.Array] = {}
    np_dtype = np.dtype(dtype)
    for item in items:
        raw = item.file.get(item.key)
        for target in item.targets:
            value = contiguous(target.transform(raw), np_dtype)
            sharding = placement.get(target.path)
            if target.layer is None:
                _nested_set(params, target.path, jax.device_put(value, sharding))
                continue
            zeros, set_layer = (
                _placed_ops(sharding, shapes[target.path], np_dtype)
                if sharding is not None
                else (lambda p=target.path: jnp.zeros(shapes[p], dtype), _set_layer)
            )
            if target.path not in stacked:
                stacked[target.path] = zeros()
            stacked[target.path] = set_layer(stacked[target.path], value, target.layer)
    for path, value in stacked.items():
        _nested_set(params, path, value)
    return params, layout
