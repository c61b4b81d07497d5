"""The exports at the end of a fine-tuning run: the model as HF safetensors (``export_hf``, through the one HF
writer ``aria_jax.checkpoint.export.write_hf``) and LoRA adapters on their own (``export_adapter``)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from aria_jax.checkpoint.export import tree_reader, write_hf
from aria_jax.checkpoint.hf_keys import detect_layout, to_hub_name
from aria_jax.checkpoint.safetensors_io import CheckpointError, open_checkpoint
from aria_jax.config import AriaConfig
from aria_jax.files import copy_tokenizer_files


def base_tensors(base_dir: str | None):
    """``Fill`` for ``write_hf``: the tensors no parameter fills (vision layers past vision_feature_layer, the vision
    post_layernorm), read from the base checkpoint the run started from when it has them."""
    if base_dir is None:
        return None
    try:
        tensors = open_checkpoint(base_dir)
    except CheckpointError:  # e.g. a hub snapshot of a converted directory: nothing to take over
        return None
    layout = detect_layout(list(tensors), base_dir)
    by_hub = {to_hub_name(name, layout): (name, shard) for name, shard in tensors.items()}

    def fill(key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        name, shard = by_hub.get(key, (None, None))
        return None if shard is None or tuple(shard.shape(name)) != shape else shard.get(name)

    return fill


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
    """The fine-tuned model in float32 as an HF checkpoint (hub key layout) that transformers loads, with the base
    directory's tokenizer, processor and generation files."""
    os.makedirs(directory, exist_ok=True)
    write_hf(directory, cfg, tree_reader(params), np.float32, layout="hub", fill=base_tensors(base_dir),
             progress=False)
    if base_dir is not None:
        copy_tokenizer_files(base_dir, directory)
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
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in
                                         load_file(os.path.join(directory, "adapter.safetensors")).items()})
