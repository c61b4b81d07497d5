"""Where LoRA attaches to Aria, and how a pair folds into its weight.

A LoRA site is one parameter of the stacked tree that the model runs as ``x @ W`` over its input axes, known by the
name its torch module has in the hub checkpoint (``language_model.model.layers.{i}.self_attn.q_proj``). For a
parameter of shape ``batch + in + out`` (batch: the stacked layer axis and, for the routed experts, the expert
axis) a pair is ``{name}_a`` of shape ``batch + in + (r,)`` and ``{name}_b`` of shape ``batch + (r,) + out``; the
model adds ``x @ a @ b`` (``layers.lora_delta``, the grouped-matmul branch of the experts), with the ``alpha / r``
scale folded into ``b`` (``training.lora.scale_lora``). Recipes select sites (``training.lora``), PEFT adapter
files name them (``checkpoint.peft``); both read this table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import traverse_util

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraSite:
    module: str  # hub module name; "{i}" stands for the layer index
    path: Path  # the parameter in the stacked tree
    part: str  # "vit", "projector" or "llm" (what freeze_vit / freeze_projector / freeze_llm freeze)
    n_batch: int  # leading axes: the stacked layer axis, then for the routed experts the expert axis
    n_in: int  # input axes after them; the rest are output axes
    trainable: bool = True  # False: a LoRA there does nothing in the original trainer (loaded, never selected)

    @property
    def layered(self) -> bool:
        return "{i}" in self.module

    def name(self, layer: int | None) -> str:
        return self.module.format(i=layer) if self.layered else self.module


def _sites() -> tuple[LoraSite, ...]:
    lm, lay = ("language_model",), ("language_model", "layers")
    t = "language_model.model.layers.{i}."
    v, vl = "vision_tower.encoder.layers.{i}.", ("vision_tower", "layers")
    p, ca = "multi_modal_projector.", ("projector", "cross_attn")
    return (
        *(LoraSite(f"{t}self_attn.{n}_proj", lay + ("self_attn", f"{n}_kernel"), "llm", 1, 1) for n in "qkv"),
        LoraSite(f"{t}self_attn.o_proj", lay + ("self_attn", "o_kernel"), "llm", 1, 2),
        LoraSite(f"{t}mlp.experts.fc1", lay + ("mlp", "gate_up"), "llm", 2, 1),
        LoraSite(f"{t}mlp.experts.fc2", lay + ("mlp", "down"), "llm", 2, 1),
        *(LoraSite(f"{t}mlp.shared_experts.{n}", lay + ("mlp", "shared_experts", n, "kernel"), "llm", 1, 1)
          for n in ("gate_proj", "up_proj", "down_proj")),
        LoraSite("language_model.lm_head", lm + ("lm_head", "kernel"), "llm", 0, 1),
        *(LoraSite(f"{v}self_attn.{n}_proj", vl + ("self_attn", f"{n}_kernel"), "vit", 1, 1) for n in "qkv"),
        LoraSite(f"{v}self_attn.out_proj", vl + ("self_attn", "out_kernel"), "vit", 1, 2),
        *(LoraSite(f"{v}mlp.{n}", vl + (n, "kernel"), "vit", 1, 1) for n in ("fc1", "fc2")),
        *(LoraSite(f"{p}cross_attn.{n}", ca + (n, "kernel"), "projector", 0, 1)
          for n in ("q_proj", "k_proj", "v_proj", "linear")),
        # torch's MultiheadAttention reads out_proj.weight itself, so PEFT's LoRA on it never runs (nor trains)
        LoraSite(f"{p}cross_attn.multihead_attn.out_proj", ca + ("out_kernel",), "projector", 0, 2, trainable=False),
        *(LoraSite(f"{p}feed_forward.{n}", ("projector", n, "kernel"), "projector", 0, 1)
          for n in ("linear_in", "linear_out")),
    )


SITES: tuple[LoraSite, ...] = _sites()
SITE_BY_PATH: dict[Path, LoraSite] = {s.path: s for s in SITES}


def original_name(hub_module: str) -> str:
    """A module's name in the original custom-code model (what the original trainer's targets are matched on)."""
    if hub_module.startswith("vision_tower."):
        hub_module = "vision_tower.vision_model." + hub_module[len("vision_tower.") :]
    return hub_module.replace("multi_modal_projector.feed_forward.", "multi_modal_projector.ffn.")


def transformers5_name(hub_module: str) -> str:
    """A module's name in transformers 5's AriaForConditionalGeneration (the routed experts' fc1 / fc2 are the
    ``gate_up_proj`` / ``down_proj`` parameters of ``mlp.experts`` there)."""
    if hub_module.startswith("language_model.model."):
        return "model.language_model." + hub_module[len("language_model.model.") :]
    if hub_module == "language_model.lm_head":
        return "lm_head"
    return "model." + hub_module


def pair_paths(path: Path) -> tuple[Path, Path]:
    """The ``_a`` / ``_b`` paths of the pair for parameter ``path``."""
    return path[:-1] + (path[-1] + "_a",), path[:-1] + (path[-1] + "_b",)


def lora_product(a: jax.Array, b: jax.Array, n_batch: int, w_shape: tuple[int, ...]) -> jax.Array:
    """A @ B over the rank axis with the batch axes kept: the dense update of shape ``w_shape``."""
    n = math.prod(a.shape[:n_batch])
    a2 = a.reshape(n, -1, a.shape[-1])
    b2 = b.reshape(n, b.shape[n_batch], -1)
    return jnp.einsum("nir,nro->nio", a2, b2).reshape(w_shape)


def _folded(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_batch: int) -> jax.Array:
    delta = lora_product(a.astype(jnp.float32), b.astype(jnp.float32), n_batch, w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def _fold_fn(w: jax.Array, scale: float, n_batch: int, per_layer: bool):
    """A jitted ``(w, a, b[, layer]) -> w + a @ b * scale`` that donates ``w`` and keeps its sharding."""
    sharding = getattr(w, "sharding", None)
    kwargs = {"out_shardings": sharding} if isinstance(w, jax.Array) else {}
    if not per_layer:
        return jax.jit(lambda w, a, b: _folded(w, a, b, scale, n_batch), donate_argnums=0, **kwargs)

    def one_layer(w, a, b, i):
        layer = _folded(jax.lax.dynamic_index_in_dim(w, i, keepdims=False), a, b, scale, n_batch - 1)
        return jax.lax.dynamic_update_index_in_dim(w, layer, i, 0)

    return jax.jit(one_layer, donate_argnums=0, **kwargs)


def merge_pairs(params: dict, lora: dict, scale: float, sites: Iterable[LoraSite] = SITES) -> dict:
    """Stacked params with every pair in ``lora`` folded in: ``W + A @ B * scale``, in float32, cast back to W's dtype.

    Stacked layers are folded one at a time (a dense update of a whole expert stack would need every layer's at once)
    and each merged array keeps the sharding of the one it replaces. ``params`` itself is not changed. A pair whose
    weight is quantized (``{name}_q``: aria_jax.quant) is a ValueError: dequantize first
    (``aria_jax.model.quantize.dequantize_params``), as a QLoRA export does.
    """
    flat = dict(traverse_util.flatten_dict(params))
    lflat = traverse_util.flatten_dict(lora)
    for site in sites:
        a_path, b_path = pair_paths(site.path)
        if a_path in lflat and site.path[:-1] + (site.path[-1] + "_q",) in flat:
            raise ValueError(f"LoRA pair for {'/'.join(site.path)}: the weight is quantized; dequantize the params "
                             "before merging (aria_jax.model.quantize.dequantize_params)")
        if a_path not in lflat or site.path not in flat:
            continue
        a, b = lflat[a_path], lflat[b_path]
        w = jnp.array(flat[site.path], copy=True)  # donated below; the caller's array stays whole
        if site.layered:
            fold = _fold_fn(w, scale, site.n_batch, per_layer=True)
            for i in range(w.shape[0]):
                w = fold(w, a[i], b[i], i)
        else:
            w = _fold_fn(w, scale, site.n_batch, per_layer=False)(w, a, b)
        flat[site.path] = w
    return traverse_util.unflatten_dict(flat)
