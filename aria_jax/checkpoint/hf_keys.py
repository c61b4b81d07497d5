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

import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, open_checkpoint
from aria_jax.config import AriaConfig
from aria_jax.model.schema import Target, contiguous, tensor_specs
from aria_jax.quant import QuantSpec, quantize, quantized_weight

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


def from_hub_name(key: str, layout: str) -> str:
    """Inverse of ``to_hub_name`` for the layouts that can be written (hub, transformers5)."""
    for pattern, replacement in _FROM_HUB[layout]:
        key = re.sub(pattern, replacement, key)
    return key


def _set_layer_impl(stacked: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)


_set_layer = jax.jit(_set_layer_impl, donate_argnums=0)


@functools.lru_cache(maxsize=256)
def _placed_ops(sharding: jax.sharding.Sharding, shape: tuple[int, ...], dtype: jnp.dtype):
    """(zeros, set_layer) that keep a stacked parameter on ``sharding``: each device holds only its slice."""
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return zeros, jax.jit(_set_layer_impl, donate_argnums=0, out_shardings=sharding)


def quantized_targets(target: Target, quant: QuantSpec, packed: bool) -> list[Target]:
    """``target`` itself, or for a weight ``quant`` covers its ``_q`` and ``_scale`` targets (each transform
    quantizes the layer's float value on the host)."""
    rule = quantized_weight("/".join(target.path), quant)
    if rule is None:
        return [target]
    lead, n_in = rule
    lead -= target.layer is not None  # one layer of a stacked weight has one leading axis fewer

    last: dict = {}  # the pair of the tensor read last: _q and _scale come from one quantization

    def part(i):
        def fn(w):
            if last.get("source") is not w:
                last.update(source=w, pair=quantize(target.transform(w), lead, n_in, quant, packed))
            pair = last["pair"]
            if i == 1:  # _scale is taken last: drop the pair, or every target would keep its layer's pair alive
                last.clear()
            return pair[i]

        return fn

    *parents, name = target.path
    return [Target((*parents, name + "_q"), target.layer, part(0)),
            Target((*parents, name + "_scale"), target.layer, part(1))]


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
    directory: str | os.PathLike, cfg: AriaConfig, param_shapes: dict, dtype: jnp.dtype, shardings: dict | None = None,
    quant: QuantSpec | None = None, packed: bool = True,
) -> tuple[dict, str]:
    """Read an HF safetensors directory into a params pytree shaped like ``param_shapes``; returns (params, layout).

    With ``quant`` (aria_jax.quant), every weight it covers is quantized on the host as it is read (one layer of one
    tensor at a time) and only its ``_q``/``_scale`` pair reaches the device (``packed``: int4 two per byte).

    Tensors are streamed one at a time from memory maps, cast to ``dtype`` on the host and placed on the
    device (with ``shardings``, a tree like ``param_shapes`` of target shardings, each device receives only its
    slice); stacked (scanned) parameters are filled layer by layer in place.
    """
    directory = os.fspath(directory)
    layout, items = plan_tensors(open_checkpoint(directory), cfg, directory)
    if quant is not None:
        items = [dataclasses.replace(item, targets=[t for target in item.targets
                                                    for t in quantized_targets(target, quant, packed)])
                 for item in items]
    shapes = {
        tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes)
    }
    dtypes = {  # the compute dtype, or a quantized pair's int8/uint8 values and float32 scales
        tuple(k.key for k in path): np.dtype(leaf.dtype)
        for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes)
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
            leaf_dtype = dtypes.get(target.path, np_dtype)
            value = contiguous(target.transform(raw), leaf_dtype)
            sharding = placement.get(target.path)
            if target.layer is None:
                _nested_set(params, target.path, jax.device_put(value, sharding))
                continue
            zeros, set_layer = (
                _placed_ops(sharding, shapes[target.path], leaf_dtype)
                if sharding is not None
                else (lambda p=target.path, t=leaf_dtype: jnp.zeros(shapes[p], t), _set_layer)
            )
            if target.path not in stacked:
                stacked[target.path] = zeros()
            stacked[target.path] = set_layer(stacked[target.path], value, target.layer)
    for path, value in stacked.items():
        _nested_set(params, path, value)
    return params, layout
