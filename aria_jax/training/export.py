"""The exports at the end of a fine-tuning run: the model as HF safetensors (``export_hf``, through the one HF
writer ``aria_jax.checkpoint.export.write_hf``) and LoRA adapters on their own in PEFT's format (``export_adapter``,
through ``aria_jax.checkpoint.peft.save_adapter``)."""

from __future__ import annotations

import os
import re

import numpy as np
from safetensors.numpy import save_file

from aria_jax.checkpoint.export import tree_reader, write_hf
from aria_jax.checkpoint.hf_keys import detect_layout, to_hub_name
from aria_jax.checkpoint.peft import save_adapter
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
    """The LoRA pairs as a PEFT adapter (adapter_config.json + adapter_model.safetensors) for transformers 5's
    ``AriaForConditionalGeneration``: ``peft.PeftModel.from_pretrained`` and ``Aria.from_pretrained(...,
    adapter=...)`` load it (``aria_jax.checkpoint.peft``). Layers in freeze_llm_layers are left out, as the original
    trainer leaves them out; ``rules`` is unused (every pair names its site)."""
    del rules
    os.makedirs(directory, exist_ok=True)
    # at the scale the run used (lora_alpha / lora_r); pairs of another rank get rank_pattern entries
    return save_adapter(directory, lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.model_name_or_path,
                        skip_layers=cfg.freeze_llm_layers or ())
