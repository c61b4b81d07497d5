"""The training recipe: the original Aria YAML keys (users.md §1.5) plus a few of ours, validated up front.

Every problem raises ``RecipeError`` with one line naming the key or file; ``train.py`` turns it into exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import yaml

from aria_jax.moe import MOE_BACKENDS


class RecipeError(ValueError):
    """A bad recipe, override, dataset or model path: one line, exit status 2."""


@dataclasses.dataclass
class TrainConfig:
    # Model.
    model_name_or_path: str | None = None  # None: a tiny random model built from ``model_config`` (seeded)
    model_config: dict | None = None  # AriaConfig.from_dict input for the random model
    tokenizer_path: str | None = None  # defaults to model_name_or_path
    max_image_size: int = 980
    split_image: bool = False
    freeze_vit: bool = True
    freeze_projector: bool = False
    freeze_llm: bool = False
    freeze_llm_layers: list[int] = dataclasses.field(default_factory=list)
    use_peft: bool = False
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["fc1", "fc2", "q_proj", "k_proj", "v_proj", "o_proj", "linear", "linear_in",
                                 "linear_out", "up_proj", "gate_proj", "down_proj", "out_proj", "lm_head"]
    )
    moe_aux_loss_coeff: float = 1e-4
    moe_z_loss_coeff: float = 1e-5
    moe_backend: str = "auto"  # blocked on CPU, ragged_dot on GPU/TPU (aria_jax/moe.py)
    # Data.
    dataset_mixer: dict[str, float] | None = None  # {dataset dir: weight}; None: a synthetic dataset
    synthetic_samples: int = 64
    max_seq_length: int = 2048
    # Optimisation.
    learning_rate: float = 5e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.01
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    # The decoder layers as one scan over stacked parameters (bounded compile time: GPU/TPU), or one parameter tree
    # per layer (CPU: no per-layer slice copies, a 14-17% faster step). null: per layer on CPU. Checkpoints and
    # exports are stacked either way.
    scan_layers: bool | None = None
    bf16: bool = False  # bfloat16 compute on float32 master weights
    # Checkpoints, logging, output.
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 1
    output_dir: str = "output"
    resume_from_checkpoint: bool | str | None = None  # true: latest in output_dir; a path: that checkpoint
    export: bool = True
    seed: int = 42
    mesh: str | None = None  # e.g. "data=2,expert=4": params sharded by aria_jax.sharding, experts in parallel
    fsdp: bool = False  # with a mesh: also shard every weight, its gradient and Adam state over "data"


SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a value's type against the field's default (ints accepted for floats; null for optional fields)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = field.type
    if value is None:
        if "None" in kind:
            return None
        raise RecipeError(f"config key '{name}': null is not allowed")
    if kind.startswith("bool") and not kind.startswith("bool | str"):
        if not isinstance(value, bool):
            raise RecipeError(f"config key '{name}': expected true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"config key '{name}': expected an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"config key '{name}': expected a number, got {value!r}")
        return float(value)
    if kind.startswith("list"):
        if isinstance(value, str | int):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"config key '{name}': expected a list, got {value!r}")
        return value
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise RecipeError(f"config key '{name}': expected a mapping, got {value!r}")
        return value
    if kind.startswith("str") and not isinstance(value, str):
        raise RecipeError(f"config key '{name}': expected a string, got {value!r}")
    return value


def _validate(cfg: TrainConfig) -> None:
    def bad(key: str, why: str) -> None:
        raise RecipeError(f"config key '{key}': {why} (got {getattr(cfg, key)!r})")

    if cfg.max_image_size not in (490, 980):
        bad("max_image_size", "must be 490 or 980")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "save_steps",
                "logging_steps", "lora_r"):
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        bad("save_total_limit", "must be >= 1 or null")
    if cfg.learning_rate < 0:
        bad("learning_rate", "must be >= 0")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        bad("warmup_ratio", "must be in [0, 1]")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        bad("lora_dropout", "must be in [0, 1)")
    if not 0.0 < cfg.adam_beta2 < 1.0:
        bad("adam_beta2", "must be in (0, 1)")
    if cfg.lr_scheduler_type not in SCHEDULES:
        bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULES)}")
    if cfg.moe_backend not in MOE_BACKENDS:
        bad("moe_backend", f"must be one of {', '.join(MOE_BACKENDS)}")
    if cfg.max_steps < 1 and cfg.num_train_epochs <= 0:
        bad("num_train_epochs", "must be > 0 when max_steps is not set")
    if cfg.model_name_or_path is None and cfg.model_config is None:
        bad("model_config", "a tiny model config is needed when model_name_or_path is not given")
    if cfg.model_name_or_path is not None and not os.path.isdir(cfg.model_name_or_path):
        bad("model_name_or_path", "is not a directory")
    if cfg.dataset_mixer is not None:
        for path, weight in cfg.dataset_mixer.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                raise RecipeError(f"config key 'dataset_mixer': weight for '{path}' must be a positive number")
            if not os.path.isfile(os.path.join(path, "train.jsonl")):
                raise RecipeError(f"config key 'dataset_mixer': '{path}' has no train.jsonl")
    if cfg.dataset_mixer is None and cfg.model_name_or_path is not None:
        bad("dataset_mixer", "is required with a real model (the synthetic dataset is for the tiny random model)")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override '{item}': cannot parse the value ({exc.__class__.__name__})") from None
    return key.strip().lstrip("-").replace("-", "_"), value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML recipe + ``key=value`` overrides -> a validated TrainConfig (paths relative to the working directory)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: expected a mapping of config keys")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise RecipeError(f"unknown config key(s): {', '.join(unknown)}")
    defaults = TrainConfig()
    values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in raw.items()}
    if values.get("resume_from_checkpoint") in ("false", "False", "no", ""):
        values["resume_from_checkpoint"] = False  # the shipped YAML's `false` must not become a path (#105)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def save_resolved(cfg: TrainConfig, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "train_config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    return path


def describe(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=False)
