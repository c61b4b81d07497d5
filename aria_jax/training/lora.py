"""LoRA as explicit pytrees: which parameters get an (A, B) pair, their init, scaling and merging.

The model reads the pairs from its "lora" collection (aria_jax.model.layers.lora_delta and the MoE's grouped-matmul
branch). For a parameter W of shape ``batch + in + out`` (batch: the stacked layer axis and, for routed experts,
the expert axis), A is ``batch + in + (r,)`` and B is ``batch + (r,) + out``; the model adds ``x @ A @ (B * alpha/r)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    target: str  # the original recipe's lora_target_modules name
    suffix: Path  # parameter path suffix
    part: str  # "llm" or "projector": pruned when that part is frozen
    n_batch: int
    n_in: int


_LLM_LAYERS = ("language_model", "layers")
RULES: tuple[Rule, ...] = (
    *(Rule(f"{n}_proj", _LLM_LAYERS + ("self_attn", f"{n}_kernel"), "llm", 1, 1) for n in "qkv"),
    Rule("o_proj", _LLM_LAYERS + ("self_attn", "o_kernel"), "llm", 1, 2),
    Rule("fc1", _LLM_LAYERS + ("mlp", "gate_up"), "llm", 2, 1),
    Rule("fc2", _LLM_LAYERS + ("mlp", "down"), "llm", 2, 1),
    *(Rule(n, _LLM_LAYERS + ("mlp", "shared_experts", n, "kernel"), "llm", 1, 1)
      for n in ("gate_proj", "up_proj", "down_proj")),
    Rule("lm_head", ("language_model", "lm_head", "kernel"), "llm", 0, 1),
    *(Rule(n, ("projector", "cross_attn", n, "kernel"), "projector", 0, 1) for n in ("q_proj", "k_proj", "v_proj")),
    Rule("linear", ("projector", "cross_attn", "linear", "kernel"), "projector", 0, 1),
    Rule("linear_in", ("projector", "linear_in", "kernel"), "projector", 0, 1),
    Rule("linear_out", ("projector", "linear_out", "kernel"), "projector", 0, 1),
)
KNOWN_TARGETS = {r.target for r in RULES} | {"out_proj"}  # out_proj (vision attention) is skipped: ViT frozen


def select_rules(targets: list[str], frozen_parts: set[str]) -> list[Rule]:
    unknown = sorted(set(targets) - KNOWN_TARGETS)
    if unknown:
        known = ", ".join(sorted(KNOWN_TARGETS))
        raise ValueError(f"unknown lora_target_modules: {', '.join(unknown)}; known: {known}")
    return [r for r in RULES if r.target in targets and r.part not in frozen_parts]


def _pair_paths(path: Path) -> tuple[Path, Path]:
    return path[:-1] + (path[-1] + "_a",), path[:-1] + (path[-1] + "_b",)


def init_lora(params: dict, rules: list[Rule], rank: int, key: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform(a=sqrt 5)), B = 0, in the params' dtype."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, rule in enumerate(rules):
        w = flat[rule.suffix]
        batch, rest = w.shape[: rule.n_batch], w.shape[rule.n_batch :]
        ins, outs = rest[: rule.n_in], rest[rule.n_in :]
        bound = 1.0 / math.sqrt(math.prod(ins))
        a_path, b_path = _pair_paths(rule.suffix)
        k = jax.random.fold_in(key, i)
        out[a_path] = jax.random.uniform(k, batch + ins + (rank,), jnp.float32, -bound, bound).astype(w.dtype)
        out[b_path] = jnp.zeros(batch + (rank,) + outs, w.dtype)
    return traverse_util.unflatten_dict(out)


def scale_lora(lora: dict, scale: float) -> dict:
    """The "lora" collection the model reads: every B multiplied by alpha / r."""
    flat = traverse_util.flatten_dict(lora)
    return traverse_util.unflatten_dict({p: v * scale if p[-1].endswith("_b") else v for p, v in flat.items()})


def lora_product(a: jax.Array, b: jax.Array, n_batch: int, w_shape: tuple[int, ...]) -> jax.Array:
    """A @ B over the rank axis with the batch axes kept: the dense update of shape ``w_shape``."""
    batch = a.shape[:n_batch]
    n = math.prod(batch)
    a2 = a.reshape(n, -1, a.shape[-1])
    b2 = b.reshape(n, b.shape[n_batch], -1)
    return jnp.einsum("nir,nro->nio", a2, b2).reshape(w_shape)


def merge_lora(params: dict, lora: dict, scale: float, rules: list[Rule] = RULES) -> dict:
    """Base params with every LoRA pair folded in: ``W + A @ B * alpha / r``."""
    flat = dict(traverse_util.flatten_dict(params))
    lflat = traverse_util.flatten_dict(lora)
    for rule in rules:
        a_path, b_path = _pair_paths(rule.suffix)
        if a_path not in lflat:
            continue
        w = flat[rule.suffix]
        a, b = lflat[a_path].astype(jnp.float32), lflat[b_path].astype(jnp.float32)
        delta = lora_product(a, b, rule.n_batch, w.shape)
        flat[rule.suffix] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)
