"""Pure training-step pieces: parameter partitioning, the optimised objective, the optimizer and its update."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from aria_jax.kernels.quantized import QWeight, dense
from aria_jax.model.layers import LORA, lora_dropout
from aria_jax.training.lora import scale_lora
from aria_jax.training.losses import lm_loss_sum, lm_loss_sum_linear, load_balancing_loss, z_loss

Flat = dict[tuple[str, ...], jax.Array]


def part_of(path: tuple[str, ...]) -> str:
    return {"vision_tower": "vit", "projector": "projector", "language_model": "llm"}[path[0]]


def frozen_parts(cfg) -> set[str]:
    return {name for name, flag in (("vit", cfg.freeze_vit), ("projector", cfg.freeze_projector),
                                    ("llm", cfg.freeze_llm)) if flag}


def split_params(params: dict, trainable: Callable[[tuple[str, ...]], bool]) -> tuple[Flat, Flat]:
    flat = traverse_util.flatten_dict(params)
    return ({p: v for p, v in flat.items() if trainable(p)}, {p: v for p, v in flat.items() if not trainable(p)})


def layer_masks(flat: Flat, frozen_layers: list[int], n_layers: int) -> Flat:
    """Per decoder parameter: 1.0 for trainable layers, 0.0 for ``freeze_llm_layers`` (broadcastable); stacked
    (``layers``) or per-layer (``layers_{i}``, aria_jax.parallel.layout.unroll_layers) paths."""
    if not frozen_layers:
        return {}
    keep = jnp.ones(n_layers, jnp.float32).at[jnp.asarray(frozen_layers, jnp.int32)].set(0.0)
    masks = {}
    for p, v in flat.items():
        if p[:2] == ("language_model", "layers"):
            masks[p] = keep.reshape((n_layers,) + (1,) * (v.ndim - 1))
        elif p[0] == "language_model" and p[1].startswith("layers_"):
            masks[p] = keep[int(p[1].split("_")[1])]
    return masks


def apply_masks(tree: dict, masks: Flat) -> dict:
    """Nested ``tree`` with the (flat-keyed) layer masks multiplied in."""
    if not masks:
        return tree
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v * masks[p].astype(v.dtype) if p in masks else v for p, v in flat.items()})


@dataclasses.dataclass(frozen=True)
class LossSpec:
    top_k: int
    aux_coeff: float
    z_coeff: float
    grad_accum: int
    lora_scale: float | None  # None: full fine-tuning; else LoRA with B scaled by alpha / r
    lora_dropout: float = 0.0
    compute_dtype: jnp.dtype = jnp.float32


def compute_cast(path: tuple[str, ...], value: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A parameter in the compute dtype; a quantized weight's int8 values and float32 scales (aria_jax.quant) as
    they are (the quantized matmuls dequantize to the activations' dtype themselves)."""
    if not jnp.issubdtype(value.dtype, jnp.floating) or path[-1].endswith("_scale"):
        return value
    return value.astype(dtype)


def lm_head_kernel(lm_head: dict, dtype: jnp.dtype) -> jax.Array:
    """lm_head's (D, V) kernel for the fused loss: the float one, or a quantized base's dequantized."""
    if "kernel" in lm_head:
        return lm_head["kernel"]
    q = lm_head["kernel_q"]
    return dense(QWeight(q, lm_head["kernel_scale"], (q.shape[-2],)), dtype)


def make_objective(module, spec: LossSpec) -> Callable:
    """objective(trainable, frozen, batch, rng, denom) -> (value, metrics).

    value = CE sum / denom (denom: label tokens in the whole accumulated step) + (z_coeff * z + aux_coeff * aux) /
    grad_accum, the router losses summed over layers (their gradient, as the original's MoEAuxLossAutoScaler).
    """

    def objective(trainable: dict, frozen: dict, batch: dict, rng: jax.Array, denom: jax.Array):
        trainable, frozen = traverse_util.flatten_dict(trainable), traverse_util.flatten_dict(frozen)
        cast = lambda t: {p: compute_cast(p, v, spec.compute_dtype) for p, v in t.items()}
        if spec.lora_scale is None:
            variables = {"params": traverse_util.unflatten_dict(cast({**frozen, **trainable}))}
        else:
            lora = scale_lora(traverse_util.unflatten_dict(cast(trainable)), spec.lora_scale)
            variables = {"params": traverse_util.unflatten_dict(cast(frozen)), LORA: lora}
        # lm_head is fused into the loss unless it carries a LoRA pair.
        fused = spec.lora_scale is None or not any(p[:2] == ("language_model", "lm_head") for p in trainable)
        with lora_dropout(spec.lora_dropout if spec.lora_scale is not None else 0.0):
            output = module.apply(
                variables, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                batch.get("pixel_mask"), rngs={"dropout": rng}, image_offsets=batch.get("image_offsets"),
                compute_logits=not fused,
            )
        router_logits = output.router_logits
        if fused:
            kernel = lm_head_kernel(variables["params"]["language_model"]["lm_head"], spec.compute_dtype)
            ce_sum, count = lm_loss_sum_linear(output.hidden, kernel, batch["labels"])
        else:
            ce_sum, count = lm_loss_sum(output.logits, batch["labels"])
        z = z_loss(router_logits)
        aux = load_balancing_loss(router_logits, spec.top_k)
        lm = ce_sum / denom
        value = lm + (spec.z_coeff * z + spec.aux_coeff * aux) / spec.grad_accum
        return value, {"ce_sum": ce_sum, "label_tokens": count, "z_loss": z, "aux_loss": aux}

    return objective


def make_grad_fn(objective: Callable) -> Callable:
    """``grad_fn(spare, trainable, frozen, batch, rng, denom) -> ((value, metrics), grads)``, jitted.

    ``spare`` is a gradient tree the caller no longer needs (the last step's gradients once the update has read
    them; ``jnp.zeros_like(trainable)`` the first time). It is donated and the new gradients are written into its
    buffers: on CPU every fresh buffer is page-faulted in again on each step (the gradients of the benchmark's
    mid-size model are 0.64 GB: half the step's page faults, about 0.4 s of system CPU time per step).
    """
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    return jax.jit(lambda spare, *args: value_and_grad(*args), donate_argnums=(0,), keep_unused=True)


def make_schedule(kind: str, lr: float, total: int, warmup: int) -> optax.Schedule:
    """transformers' schedules: linear warmup from 0 (the first update uses step 0), then cosine/linear to 0."""
    if kind == "constant":
        return optax.constant_schedule(lr)
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1)) if warmup > 0 else optax.constant_schedule(lr)
    decay_steps = max(total - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    return optax.join_schedules([warm, decay], [warmup])


def decay_mask(tree: dict) -> dict:
    """Weight decay on matrices only: not on biases and norm scales (as transformers' Trainer)."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: not (p[-1] == "scale" or p[-1].endswith("bias")) for p in flat})


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the gradients by ``min(1, max_norm / norm)``, as ``torch.nn.utils.clip_grad_norm_`` (without its 1e-6).

    A multiply by one scalar, which XLA fuses into AdamW's moment updates; optax's divide-and-select form made XLA
    materialise a clipped copy of every gradient first (a fifth of a CPU training step, mostly page faults).
    """

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, schedule: optax.Schedule, trainable: dict) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                    weight_decay=cfg.weight_decay, mask=decay_mask(trainable)),
    )


def make_update(tx: optax.GradientTransformation, masks: Flat, schedule: optax.Schedule) -> Callable:
    """update(state, grads) -> (state, grad_norm, lr): masked (frozen layers) AdamW step on the summed grads."""

    def update(state: dict, grads: dict):
        grads = apply_masks(grads, masks)
        norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        updates = apply_masks(updates, masks)
        lr = schedule(state["step"])
        new = {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
               "opt_state": opt_state}
        return new, norm, lr

    return update


def total_steps(cfg, num_samples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(num_samples / cfg.per_device_train_batch_size / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


def active_params(flat: Flat, top_k: int, n_experts: int) -> float:
    """Parameters touched per token in the decoder (routed experts count k / E), for the TFLOP/s estimate."""
    total = 0.0
    for p, v in flat.items():
        if p[0] != "language_model" or p[-1] == "embed_tokens":
            continue
        total += v.size * (top_k / n_experts if p[-1] in ("gate_up", "down") else 1.0)
    return total
