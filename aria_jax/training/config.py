"""The training recipe: the original Aria YAML keys (users.md §1.5) plus a few of ours, validated up front.

Every problem raises ``RecipeError`` with one line naming the key or file; ``train.py`` turns it into exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
from typing import Any

import yaml

from aria_jax.errors import InputError, one_line
from aria_jax.files import write_atomic
from aria_jax.kernels.experts import MOE_BACKENDS


class RecipeError(InputError):
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
    # A sample with an unreadable image (missing pixels, truncated, a decompression bomb): false: the run stops
    # before step 0 with the sample's file:line; true: the sample is left out and counted (metrics: skipped_samples).
    skip_bad_samples: bool = False
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
    # per layer (CPU: no per-layer slice copies). null: the platform's choice (aria_jax.runtime). Checkpoints and
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
    mesh: str | None = None  # e.g. "data=2,expert=4": params sharded by aria_jax.parallel.sharding, experts in parallel
    fsdp: bool = False  # with a mesh: also shard every weight, its gradient and Adam state over "data"


SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
MAX_INT = 2**63 - 1
MAX_NODES = 10_000  # entries of a nested value (model_config, dataset_mixer), each alias counted again
MAX_DEPTH = 32
MAX_STEPS = 2**31 - 1  # the step counter is an int32 in the jitted update
MAX_ROWS = 2**20  # per_device_train_batch_size, gradient_accumulation_steps: more is a typo, not a batch
_FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


class _Short(reprlib.Repr):
    """``repr`` for messages: short, bounded in depth and length (self-referencing YAML aliases included), and safe
    for integers too long for ``str``."""

    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of {math.floor(x.bit_length() * math.log10(2)) + 1} digits or so>"
        return super().repr_int(x, level)


def show(value: Any) -> str:
    """A short, always printable ``repr`` of a recipe value for error messages."""
    return _Short().repr(value)


def _number(name: str, value: Any) -> float:
    """A float key's value: a finite number (ints accepted; YAML 1.1 reads 5e-5, nan and inf as strings)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecipeError(f"config key '{name}': expected a number, got {show(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise RecipeError(f"config key '{name}': must be a finite number (got {show(number)})")
    return number


def _integer(name: str, value: Any, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"config key '{name}': expected {what}, got {show(value)}")
    if abs(value) > MAX_INT:
        raise RecipeError(f"config key '{name}': {show(value)} is too large")
    return value


def _check_plain(name: str, value: Any) -> None:
    """A nested value (model_config, dataset_mixer) is plain data: mappings with string or integer keys, lists,
    strings, numbers, booleans and null; at most MAX_DEPTH deep and MAX_NODES entries (YAML aliases counted each
    time, so a self-referencing or exponentially aliased value is refused, not expanded)."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise RecipeError(f"config key '{name}': too large or too deeply nested (or it refers to itself)")
        if isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, bool) or not isinstance(key, str | int):
                    raise RecipeError(f"config key '{name}': keys must be strings or integers, got {show(key)}")
                if isinstance(key, int):
                    _integer(name, key)
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1) for sub in item)
        elif isinstance(item, int) and not isinstance(item, bool):
            _integer(name, item)
        elif not isinstance(item, str | float | bool) and item is not None:
            raise RecipeError(f"config key '{name}': {show(item)} is not a plain value (string, number, boolean, "
                              "null, list or mapping)")


def _coerce(name: str, value: Any) -> Any:
    """Check a value's type against the field's (ints accepted for floats; null for optional fields)."""
    kind = _FIELDS[name]
    if value is None:
        if "None" in kind:
            return None
        raise RecipeError(f"config key '{name}': null is not allowed")
    if kind.startswith("bool | str"):  # resume_from_checkpoint
        if not isinstance(value, bool | str):
            raise RecipeError(f"config key '{name}': expected true, false or a checkpoint path, got {show(value)}")
        return value
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise RecipeError(f"config key '{name}': expected true or false, got {show(value)}")
        return value
    if kind.startswith("int"):
        return _integer(name, value)
    if kind.startswith("float"):
        return _number(name, value)
    if kind.startswith("list"):
        return _list(name, value, int if kind == "list[int]" else str)
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise RecipeError(f"config key '{name}': expected a mapping, got {show(value)}")
        _check_plain(name, value)
        return value
    if kind.startswith("str") and not isinstance(value, str):
        raise RecipeError(f"config key '{name}': expected a string, got {show(value)}")
    return value


def _list(name: str, value: Any, item: type) -> list:
    if isinstance(value, str | int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"config key '{name}': expected a list, got {show(value)}")
    what = "integers" if item is int else "strings"
    for v in value:
        if isinstance(v, bool) or not isinstance(v, item):
            raise RecipeError(f"config key '{name}': expected a list of {what}, got {show(v)} in it")
        if item is int:
            _integer(name, v)
    return value


def _bad(cfg: TrainConfig, key: str, why: str) -> None:
    raise RecipeError(f"config key '{key}': {why} (got {show(getattr(cfg, key))})")


def _validate(cfg: TrainConfig) -> None:
    _validate_counts(cfg)
    _validate_numbers(cfg)
    _validate_choices_and_paths(cfg)


def _validate_counts(cfg: TrainConfig) -> None:
    def bad(key: str, why: str) -> None:
        _bad(cfg, key, why)

    if cfg.max_image_size not in (490, 980):
        bad("max_image_size", "must be 490 or 980")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "save_steps",
                "logging_steps", "lora_r", "synthetic_samples"):
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) > MAX_ROWS:
            bad(key, f"must be <= {MAX_ROWS}")
    if cfg.synthetic_samples > 2**24:
        bad("synthetic_samples", f"must be <= {2**24}")
    if cfg.max_steps > MAX_STEPS:
        bad("max_steps", f"must be <= {MAX_STEPS}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        bad("save_total_limit", "must be >= 1 or null")
    if not 0 <= cfg.seed < 2**32:
        bad("seed", "must be in [0, 2**32)")


def _validate_numbers(cfg: TrainConfig) -> None:
    """Ranges of the float keys (each already finite: ``_number``)."""
    def bad(key: str, why: str) -> None:
        _bad(cfg, key, why)

    for key in ("learning_rate", "weight_decay", "moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(cfg, key) < 0:
            bad(key, "must be >= 0")
    if cfg.max_grad_norm < 0:
        bad("max_grad_norm", "must be >= 0 (0: no clipping)")
    for key in ("lora_alpha", "adam_epsilon"):
        if getattr(cfg, key) <= 0:
            bad(key, "must be > 0")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        bad("warmup_ratio", "must be in [0, 1]")
    for key in ("lora_dropout", "adam_beta1"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            bad(key, "must be in [0, 1)")
    if not 0.0 < cfg.adam_beta2 < 1.0:
        bad("adam_beta2", "must be in (0, 1)")
    if cfg.max_steps < 1 and cfg.num_train_epochs <= 0:
        bad("num_train_epochs", "must be > 0 when max_steps is not set")


def _validate_choices_and_paths(cfg: TrainConfig) -> None:
    def bad(key: str, why: str) -> None:
        _bad(cfg, key, why)

    if cfg.lr_scheduler_type not in SCHEDULES:
        bad("lr_scheduler_type", f"must be one of {', '.join(SCHEDULES)}")
    if cfg.moe_backend not in MOE_BACKENDS:
        bad("moe_backend", f"must be one of {', '.join(MOE_BACKENDS)}")
    for key in ("output_dir", "model_name_or_path", "tokenizer_path", "resume_from_checkpoint"):
        value = getattr(cfg, key)
        if isinstance(value, str) and (not value.strip() or "\0" in value):
            bad(key, "must be a non-empty path" if key != "model_name_or_path" else "must be a path or a hub id")
    if cfg.model_name_or_path is None and cfg.model_config is None:
        bad("model_config", "a tiny model config is needed when model_name_or_path is not given")
    if cfg.dataset_mixer is not None:
        _validate_mixer(cfg.dataset_mixer)
    if cfg.dataset_mixer is None and cfg.model_name_or_path is not None:
        bad("dataset_mixer", "is required with a real model (the synthetic dataset is for the tiny random model)")


def _validate_mixer(mixer: dict) -> None:
    if not mixer:
        raise RecipeError("config key 'dataset_mixer': no dataset (give {dataset directory: weight, ...} or null)")
    for path, weight in mixer.items():
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise RecipeError(f"config key 'dataset_mixer': {show(path)} is not a dataset directory")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise RecipeError(f"config key 'dataset_mixer': weight for {path!r} must be a finite positive number "
                              f"(got {show(weight)})")
        if weight > 1 and int(weight) > 1_000_000:
            raise RecipeError(f"config key 'dataset_mixer': weight for {path!r} repeats it more than a million times "
                              f"(got {show(weight)})")
        if not os.path.isfile(os.path.join(path, "train.jsonl")):
            raise RecipeError(f"config key 'dataset_mixer': {path!r} has no train.jsonl")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError(f"override {show(item)}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {show(item)}: cannot parse the value ({exc.__class__.__name__})") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of more than 4300 digits
        raise RecipeError(f"override {show(item)}: cannot parse the value ({_why(exc)})") from None
    return key.strip().lstrip("-").replace("-", "_"), value


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "an integer of more than 4300 digits" if "4300 digits" in str(exc) else one_line(exc)


def read_recipe(path: str) -> dict[str, Any]:
    """A YAML recipe file as a mapping of key names; every failure is one line naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
    try:
        raw = yaml.safe_load(text)  # bytes: YAML's reader decodes (UTF-8/16) and refuses bad bytes with a YAMLError
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({one_line(exc)})") from None
    except (RecursionError, ValueError) as exc:
        raise RecipeError(f"{path}: not valid YAML ({_why(exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{path}: config keys must be names, got {show(bad[0])}")
    return raw


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML recipe + ``key=value`` overrides -> a validated TrainConfig (paths relative to the working directory)."""
    raw: dict[str, Any] = {} if path is None else read_recipe(path)
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        names = [k if k.isidentifier() else show(k) for k in unknown[:10]] + (["..."] if len(unknown) > 10 else [])
        raise RecipeError(f"unknown config key(s): {', '.join(names)}")
    values = {k: _coerce(k, v) for k, v in raw.items()}
    if values.get("resume_from_checkpoint") in ("false", "False", "no", ""):
        values["resume_from_checkpoint"] = False  # the shipped YAML's `false` must not become a path (#105)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def save_resolved(cfg: TrainConfig, output_dir: str) -> str:
    """``output_dir/train_config.yaml``, written whole or not at all (``output_dir`` must exist)."""
    path = os.path.join(output_dir, "train_config.yaml")
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path


def describe(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=False)
