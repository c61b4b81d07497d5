"""The parameter layouts a model runs in (``TextDecoder.layout``), converted losslessly at load and save only.

- ``stacked`` (the canonical one: checkpoints, exports, meshes, training on GPU/TPU): ``language_model/layers/...``
  with a leading layer axis, run by ``nn.scan``; the routed experts are (E, D, 2F) / (E, F, D) arrays.
- ``per_layer`` (training on CPU): ``language_model/layers_0 ... layers_{L-1}``, each with its (E, ...) expert
  stacks. XLA on CPU copies every slice of a stacked parameter (each layer's weights, forward and backward).
- ``unrolled`` (inference on one CPU device): per layer, and one array per expert (``mlp/gate_up_{e}``,
  ``mlp/down_{e}``): XLA reads every weight in place, where any slice of an expert stack is copied first.

``to_layout(tree, layout)`` / ``to_stacked(tree)`` convert a params tree, or any tree keyed like it (LoRA pairs);
``map_param_trees`` applies a conversion inside an optimizer state (its moments).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

# the routed experts' stacked parameters, float or quantized (aria_jax.quant): one array per expert when unrolled
EXPERT_KEYS = ("gate_up", "down", "gate_up_q", "gate_up_scale", "down_q", "down_scale")


def _layer_keys(text: dict) -> list[str]:
    """``layers_0 ... layers_{L-1}`` of an unrolled ``language_model`` tree, in layer order."""
    return sorted((k for k in text if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))


def _unstack(a: jax.Array) -> list[jax.Array]:
    return [a[i] for i in range(a.shape[0])]


def unroll(params: dict) -> dict:
    """Stacked -> unrolled. The result shares nothing with ``params``: drop ``params`` to free the stacked copy."""
    text = dict(params["language_model"])
    stacked = text.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    layers = [{} for _ in range(num_layers)]
    for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
        keys = [p.key for p in path]
        for i, piece in enumerate(_unstack(leaf)):
            node = layers[i]
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            if keys[-2:-1] == ["mlp"] and keys[-1] in EXPERT_KEYS:
                node.update({f"{keys[-1]}_{e}": w for e, w in enumerate(_unstack(piece))})
            else:
                node[keys[-1]] = piece
    text.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return {**params, "language_model": text}


def stack(params: dict) -> dict:
    """Unrolled -> stacked (the inverse of ``unroll``)."""
    text = dict(params["language_model"])
    layers = [dict(text.pop(k)) for k in _layer_keys(text)]
    for layer in layers:
        mlp = dict(layer["mlp"])
        for key in EXPERT_KEYS:
            count = sum(1 for k in mlp if re.fullmatch(rf"{key}_\d+", k))
            if count:
                mlp[key] = jnp.stack([mlp.pop(f"{key}_{e}") for e in range(count)])
        layer["mlp"] = mlp
    text["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "language_model": text}


def unroll_layers(tree: dict) -> dict:
    """``language_model/layers`` (leading layer axis) -> ``layers_0 ... layers_{L-1}``; other keys unchanged."""
    text = dict(tree.get("language_model", {}))
    if "layers" not in text:
        return tree
    stacked = text.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    text.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)})
    return {**tree, "language_model": text}


def stack_layers(tree: dict) -> dict:
    """The inverse of ``unroll_layers``."""
    text = dict(tree.get("language_model", {}))
    names = _layer_keys(text)
    if not names:
        return tree
    text["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[text.pop(k) for k in names])
    return {**tree, "language_model": text}


def map_param_trees(fn, tree):
    """``fn`` applied to every params-keyed dict (one with a ``language_model`` key) inside ``tree``, e.g. the
    moments of an optax state; every other leaf unchanged."""
    is_params = lambda x: isinstance(x, dict) and "language_model" in x
    return jax.tree.map(lambda x: fn(x) if is_params(x) else x, tree, is_leaf=is_params)


def is_unrolled(params: dict) -> bool:
    return "layers" not in params.get("language_model", {})


def layout_of(tree: dict) -> str:
    """Which layout a params tree (or any tree keyed like it) is in."""
    text = tree.get("language_model", {})
    if "layers" in text or not any(k.startswith("layers_") for k in text):
        return "stacked"
    first = text[_layer_keys(text)[0]]
    mlp = first.get("mlp", {})
    return "unrolled" if "gate_up_0" in mlp or "gate_up_q_0" in mlp else "per_layer"


def to_stacked(tree: dict) -> dict:
    """Any layout -> ``stacked``."""
    return {"stacked": lambda t: t, "per_layer": stack_layers, "unrolled": stack}[layout_of(tree)](tree)


def to_layout(tree: dict, layout: str) -> dict:
    """Any layout -> ``layout`` (through ``stacked``)."""
    stacked = to_stacked(tree)
    return {"stacked": lambda t: t, "per_layer": unroll_layers, "unrolled": unroll}[layout](stacked)
