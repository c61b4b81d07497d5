"""QLoRA: LoRA pairs trained over a frozen base whose weights are quantized to int8 or int4 (recipe key
``quantize_base``; the formats: aria_jax.quant).

The base is quantized while it is loaded (``Aria.from_pretrained(quantize=...)`` / ``Aria.from_config``: the float
model is never held on a device), or read as stored from a directory converted with ``--quantize``. The model runs
with ``Runtime.quant`` set, so every matmul reads the ``_q``/``_scale`` pairs and adds its LoRA branch unmerged
(``model.layers.lora_delta``; the routed experts in every backend: ``kernels.experts``). The pairs take the weights'
logical shapes (``training.lora.init_lora`` with the config) and train in float32 as under plain LoRA.

What the run writes: checkpoints hold the training state (the LoRA pairs, their AdamW moments, the step), never
the base; the export merges the adapter into the dequantized base in float32 (``float_base`` then
``training.lora.merge_lora``), and the PEFT adapter is written as it is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from aria_jax.config import AriaConfig
from aria_jax.model.quantize import dequantize_params, is_quantized
from aria_jax.model.schema import param_specs
from aria_jax.quant import QuantSpec, parse
from aria_jax.training.config import RecipeError, TrainConfig


def base_quant(cfg: TrainConfig) -> QuantSpec | None:
    """The base's quantization the recipe asks for (None: a float base)."""
    return parse(cfg.quantize_base)


def check_loaded(cfg: TrainConfig, stored: QuantSpec | None, key: str) -> None:
    """A model directory stored quantized (converted with ``--quantize``) trains only as QLoRA in its format."""
    if stored is not None and cfg.quantize_base is None:
        raise RecipeError(f"config key '{key}': {getattr(cfg, key)} holds {stored.format} weights; train LoRA over "
                          f"them with quantize_base: {stored.format} and use_peft: true, or use the float checkpoint")


def nbytes(params: dict) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


def describe(params: dict, config: AriaConfig, quant: QuantSpec) -> str:
    """One line for the log: the base's bytes as held, next to float32."""
    held = nbytes(params)
    full = sum(math.prod(shape) * 4 for shape, _ in param_specs(config).values())
    return (f"quantize_base {quant.format}: the frozen base holds {quant.format} weights ({held / 2**20:.1f} MiB, "
            f"float32: {full / 2**20:.1f} MiB); LoRA pairs train in float32 over it; checkpoints hold the adapter "
            "only; the export merges it into the dequantized base in float32")


def float_base(params: dict, config: AriaConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """The base as float weights for a merged export: a quantized one dequantized (values x scales), else as is."""
    return dequantize_params(params, config, dtype) if is_quantized(params) else params


def logical_params(params: dict, config: AriaConfig) -> dict:
    """Flat {path: array or ShapeDtypeStruct} of the weights' logical shapes (a quantized base's from the schema):
    what ``steps.active_params`` counts."""
    if not is_quantized(params):
        return traverse_util.flatten_dict(params)
    return {tuple(k.split("/")): jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in param_specs(config).items()}
