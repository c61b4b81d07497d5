"""The training recipe: the original Aria YAML keys (users.md §1.5) plus a few of ours, validated up front.

Every problem raises ``RecipeError`` with one line naming the key or file; ``train.py`` turns it into exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
from collections.abc import Sequence
from typing import Any

import yaml

from aria_jax.errors import InputError, one_line
from aria_jax.files import write_atomic
from aria_jax.kernels.experts import MOE_BACKENDS
from aria_jax.quant import FORMATS as QUANT_FORMATS
from aria_jax.training.recipe_keys import FSDP_ON, FSDP_WORDS, canonical, check_trainer_keys, classify


class RecipeError(InputError):
    """A bad recipe, override, dataset or model path: one line, exit status 2."""


@dataclasses.dataclass
class TrainConfig:
    """The recipe. What every key does, and every other key a recipe of the original may carry: recipe_keys.KEYS."""

    # Model.
    model_name_or_path: str | None = None  # None: a tiny random model built from ``model_config`` (seeded)
    model_config: dict | None = None  # AriaConfig.from_dict input for the random model
    tokenizer_path: str | None = None  # defaults to model_name_or_path
    model_revision: str | None = None  # hub revision of hub ids (None: main)
    torch_dtype: str | None = None  # None / float32, bfloat16 (frozen weights), auto (the checkpoint's)
    peft_model_path: str | None = None  # a PEFT adapter to continue training (use_peft)
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
    quantize_base: str | None = None  # int8 / int4: LoRA over a frozen weight-only quantized base (QLoRA)
    moe_aux_loss_coeff: float = 1e-4
    moe_z_loss_coeff: float = 1e-5
    moe_backend: str = "auto"  # blocked on CPU, ragged_dot on GPU/TPU (aria_jax/moe.py)
    # Data.
    dataset_mixer: dict[str, float] | None = None  # {dataset dir: weight}; None: a synthetic dataset
    dataset_train_split: str = "train"  # DIR/<split>.jsonl trained on
    dataset_test_split: str = "test"  # DIR/<split>.jsonl evaluated on, when present
    synthetic_samples: int = 64
    max_seq_length: int = 2048
    # A sample with an unreadable image (missing pixels, truncated, a decompression bomb): false: the run stops
    # before step 0 with the sample's file:line; true: the sample is left out and counted (metrics: skipped_samples).
    skip_bad_samples: bool = False
    # Optimisation.
    optim: str = "adamw_torch"  # AdamW under any of transformers' adamw_* names
    learning_rate: float = 5e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.01
    warmup_steps: float = 0  # > 0 overrides warmup_ratio; < 1: a fraction of the steps
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8  # per data-parallel device: x the mesh's data axis = the global batch
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    # The decoder layers as one scan over stacked parameters (bounded compile time: GPU/TPU), or one parameter tree
    # per layer (CPU: no per-layer slice copies). null: the platform's choice (aria_jax.runtime). Checkpoints and
    # exports are stacked either way.
    scan_layers: bool | None = None
    bf16: bool = False  # bfloat16 compute on float32 master weights
    # Checkpoints, evaluation, logging, output. *_steps: an integer, or a float < 1: a fraction of the steps.
    save_strategy: str = "steps"  # steps, epoch or no
    save_steps: float = 500
    save_total_limit: int | None = 2
    eval_strategy: str = "no"  # no, steps or epoch: the loss on each dataset's test.jsonl
    eval_steps: float | None = None  # None: logging_steps
    eval_delay: float = 0
    eval_on_start: bool = False
    logging_strategy: str = "steps"  # steps, epoch or no
    logging_steps: float = 1
    logging_first_step: bool = False
    logging_dir: str | None = None  # TensorBoard's directory; None: output_dir/tensorboard
    log_level: str = "passive"
    disable_tqdm: bool | None = None
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None
    env: dict | None = None  # TrlParser's environment variables, set when the run starts
    output_dir: str = "output"
    resume_from_checkpoint: bool | str | None = None  # true: latest in output_dir; a path: that checkpoint
    export: bool = True
    seed: int = 42
    data_seed: int | None = None  # the data order's seed; None: seed
    mesh: str | None = None  # e.g. "data=2,expert=4": params sharded by aria_jax.parallel.sharding, experts in parallel
    fsdp: bool = False  # with a mesh: also shard every weight, its gradient and Adam state over "data"


SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
STEP_KEYS = ("save_steps", "logging_steps", "eval_steps", "warmup_steps")
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
    if name == "fsdp" and not isinstance(value, bool):
        return _fsdp(value)
    if value is None:
        if "None" in kind:
            return None
        raise RecipeError(f"config key '{name}': null is not allowed")
    if name.endswith("_strategy") and value is False:  # YAML 1.1 reads an unquoted `no` as false
        return "no"
    if name in STEP_KEYS:  # an integer, or a float < 1 (a fraction of the steps), as transformers reads them
        number = _number(name, value)
        return int(number) if number.is_integer() else number
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


def _fsdp(value: Any) -> bool:
    """transformers' ``fsdp`` strings (``"full_shard auto_wrap"``, or a list of options; null: none) as our flag."""
    words = value.split() if isinstance(value, str) else [] if value is None else value
    if not isinstance(words, list) or not all(isinstance(w, str) and w in FSDP_WORDS for w in words):
        raise RecipeError(f"config key 'fsdp': expected true, false or transformers' options "
                          f"({', '.join(FSDP_WORDS)}), got {show(value)}")
    return any(w in FSDP_ON for w in words)


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
    _validate_trainer_keys(cfg)
    _validate_choices_and_paths(cfg)


def _validate_counts(cfg: TrainConfig) -> None:
    def bad(key: str, why: str) -> None:
        _bad(cfg, key, why)

    if cfg.max_image_size not in (490, 980):
        bad("max_image_size", "must be 490 or 980")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_seq_length", "lora_r", "synthetic_samples"):
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("save_steps", "logging_steps", "eval_steps"):
        value = getattr(cfg, key)
        if value is not None and (value <= 0 or (value > 1 and not isinstance(value, int)) or value > MAX_STEPS):
            bad(key, f"must be an integer in [1, {MAX_STEPS}] or a fraction in (0, 1) of the steps")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) > MAX_ROWS:
            bad(key, f"must be <= {MAX_ROWS}")
    if cfg.synthetic_samples > 2**24:
        bad("synthetic_samples", f"must be <= {2**24}")
    if cfg.max_steps > MAX_STEPS:
        bad("max_steps", f"must be <= {MAX_STEPS}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        bad("save_total_limit", "must be >= 1 or null")
    for key in ("seed", "data_seed"):
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) < 2**32:
            bad(key, "must be in [0, 2**32)")


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
    if cfg.quantize_base is not None and cfg.quantize_base not in QUANT_FORMATS:
        bad("quantize_base", f"must be one of {', '.join(QUANT_FORMATS)} or null")
    if cfg.quantize_base is not None and not cfg.use_peft:
        bad("quantize_base", "trains LoRA over a frozen quantized base: set use_peft: true (full fine-tuning cannot "
                             "update quantized weights)")
    for key in ("output_dir", "model_name_or_path", "tokenizer_path", "resume_from_checkpoint"):
        value = getattr(cfg, key)
        if isinstance(value, str) and (not value.strip() or "\0" in value):
            bad(key, "must be a non-empty path" if key != "model_name_or_path" else "must be a path or a hub id")
    if cfg.model_name_or_path is None and cfg.model_config is None:
        bad("model_config", "a tiny model config is needed when model_name_or_path is not given")
    if cfg.dataset_mixer is not None:
        _validate_mixer(cfg.dataset_mixer, cfg.dataset_train_split)
    if cfg.dataset_mixer is None and cfg.model_name_or_path is not None:
        bad("dataset_mixer", "is required with a real model (the synthetic dataset is for the tiny random model)")


def _validate_trainer_keys(cfg: TrainConfig) -> None:
    """The TrainingArguments / TRL keys of ours beyond the original Aria ones (recipe_keys.check_trainer_keys)."""
    problem = check_trainer_keys(cfg, MAX_STEPS)
    if problem:
        _bad(cfg, *problem)


def _validate_mixer(mixer: dict, split: str = "train") -> None:
    if not mixer:
        raise RecipeError("config key 'dataset_mixer': no dataset (give {dataset directory: weight, ...} or null)")
    for path, weight in mixer.items():
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise RecipeError(f"config key 'dataset_mixer': {show(path)} is not a dataset directory")
        # 0 skips the dataset's training samples (as the original's int(0 * n) rows)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise RecipeError(f"config key 'dataset_mixer': weight for {path!r} must be a finite positive number "
                              f"(got {show(weight)})")
        if weight > 1 and int(weight) > 1_000_000:
            raise RecipeError(f"config key 'dataset_mixer': weight for {path!r} repeats it more than a million times "
                              f"(got {show(weight)})")
        if not os.path.isfile(os.path.join(path, f"{split}.jsonl")):
            raise RecipeError(f"config key 'dataset_mixer': {path!r} has no {split}.jsonl")
    if not any(weight > 0 for weight in mixer.values()):
        raise RecipeError("config key 'dataset_mixer': every weight is 0: no dataset to train on")


def _value(key: str, raw: str, where: str) -> Any:
    """A command-line value: YAML (``1e-5``, ``true``, ``[a, b]``, ``{DIR: 1}``), but the text itself for string
    keys (``--run_name 2024``, ``--model_revision 1234567``)."""
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: cannot parse the value ({exc.__class__.__name__})") from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of more than 4300 digits
        raise RecipeError(f"{where}: cannot parse the value ({_why(exc)})") from None
    if isinstance(value, int | float) and _FIELDS.get(key, "").startswith("str"):  # bool too: --save_strategy no
        return raw
    return value


def _name(flag: str) -> str:
    return flag.strip().lstrip("-").replace("-", "_")


def field_kind(key: str) -> str:
    """The type of a TrainConfig field as written (``"list[str]"``, ``"bool"``, ...); ``""`` for other keys."""
    return _FIELDS.get(key, "")


def parse_flag(key: str, raw: str) -> Any:
    """The value of ``--key raw`` on the command line (``_value``)."""
    return _value(_name(key), raw, f"--{_name(key)} {show(raw)}")


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` (also ``--key=value``) -> (key, value)."""
    if "=" not in item:
        raise RecipeError(f"override {show(item)}: expected key=value")
    key, raw = item.split("=", 1)
    return _name(key), _value(_name(key), raw, f"override {show(item)}")


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


def load_recipe(path: str | None, overrides: Sequence[str | tuple[str, Any]] = ()
                ) -> tuple[TrainConfig, list[str]]:
    """YAML recipe + overrides (``key=value`` strings or parsed (key, value) pairs) -> a validated TrainConfig and
    one note per accepted key without effect here (recipe_keys.KEYS: every key a recipe may carry). Paths are
    relative to the working directory."""
    raw: dict[str, Any] = {} if path is None else read_recipe(path)
    for item in overrides:  # an override of an alias (--evaluation_strategy) replaces its field's value
        key, value = parse_override(item) if isinstance(item, str) else item
        if value is None and canonical(key) != key:  # an alias at null (transformers' default): not given
            continue
        for other in [k for k in raw if canonical(k) == canonical(key)]:
            del raw[other]
        raw[key] = value
    values, notes, errors, unknown = classify(raw, set(_FIELDS))
    if unknown:
        names = sorted(k if k.isidentifier() else show(k) for k in unknown)
        names = names[:10] + (["..."] if len(names) > 10 else [])
        raise RecipeError(f"unknown config key(s): {', '.join(names)} (python train.py --list-keys shows every key)")
    if errors:
        key, why = errors[0]
        raise RecipeError(f"config key '{key}': {why} (got {show(raw[key])})")
    values = {k: _coerce(k, v) for k, v in values.items()}
    if values.get("quantize_base") in ("none", "None", ""):  # the CLI's --quantize_base none
        values["quantize_base"] = None
    if values.get("resume_from_checkpoint") in ("false", "False", "no", ""):
        values["resume_from_checkpoint"] = False  # the shipped YAML's `false` must not become a path (#105)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg, notes


def load_config(path: str | None, overrides: Sequence[str | tuple[str, Any]] = ()) -> TrainConfig:
    """``load_recipe`` without its notes."""
    return load_recipe(path, overrides)[0]


def recipe_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe as a mapping, with the values of secret-looking ``env`` variables (API keys, tokens) hidden."""
    out = dataclasses.asdict(cfg)
    if out["env"]:
        out["env"] = {k: "***" if any(w in k.upper() for w in ("KEY", "TOKEN", "SECRET", "PASSWORD")) else v
                      for k, v in out["env"].items()}
    return out


def save_resolved(cfg: TrainConfig, output_dir: str) -> str:
    """``output_dir/train_config.yaml``, written whole or not at all (``output_dir`` must exist)."""
    path = os.path.join(output_dir, "train_config.yaml")
    write_atomic(path, yaml.safe_dump(recipe_dict(cfg), sort_keys=False))
    return path


def describe(cfg: TrainConfig) -> str:
    return json.dumps(recipe_dict(cfg), indent=1, sort_keys=False)
