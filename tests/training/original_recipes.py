"""The original rhymes-ai/Aria recipes and datasets, for the tests of issue 20: recipes/config_{lora,full}.yaml
verbatim, the examples' recipes as their differences from those, datasets laid out as the original's
docs/custom_dataset.md describes them, and a Hugging Face cache built by hand (HF_HUB_OFFLINE: nothing is
downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image
from train_helpers import REPO

ORIGINAL_LORA = """\
model_name_or_path: rhymes-ai/Aria
tokenizer_path: rhymes-ai/Aria

# Dataset config
dataset_mixer:
  "path/to/dataset1": 1
  "path/to/dataset2": 0.5
  "path/to/dataset3": 2
dataloader_num_workers: 8

# SFT trainer config
per_device_train_batch_size: 8
gradient_accumulation_steps: 2
output_dir: out/refcoco_moe_lora_980
bf16: true
torch_dtype: bfloat16
gradient_checkpointing: true
log_level: info
logging_steps: 1
save_strategy: epoch
resume_from_checkpoint: false # resume from the latest checkpoint in output_dir if set to true
## hyper params
num_train_epochs: 1
eval_strategy: 'no'
learning_rate: 5e-5
weight_decay: 0.1
adam_beta2: 0.95
warmup_ratio: 0.01
lr_scheduler_type: "cosine"
max_image_size: 980
seed: 42
max_seq_length: 2048
report_to: wandb


# Model config
moe_z_loss_coeff: 1e-5
moe_aux_loss_coeff: 1e-4
freeze_vit: true
freeze_llm: false
# freeze_llm_layers: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
freeze_projector: true
use_peft: true
lora_r: 8
lora_alpha: 32
lora_dropout: 0.05
lora_target_modules:
  - fc1
  - fc2
  - q_proj
  - k_proj
  - v_proj
  - linear
  - o_proj
  - up_proj
  - down_proj
  - out_proj
  - gate_proj
  - lm_head

"""

ORIGINAL_FULL = """\
model_name_or_path: rhymes-ai/Aria
tokenizer_path: rhymes-ai/Aria

# Dataset config
dataset_mixer:
  "path/to/dataset1": 1
  "path/to/dataset2": 0.5
  "path/to/dataset3": 2
dataloader_num_workers: 8

# SFT trainer config
per_device_train_batch_size: 8
gradient_accumulation_steps: 2
output_dir: out/refcoco_moe_980
bf16: true
torch_dtype: bfloat16
gradient_checkpointing: true
log_level: info
logging_steps: 1
save_strategy: epoch
resume_from_checkpoint: false # resume from the latest checkpoint in output_dir if set to true
## hyper params
num_train_epochs: 1
eval_strategy: 'no'
learning_rate: 5e-6
weight_decay: 0.1
adam_beta2: 0.95
warmup_ratio: 0.01
lr_scheduler_type: "cosine"
max_image_size: 980
seed: 42
max_seq_length: 2048
report_to: wandb


# Model config
moe_z_loss_coeff: 1e-5
moe_aux_loss_coeff: 1e-4
freeze_vit: true
freeze_llm: false
# freeze_llm_layers: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
freeze_projector: false
"""

# The examples' recipes: what each changes in the recipe of its kind (the key sets are otherwise the same).
EXAMPLES = {
    "code_sft/config_lora": ({"dataset_mixer": {"datasets/code_sft": 0.3}, "per_device_train_batch_size": 2,
                              "gradient_accumulation_steps": 8, "output_dir": "out/code_sft",
                              "max_seq_length": 4096}, []),
    "code_sft/config_full": ({"dataset_mixer": {"datasets/code_sft": 0.3}, "per_device_train_batch_size": 2,
                              "gradient_accumulation_steps": 8, "output_dir": "out/code_sft_full",
                              "num_train_epochs": 2, "learning_rate": "1e-6", "max_seq_length": 4096},
                             ["max_image_size"]),
    "nextqa/config_lora": ({"dataset_mixer": {"datasets/nextqa": 1}, "per_device_train_batch_size": 4,
                            "gradient_accumulation_steps": 4, "output_dir": "out/nextqa_moe_lora_490_new",
                            "max_image_size": 490, "max_seq_length": 4096}, []),
    "nextqa/config_full": ({"dataset_mixer": {"datasets/nextqa": 1}, "per_device_train_batch_size": 4,
                            "gradient_accumulation_steps": 4, "output_dir": "out/nextqa_moe_490",
                            "max_image_size": 490, "max_seq_length": 4096}, []),
    "nlvr2/config_lora": ({"dataset_mixer": {"datasets/nlvr2": 1}, "output_dir": "out/nlvr2_moe_lora_980"}, []),
    "nlvr2/config_full": ({"dataset_mixer": {"datasets/nlvr2": 1}, "output_dir": "out/nlvr2_moe_980",
                           "learning_rate": "5e-7"}, []),
    "refcoco/config_lora": ({"dataset_mixer": {"datasets/refcoco_sub30k": 1}}, []),
    "refcoco/config_full": ({"dataset_mixer": {"datasets/refcoco_sub30k": 1}}, []),
}

def original_recipe(name: str) -> str:
    """The text of an original recipe: recipes/config_{lora,full} verbatim, or an example's."""
    if name in ("config_lora", "config_full"):
        return ORIGINAL_LORA if name == "config_lora" else ORIGINAL_FULL
    changed, removed = EXAMPLES[name]
    recipe = yaml.safe_load(ORIGINAL_LORA if name.endswith("lora") else ORIGINAL_FULL)
    recipe.update(changed)
    for key in removed:
        del recipe[key]
    return yaml.safe_dump(recipe, sort_keys=False)


# ---------------------------------------------------------------------------------------------------- data


def _image(path, size: tuple[int, int], seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _image_item() -> dict:
    return {"type": "image", "text": None}  # as the original's docs/custom_dataset.md writes them


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def original_samples(tag: str) -> list[dict]:
    """Text-only, one image, two images, and a multi-turn conversation about an image; ``tag`` names the dataset
    in the texts."""
    return [
        {"messages": [{"role": "user", "content": [_text(f"hello world {tag}")]},
                      {"role": "assistant", "content": [_text("the quick brown fox")]}], "images": None,
         "video": None},
        {"messages": [{"role": "user", "content": [_image_item(), _text("describe the image")]},
                      {"role": "assistant", "content": [_text("a cat and a cup of coffee")]}],
         "images": ["image_folder/a.png"]},
        {"messages": [{"role": "user", "content": [_image_item(), _image_item(), _text("what is shown?")]},
                      {"role": "assistant", "content": [_text("an astronaut and the lazy dog")]}],
         "images": ["image_folder/a.png", "image_folder/b.jpg"], "video": None},
        {"messages": [{"role": "user", "content": [_image_item(), _text("describe the image")]},
                      {"role": "assistant", "content": [_text("a cat")]},
                      {"role": "user", "content": [_text(f"and the dog? {tag}")]},
                      {"role": "assistant", "content": [_text("the lazy dog")]}],
         "images": ["image_folder/b.jpg"]},
    ]


def original_dataset(root, tag: str = "", test: bool = False, repeat: int = 1) -> str:
    """A dataset directory as the original's docs/custom_dataset.md lays it out: train.jsonl (optional test.jsonl)
    and image_folder/."""
    os.makedirs(os.path.join(root, "image_folder"), exist_ok=True)
    _image(os.path.join(root, "image_folder", "a.png"), (60, 40), 1)
    _image(os.path.join(root, "image_folder", "b.jpg"), (50, 90), 2)
    samples = original_samples(tag) * repeat
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    if test:
        with open(os.path.join(root, "test.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in original_samples(f"test {tag}")[1:])
    return str(root)


def hub_cache(home, source: str, repo: str = "rhymes-ai/Aria", commit: str = "4844f0b" + "0" * 33) -> str:
    """An HF_HOME whose hub cache holds ``source`` as ``repo`` at ``commit`` (refs/main points to it), laid out as
    huggingface_hub caches a download (models--ORG--NAME/{refs,snapshots})."""
    folder = os.path.join(home, "hub", "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(source, os.path.join(folder, "snapshots", commit))
    return str(home)


def run_recipe(args: list[str], cwd, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in ``cwd`` (a recipe's relative dataset paths resolve there), hub offline."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def safetensors_dtypes(directory) -> set[str]:
    """The dtypes in the headers of a directory's safetensors files (read by hand: the format's 8-byte length and
    JSON header)."""
    dtypes = set()
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes
