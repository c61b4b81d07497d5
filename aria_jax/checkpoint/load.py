"""Parameters for inference from any checkpoint directory, float or quantized (aria_jax.quant), on a device or mesh.

- an HF safetensors directory: streamed (``hf_keys.load_params``); with a quantization, each weight is quantized on
  the host as it is read, so the float model never exists on a device;
- a converted float directory: restored (``converted.restore_params``); with a quantization, restored on the host
  CPU first and quantized there weight by weight;
- a converted quantized directory: restored as stored (int4 packed) and unpacked on the device where the runtime
  holds int4 one value per byte (CPU).

A LoRA adapter (``checkpoint.peft``) is merged into the float weights before they are quantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aria_jax.checkpoint.converted import is_converted, restore_params, stored_quantization
from aria_jax.checkpoint.hf_keys import load_params
from aria_jax.checkpoint.peft import merge_adapter
from aria_jax.checkpoint.safetensors_io import CheckpointError
from aria_jax.config import AriaConfig
from aria_jax.kernels.quantized import unpack_int4
from aria_jax.model.quantize import quantize_params
from aria_jax.model.schema import declared_params
from aria_jax.parallel.sharding import param_shardings
from aria_jax.quant import QuantSpec, group_size


def resolve_quantization(path: str, asked: QuantSpec | None) -> QuantSpec | None:
    """The quantization a model loaded from ``path`` runs in: what a converted directory stores, else ``asked``.
    A converted directory stored in another format than ``asked`` is refused (no requantizing of rounded weights)."""
    stored = stored_quantization(path) if is_converted(path) else None
    if stored is not None and asked is not None and asked != stored:
        raise CheckpointError(f"{path}: weights are stored as {stored.format} (group {stored.group}); load it without "
                              f"quantize, or convert the float checkpoint with --quantize {asked.format}")
    return stored or asked


def _unpack_stored(params: dict, cfg: AriaConfig, quant: QuantSpec) -> dict:
    """int4 ``_q`` leaves restored packed -> one value per byte (the CPU runtime's holding)."""
    def unpack(path, leaf):
        name = path[-1].key
        if leaf.dtype != jnp.uint8 or not name.endswith("_q"):
            return leaf
        k = leaf.shape[-1] * 2
        return jax.jit(unpack_int4, static_argnums=1)(leaf, group_size(k, quant.group))

    return jax.tree_util.tree_map_with_path(unpack, params)


def load_inference_params(path: str, config: AriaConfig, dtype: jnp.dtype, mesh, quant: QuantSpec | None,
                          packed: bool = True, lora: dict | None = None) -> dict:
    """The stacked params of the checkpoint at ``path`` in ``dtype`` (``quant``: quantized, as ``resolve_quantization``
    chose; ``packed``: int4 two per byte in memory), on one device or placed on ``mesh``; ``lora`` merged."""
    shapes = declared_params(config, dtype, quant, packed)[0]
    shardings = param_shardings(config, mesh, quant=quant, packed=packed) if mesh is not None else None
    stored = stored_quantization(path) if is_converted(path) else None
    if stored is not None:
        if lora is not None:
            raise CheckpointError(f"{path}: an adapter cannot be merged into quantized weights; load the float "
                                  "checkpoint with the adapter and quantize")
        disk_shapes = declared_params(config, dtype, stored, True)[0]
        disk_shardings = param_shardings(config, mesh, quant=stored, packed=True) if mesh is not None else None
        params = restore_params(path, disk_shapes, disk_shardings)
        return params if packed else _place(_unpack_stored(params, config, stored), shardings)
    if quant is None:
        params = _float(path, config, dtype, shardings)
        return params if lora is None else merge_adapter(params, lora)
    if lora is None and not is_converted(path):  # streamed: quantized as read
        return load_params(path, config, shapes, dtype, shardings, quant, packed)[0]
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    params = _float(path, config, dtype, jax.tree.map(lambda _: host, declared_params(config, dtype)[0]))
    if lora is not None:
        params = merge_adapter(params, lora)
    return _place(quantize_params(params, quant, packed), shardings)


def _float(path: str, config: AriaConfig, dtype: jnp.dtype, shardings) -> dict:
    shapes = declared_params(config, dtype)[0]
    if is_converted(path):
        return restore_params(path, shapes, shardings)
    return load_params(path, config, shapes, dtype, shardings)[0]


def _place(params: dict, shardings) -> dict:
    if shardings is None:
        device = jax.devices()[0]
        return jax.tree.map(lambda a: jax.device_put(a, device), params)
    return jax.tree.map(jax.device_put, params, shardings)
