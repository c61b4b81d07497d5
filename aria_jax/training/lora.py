"""LoRA as explicit pytrees: which parameters get an (A, B) pair, their init, scaling and merging.

``lora_target_modules`` select sites as the original rhymes-ai/Aria trainer does (``aria/lora/utils.py``): every
module name of the original model, less those in frozen parts, is matched by substring against each target, and
PEFT then puts LoRA on the matched modules. The original names are the hub checkpoint's with the vision tower under
``vision_tower.vision_model.`` and the projector FFN as ``multi_modal_projector.ffn.`` (so ``fc1`` selects the
routed experts' ``experts.fc1`` and the vision MLP's ``mlp.fc1``, ``q_proj`` the text, vision and projector query
projections, ``linear`` the projector's ``cross_attn.linear``, ``ffn.linear_in`` and ``ffn.linear_out``). A target
that matches a module PEFT cannot adapt (``mlp``, ``layer_norm1``, ``embed_tokens``) is refused, as the original
refuses it; one that matches nothing in the model is refused as unknown. aria-jax puts a pair on a stacked parameter
in every layer or in none: a target naming layer numbers (``layers.3.``) is refused (``freeze_llm_layers`` leaves
layers out, as in the original). Where the sites are and how a pair folds in: ``aria_jax.model.lora``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from aria_jax.config import AriaConfig
from aria_jax.model.lora import SITES, LoraSite, lora_product, merge_pairs, original_name, pair_paths
from aria_jax.model.schema import param_specs

__all__ = ["RULES", "Rule", "init_lora", "lora_product", "merge_lora", "original_name", "scale_lora", "select_rules"]


@dataclasses.dataclass(frozen=True)
class Rule(LoraSite):
    target: str = ""  # the lora_target_modules entry that selected it (the first that matches, as the original)

    @property
    def suffix(self) -> tuple[str, ...]:
        return self.path


def _rule(site: LoraSite, target: str) -> Rule:
    return Rule(**{f.name: getattr(site, f.name) for f in dataclasses.fields(LoraSite)}, target=target)


RULES: tuple[Rule, ...] = tuple(_rule(s, s.module.rsplit(".", 1)[-1]) for s in SITES if s.trainable)

# The original model's other modules (PEFT cannot put LoRA on them), "{i}" for the layer index, by part.
_T, _V = "language_model.model.layers.{i}.", "vision_tower.vision_model.encoder.layers.{i}."
_OTHER: dict[str, tuple[str, ...]] = {
    "llm": ("language_model", "language_model.model", "language_model.model.embed_tokens",
            "language_model.model.layers", _T[:-1], _T + "self_attn", _T + "self_attn.rotary_emb", _T + "mlp",
            _T + "mlp.router", _T + "mlp.experts", _T + "mlp.shared_experts", _T + "mlp.shared_experts.act_fn",
            _T + "input_layernorm", _T + "post_attention_layernorm", "language_model.model.norm",
            "language_model.model.rotary_emb"),
    "vit": ("vision_tower", "vision_tower.vision_model", "vision_tower.vision_model.embeddings",
            "vision_tower.vision_model.embeddings.patch_embedding",
            "vision_tower.vision_model.embeddings.position_embedding", "vision_tower.vision_model.encoder",
            "vision_tower.vision_model.encoder.layers", _V[:-1], _V + "self_attn", _V + "layer_norm1", _V + "mlp",
            _V + "mlp.activation_fn", _V + "layer_norm2", "vision_tower.vision_model.post_layernorm"),
    "projector": ("multi_modal_projector", "multi_modal_projector.cross_attn",
                  "multi_modal_projector.cross_attn.multihead_attn", "multi_modal_projector.cross_attn.dropout",
                  "multi_modal_projector.cross_attn.layer_norm", "multi_modal_projector.cross_attn.ln_kv",
                  "multi_modal_projector.ln_ffn", "multi_modal_projector.ffn", "multi_modal_projector.ffn.act"),
}


def _layer_count(template: str, config: AriaConfig | None) -> int | None:
    if config is None:
        return None
    return config.vision.num_hidden_layers if template.startswith("vision_tower") else config.text.num_hidden_layers


def _hits(target: str, template: str, count: int | None) -> bool | set[int]:
    """True when ``target`` is a substring of the module's name in every layer, else the layers where it is."""
    if "{i}" not in template:
        return target in template or set()
    prefix, suffix = template.split("{i}")
    if target in prefix or target in suffix:
        return True
    if not re.search(r"\d", target):  # only the index's digits vary: a target without digits cannot span them
        return set()
    return {i for i in range(count if count is not None else 1000) if target in template.format(i=i)}


def _selects(targets: list[str], template: str, config: AriaConfig | None) -> tuple[str | None, bool]:
    """(the first target matching the module in some layer, whether the targets match it in every layer)."""
    count = _layer_count(template, config)
    first, covered = None, set()
    for target in targets:
        hits = _hits(target, template, count)
        if hits:
            first = first or target
            if hits is True:
                return first, True
            covered |= hits
    return first, count is not None and len(covered) == count


def select_rules(targets: list[str], frozen_parts: set[str], config: AriaConfig | None = None) -> list[Rule]:
    """The LoRA sites that the recipe's ``lora_target_modules`` select outside the frozen parts ("vit",
    "projector", "llm"). Bad targets raise ValueError naming them. ``config`` (the model's) is needed only for
    targets whose digits match layer indices (``layers.0.``): then the targets together must name every layer."""
    bad = [t for t in targets if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"target {bad[0]!r} is not a module name")
    used = {t for t in targets if any(_hits(t, original_name(s.module), None) for s in SITES)}
    rules = []
    for site in SITES:
        if site.part in frozen_parts:
            continue
        name = original_name(site.module)
        first, every = _selects(targets, name, config)
        if first is not None and not every:
            shown = name.replace("{i}", "N")
            raise ValueError(f"'{first}' selects {shown} in only some layers; aria-jax puts LoRA on a parameter in "
                             "every layer or in none (freeze_llm_layers leaves decoder layers out)")
        if first is not None and site.trainable:
            rules.append(_rule(site, first))
    for part, names in _OTHER.items():
        for name in names:
            for target in targets:
                if not _hits(target, name, _layer_count(name, config)):
                    continue
                used.add(target)
                if part not in frozen_parts:
                    raise ValueError(f"'{target}' matches module {name.replace('{i}', 'N')}, which LoRA cannot adapt "
                                     "(PEFT adapts linear layers and the routed experts)")
    unknown = [t for t in targets if t not in used]
    if unknown:
        known = sorted({s.module.rsplit(".", 1)[-1] for s in SITES})
        raise ValueError(f"unknown lora_target_modules: {', '.join(unknown)} (no module of Aria contains it; "
                         f"the module names end in {', '.join(known)})")
    return rules


def init_lora(params: dict, rules: list[Rule], rank: int, key: jax.Array, config: AriaConfig | None = None) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform(a=sqrt 5)), B = 0, in the params' dtype.

    The pairs take their shapes from the weights' logical shapes: those of ``params``, or with ``config`` those of
    the parameter schema (``model.schema.param_specs``), which a quantized base needs (its weight ``kernel`` is
    stored as ``kernel_q`` (N, K) + ``kernel_scale``: aria_jax.quant); the pairs of a quantized weight are float32.
    """
    flat = traverse_util.flatten_dict(params)
    logical = {} if config is None else {tuple(k.split("/")): s for k, (s, _) in param_specs(config).items()}
    out = {}
    for i, rule in enumerate(rules):
        if rule.path in flat:
            shape, dtype = flat[rule.path].shape, flat[rule.path].dtype
        elif rule.path in logical and rule.path[:-1] + (rule.path[-1] + "_q",) in flat:
            shape, dtype = logical[rule.path], jnp.float32
        else:  # e.g. vision layers past vision_feature_layer: not in the model
            continue
        batch, rest = shape[: rule.n_batch], shape[rule.n_batch :]
        ins, outs = rest[: rule.n_in], rest[rule.n_in :]
        bound = 1.0 / math.sqrt(math.prod(ins))
        a_path, b_path = pair_paths(rule.path)
        k = jax.random.fold_in(key, i)
        out[a_path] = jax.random.uniform(k, batch + ins + (rank,), jnp.float32, -bound, bound).astype(dtype)
        out[b_path] = jnp.zeros(batch + (rank,) + outs, dtype)
    return traverse_util.unflatten_dict(out)


def scale_lora(lora: dict, scale: float) -> dict:
    """The "lora" collection the model reads: every B multiplied by alpha / r."""
    flat = traverse_util.flatten_dict(lora)
    return traverse_util.unflatten_dict({p: v * scale if p[-1].endswith("_b") else v for p, v in flat.items()})


def merge_lora(params: dict, lora: dict, scale: float, rules: list[Rule] | tuple[Rule, ...] = RULES) -> dict:
    """Base params (stacked) with every LoRA pair folded in: ``W + A @ B * alpha / r`` (``model.lora.merge_pairs``)."""
    del rules  # every pair in ``lora`` names its site
    return merge_pairs(params, lora, scale)
