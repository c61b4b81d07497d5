"""Params -> HF safetensors (hub key layout) that transformers' AriaForConditionalGeneration loads, and LoRA
adapters on their own. Minimal and self-contained: the inverse of aria_jax.weights.tensor_specs, obtained by
running each (linear, index-permuting) load transform on an array of flat indices and scattering back."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from aria_jax.config import AriaConfig
from aria_jax.weights import tensor_specs

_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
         "chat_template.jinja", "processor_config.json", "preprocessor_config.json", "generation_config.json")


def _base_tensor(base_dir: str | None, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if base_dir is None:
        return None
    from aria_jax.safetensors_io import open_checkpoint
    from aria_jax.weights import detect_layout, to_hub_name

    tensors = open_checkpoint(base_dir)
    layout = detect_layout(list(tensors), base_dir)
    for name, shard in tensors.items():
        if to_hub_name(name, layout) == key and tuple(shard.shape(name)) == shape:
            return np.asarray(shard.get(name), np.float32)
    return None


def to_hf_tensors(params: dict, cfg: AriaConfig, base_dir: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of ``tensor_specs`` in float32; tensors no parameter fills (unused vision layers) come from
    the base checkpoint when there is one, else zeros. Adds the vision post_layernorm transformers expects."""
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    out: dict[str, np.ndarray] = {}
    for key, (shape, targets) in tensor_specs(cfg).items():
        if not targets:
            base = _base_tensor(base_dir, key, shape)
            out[key] = base if base is not None else np.zeros(shape, np.float32)
            continue
        tensor = np.zeros(math.prod(shape), np.float32)
        index = np.arange(math.prod(shape)).reshape(shape)
        for t in targets:
            value = flat[t.path] if t.layer is None else flat[t.path][t.layer]
            tensor[np.asarray(t.transform(index)).reshape(-1)] = value.reshape(-1)
        out[key] = tensor.reshape(shape)
    d = cfg.vision.hidden_size
    for name, default in (("weight", np.ones(d, np.float32)), ("bias", np.zeros(d, np.float32))):
        key = f"vision_tower.post_layernorm.{name}"
        base = _base_tensor(base_dir, key, (d,))
        out[key] = base if base is not None else default
    return out


def save_tensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file``, whose file-system failures (a full disk) are OSErrors naming ``path``."""
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as exc:  # SafetensorError("... I/O error: No space left on device (os error 28)")
        match = re.search(r"os error (\d+)", str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), path) from None


def export_hf(params: dict, cfg: AriaConfig, directory: str, base_dir: str | None = None) -> str:
    """Write model.safetensors + config.json (+ the base directory's tokenizer/processor files)."""
    os.makedirs(directory, exist_ok=True)
    tensors = to_hf_tensors(params, cfg, base_dir)
    tmp = os.path.join(directory, "model.safetensors.tmp")
    save_tensors({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    config = cfg.to_dict()
    config["dtype"] = "float32"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in _COPY if base_dir else ():
        if os.path.isfile(os.path.join(base_dir, name)):
            shutil.copy(os.path.join(base_dir, name), os.path.join(directory, name))
    return directory


def export_adapter(lora: dict, rules, cfg, directory: str) -> str:
    """adapter.safetensors (keys: parameter path joined by '/', ``_a``/``_b`` suffixes) + adapter_config.json."""
    os.makedirs(directory, exist_ok=True)
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in traverse_util.flatten_dict(lora).items()}
    save_tensors(flat, os.path.join(directory, "adapter.safetensors"))
    meta = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted({r.target for r in rules}), "base_model": cfg.model_name_or_path,
            "format": "aria-jax lora: W + A @ B * lora_alpha / r; A (batch, in, r), B (batch, r, out)"}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return directory


def load_adapter(directory: str) -> dict:
    from safetensors.numpy import load_file

    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in
                                         load_file(os.path.join(directory, "adapter.safetensors")).items()})
