"""Every key a recipe may carry, and what it does here: one table (``KEYS``).

The original rhymes-ai/Aria recipes are YAML files for TRL's ``TrlParser`` over three dataclasses: transformers'
``TrainingArguments`` (through TRL's ``SFTConfig``), TRL's ``ModelConfig`` (Aria's ``AriaModelConfig`` adds the
freeze flags, MoE loss coefficients and image keys) and ``SFTScriptArguments`` (Aria adds ``dataset_mixer``). The
table covers every field of those dataclasses as the original pinned them (transformers 4.46.3, TRL 0.9.6) and as
they are today (transformers 5.x, TRL 1.x), plus TrlParser's ``env``. Each key is one of:

- ``meaning``: a recipe key of ours (a ``TrainConfig`` field) that does what it did in the original;
- ``alias``: another name for one of those (``evaluation_strategy`` -> ``eval_strategy``, ...);
- ``no-op``: accepted with one logged line saying why it has no effect here;
- ``refused``: accepted, with one logged line, only at a value that asks for nothing (``fp16: false``); any other
  value is an error saying why it cannot be honoured.

A key in none of these is unknown and refused by name. ``python train.py --list-keys`` prints the table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MEANING, ALIAS, NOOP, REFUSED = "meaning", "alias", "no-op", "refused"
STRATEGIES = ("no", "steps", "epoch")
LOG_LEVELS = ("debug", "info", "passive", "warning", "error", "critical")
DTYPES = ("float32", "bfloat16", "auto")
REPORTERS = ("tensorboard", "wandb", "all", "none")
# transformers' other integrations: accepted with one warning line each (not supported here)
OTHER_REPORTERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow", "neptune",
                   "swanlab", "trackio")
FSDP_ON = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2")
FSDP_WORDS = (*FSDP_ON, "no_shard", "offload", "auto_wrap")


@dataclasses.dataclass(frozen=True)
class Key:
    kind: str
    note: str
    target: str | None = None  # alias: the TrainConfig field it sets
    inert: tuple = ()  # refused: the values that ask for nothing


def _keys(kind: str, names: str, note: str, **extra: Any) -> dict[str, Key]:
    return {name: Key(kind, note, **extra) for name in names.split()}


_OFF = (False, None)
_EMPTY = (None, "", (), [], {})

# Keys of ours (TrainConfig fields): what each does. Every TrainConfig field must be here (tests hold it).
MEANINGS: dict[str, str] = {
    "model_name_or_path": "the model: an HF or converted aria-jax directory, or a hub id (rhymes-ai/Aria) at "
                          "model_revision; null: the tiny random model of model_config",
    "model_config": "aria-jax: the tiny random model's config (with model_name_or_path: null)",
    "tokenizer_path": "tokenizer and chat template: a directory or hub id (default: the model's)",
    "model_revision": "the hub revision (branch, tag or commit) of hub ids in model_name_or_path and tokenizer_path",
    "torch_dtype": "dtype of the model weights: bfloat16 keeps the frozen weights in bfloat16 (trained weights keep "
                   "a float32 master copy), float32 all in float32, auto the checkpoint's dtype (the export is "
                   "float32 either way)",
    "peft_model_path": "a PEFT adapter directory to continue training (with use_peft: true)",
    "max_image_size": "490 or 980: the image resolution (128 or 256 tokens per image or crop)",
    "split_image": "split large images into crops as the original trainer does (split_mode original)",
    "freeze_vit": "freeze the vision tower", "freeze_projector": "freeze the projector",
    "freeze_llm": "freeze the language model",
    "freeze_llm_layers": "decoder layer indices whose weights are not updated",
    "use_peft": "train LoRA pairs instead of the weights", "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale "
    "alpha / r)", "lora_dropout": "dropout on the LoRA branch' input",
    "lora_target_modules": "the original module names that get LoRA pairs",
    "quantize_base": "aria-jax: int8 or int4: train LoRA (use_peft) over the base weights quantized and frozen "
                     "(QLoRA, aria_jax.quant); checkpoints hold the adapter only, the export is merged in float32",
    "moe_aux_loss_coeff": "load-balancing loss coefficient", "moe_z_loss_coeff": "router z-loss coefficient",
    "moe_backend": "aria-jax: the routed-expert kernel (auto: the platform's)",
    "dataset_mixer": "{dataset directory: weight}: weight <= 1 takes that fraction, > 1 repeats it int(weight) "
                     "times, 0 skips its training samples (its test.jsonl still joins evaluation); null: synthetic "
                     "data",
    "dataset_train_split": "the JSONL file each dataset trains on: DIR/<split>.jsonl (default train)",
    "dataset_test_split": "the JSONL file evaluated on when present: DIR/<split>.jsonl (default test)",
    "synthetic_samples": "aria-jax: samples of the synthetic dataset",
    "max_seq_length": "tokens per sample; a sample that truncation would cut through an image is dropped",
    "skip_bad_samples": "aria-jax: leave out (and count) samples whose image cannot be read, instead of stopping",
    "learning_rate": "peak learning rate", "weight_decay": "AdamW weight decay (not on biases and norms)",
    "adam_beta1": "AdamW beta1", "adam_beta2": "AdamW beta2", "adam_epsilon": "AdamW epsilon",
    "max_grad_norm": "gradient clipping by global norm (0: none)",
    "optim": "the optimizer: any adamw_* name (AdamW); others are refused",
    "warmup_ratio": "linear warmup over this fraction of the steps",
    "warmup_steps": "linear warmup over this many steps (a float < 1: a fraction); overrides warmup_ratio when > 0",
    "lr_scheduler_type": "cosine, linear, constant or constant_with_warmup",
    "num_train_epochs": "epochs (fractions allowed) when max_steps is not set",
    "max_steps": "optimizer steps (> 0 overrides num_train_epochs)",
    "per_device_train_batch_size": "rows per data-parallel device: the global batch is this x the mesh's data axis",
    "per_device_eval_batch_size": "evaluation rows per data-parallel device",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "gradient_checkpointing": "rematerialise each decoder layer in the backward pass",
    "scan_layers": "aria-jax: decoder layers as one scan (null: the platform's choice)",
    "bf16": "compute in bfloat16 (on float32 master weights)",
    "save_strategy": "steps: a checkpoint every save_steps; epoch: at each epoch's end; no: none (the last step is "
                     "saved with steps and epoch)",
    "save_steps": "steps between checkpoints (a float < 1: a fraction of the steps)",
    "save_total_limit": "checkpoints kept (null: all)",
    "eval_strategy": "no, steps (every eval_steps) or epoch: the loss on each dataset's test.jsonl, logged as "
                     "eval_loss (no test.jsonl anywhere: no evaluation, as the original)",
    "eval_steps": "steps between evaluations (default logging_steps; a float < 1: a fraction of the steps)",
    "eval_delay": "steps (or epochs, with eval_strategy: epoch) before the first evaluation",
    "eval_on_start": "evaluate once before the first step",
    "logging_strategy": "steps (every logging_steps), epoch (at each epoch's end) or no",
    "logging_steps": "steps between metrics lines (a float < 1: a fraction of the steps)",
    "logging_first_step": "log the first step too",
    "logging_dir": "the TensorBoard directory (default output_dir/tensorboard)",
    "log_level": "debug, info, passive (= info), warning, error or critical: the lines train.py prints",
    "disable_tqdm": "no progress bar (null: none at log_level error or critical)",
    "report_to": "tensorboard, wandb (when installed; else one warning), all, none, or a list; metrics.jsonl "
                 "is always written",
    "run_name": "the W&B run's name",
    "env": "TrlParser's {NAME: value} environment variables, set when the run starts (JAX_* and XLA_FLAGS act "
           "only when set before train.py starts)",
    "output_dir": "checkpoints, metrics.jsonl, tensorboard/, train_config.yaml and export/",
    "resume_from_checkpoint": "true: the latest checkpoint in output_dir; a path: that checkpoint",
    "export": "aria-jax: write output_dir/export (HF safetensors, and the adapter with LoRA) at the end",
    "seed": "the seed of initialisation, dropout and (without data_seed) the data order",
    "data_seed": "the seed of the data order (null: seed)",
    "mesh": "aria-jax: the device mesh, e.g. data=2,expert=4",
    "fsdp": "shard every weight, gradient and Adam state over the mesh's data axis; HF's strings full_shard, "
            "shard_grad_op, hybrid_shard mean true (offload and auto_wrap have no counterpart)",
}

KEYS: dict[str, Key] = {name: Key(MEANING, note) for name, note in MEANINGS.items()}

KEYS.update({
    "evaluation_strategy": Key(ALIAS, "transformers 4.x's name of eval_strategy", "eval_strategy"),
    "per_gpu_train_batch_size": Key(ALIAS, "deprecated name of per_device_train_batch_size",
                                    "per_device_train_batch_size"),
    "per_gpu_eval_batch_size": Key(ALIAS, "deprecated name of per_device_eval_batch_size",
                                   "per_device_eval_batch_size"),
    "max_length": Key(ALIAS, "TRL 1.x's name of max_seq_length", "max_seq_length"),
    "dtype": Key(ALIAS, "TRL 1.x's name of torch_dtype", "torch_dtype"),
    "activation_checkpointing": Key(ALIAS, "transformers 5.x's name of gradient_checkpointing",
                                    "gradient_checkpointing"),
})

# Accepted, with one line saying why they change nothing here.
KEYS.update({
    **_keys(NOOP, "dataloader_num_workers dataloader_prefetch_factor dataloader_pin_memory "
                  "dataloader_persistent_workers dataloader_multiprocessing_context dataloader_in_order",
            "samples are encoded in the training process, ahead of the accelerator; no worker processes"),
    **_keys(NOOP, "dataloader_drop_last", "batches are always full: the order wraps into the next epoch"),
    **_keys(NOOP, "attn_implementation", "attention is one JAX implementation; XLA picks its kernels"),
    **_keys(NOOP, "trust_remote_code", "no code is loaded from the hub: the model is aria-jax's own"),
    **_keys(NOOP, "gradient_checkpointing_kwargs activation_checkpointing_kwargs gradient_checkpointing_use_reentrant",
            "JAX rematerialisation has no reentrant variant"),
    **_keys(NOOP, "dataset_name dataset_config dataset_streaming",
            "the original Aria trainer ignores it too: data comes from dataset_mixer"),
    **_keys(NOOP, "dataset_text_field dataset_kwargs dataset_num_proc dataset_batch_size num_of_sequences "
                  "chars_per_token model_init_kwargs remove_unused_columns label_names length_column_name "
                  "shuffle_dataset packing_strategy pad_to_multiple_of ignore_bias_buffers",
            "TRL's dataset preparation is replaced by aria-jax's JSONL loader (shuffled every epoch, padded to "
            "multiples of 32)"),
    **_keys(NOOP, "completion_only_loss assistant_only_loss",
            "the loss always covers the assistant turns only, as the original's"),
    **_keys(NOOP, "group_by_length train_sampling_strategy",
            "samples are drawn in a seeded shuffled order (data_seed)"),
    **_keys(NOOP, "do_train do_eval do_predict",
            "read by HF example scripts, not by the trainer; eval_strategy decides evaluation"),
    **_keys(NOOP, "overwrite_output_dir", "output_dir is reused; resume_from_checkpoint decides whether to continue"),
    **_keys(NOOP, "prediction_loss_only include_inputs_for_metrics include_for_metrics batch_eval_metrics "
                  "eval_do_concat_batches eval_use_gather_object eval_accumulation_steps past_index",
            "evaluation computes the loss only"),
    **_keys(NOOP, "bf16_full_eval", "evaluation computes as training does (bf16)"),
    **_keys(NOOP, "metric_for_best_model greater_is_better", "used only with load_best_model_at_end"),
    **_keys(NOOP, "log_level_replica log_on_each_node", "only the first process prints"),
    **_keys(NOOP, "save_on_each_node", "Orbax saves collectively; the first process writes the export"),
    **_keys(NOOP, "save_only_model", "checkpoints keep the optimizer state and data position (exact resume)"),
    **_keys(NOOP, "save_safetensors", "exports are always safetensors; checkpoints are Orbax"),
    **_keys(NOOP, "restore_callback_states_from_checkpoint ignore_data_skip",
            "a resume restores the data position without replaying batches"),
    **_keys(NOOP, "logging_nan_inf_filter", "losses are logged as they are"),
    **_keys(NOOP, "include_tokens_per_second include_num_input_tokens_seen skip_memory_metrics",
            "tokens and tokens_per_s are always in metrics.jsonl"),
    **_keys(NOOP, "average_tokens_across_devices", "the loss is the mean over the global batch's label tokens"),
    **_keys(NOOP, "auto_find_batch_size", "the batch is per_device_train_batch_size; `aria-jax plan` shows what fits"),
    **_keys(NOOP, "full_determinism", "steps are deterministic given the seeds on CPU; GPU reductions may vary"),
    **_keys(NOOP, "use_cpu no_cuda use_mps_device",
            "JAX picks the platform: set JAX_PLATFORMS=cpu before train.py starts"),
    **_keys(NOOP, "local_rank ddp_backend ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers "
                  "ddp_timeout ddp_static_graph tpu_num_cores tpu_metrics_debug mp_parameters ray_scope "
                  "dispatch_batches split_batches accelerator_config parallelism_config",
            "data parallelism is the mesh's data axis; processes join from JAX_COORDINATOR_ADDRESS / "
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID"),
    **_keys(NOOP, "deepspeed fsdp_config fsdp_min_num_params fsdp_transformer_layer_cls_to_wrap",
            "no DeepSpeed or torch FSDP: shard with mesh and fsdp: true"),
    **_keys(NOOP, "torch_compile torch_compile_backend torch_compile_mode torchdynamo jit_mode_eval use_ipex "
                  "use_liger_kernel liger_kernel_config tf32 fp16_opt_level half_precision_backend fp16_backend "
                  "torch_empty_cache_steps use_legacy_prediction_loop use_cache enable_jit_checkpoint debug",
            "PyTorch settings: every step here is compiled by XLA (jax.jit)"),
    **_keys(NOOP, "hub_model_id hub_strategy hub_token hub_private_repo hub_always_push hub_revision "
                  "push_to_hub_model_id push_to_hub_organization push_to_hub_token",
            "used only with push_to_hub, which is not supported"),
    **_keys(NOOP, "project trackio_space_id trackio_bucket_id trackio_static_space_id",
            "Trackio is not supported (report_to: tensorboard or wandb)"),
    **_keys(NOOP, "bnb_4bit_quant_type use_bnb_nested_quant bnb_4bit_quant_storage", "used only with load_in_4bit"),
})

# Refused unless at a value that asks for nothing.
KEYS.update({
    "config": Key(REFUSED, "a recipe cannot name another recipe: give --config on the command line"),
    "fp16": Key(REFUSED, "float16 is not supported: bf16: true computes in bfloat16", inert=_OFF),
    "fp16_full_eval": Key(REFUSED, "float16 is not supported", inert=_OFF),
    "push_to_hub": Key(REFUSED, "nothing is uploaded: upload output_dir/export/model yourself (hf upload)",
                       inert=_OFF),
    "load_best_model_at_end": Key(REFUSED, "the export holds the last step's weights (the checkpoints in "
                                           "output_dir/checkpoints remain)", inert=_OFF),
    "label_smoothing_factor": Key(REFUSED, "label smoothing is not implemented", inert=(0, None)),
    "neftune_noise_alpha": Key(REFUSED, "NEFTune embedding noise is not implemented", inert=(None,)),
    "lr_scheduler_kwargs": Key(REFUSED, "the schedules take no extra arguments here", inert=_EMPTY),
    "optim_args": Key(REFUSED, "AdamW takes its arguments from adam_beta1/2 and adam_epsilon", inert=_EMPTY),
    "optim_target_modules": Key(REFUSED, "GaLore-style optimizers are not implemented", inert=_EMPTY),
    "adafactor": Key(REFUSED, "only AdamW is implemented", inert=_OFF),
    "packing": Key(REFUSED, "samples are never packed", inert=_OFF),
    "eval_packing": Key(REFUSED, "samples are never packed", inert=_OFF),
    "padding_free": Key(REFUSED, "batches are padded", inert=_OFF),
    "activation_offloading": Key(REFUSED, "activations are rematerialised (gradient_checkpointing), not offloaded",
                                 inert=_OFF),
    "truncation_mode": Key(REFUSED, "samples are truncated at the end (keep_start)", inert=("keep_start", None)),
    "loss_type": Key(REFUSED, "the loss is the token-mean cross-entropy (nll)", inert=("nll", None)),
    "chat_template_path": Key(REFUSED, "the tokenizer's chat template is used", inert=(None,)),
    "eos_token": Key(REFUSED, "the tokenizer's own tokens are used", inert=(None,)),
    "pad_token": Key(REFUSED, "the tokenizer's own tokens are used", inert=(None,)),
    "router_aux_loss_coef": Key(REFUSED, "set moe_aux_loss_coeff (Aria's key) instead", inert=(None,)),
    "lora_modules_to_save": Key(REFUSED, "LoRA trains only the pairs of lora_target_modules", inert=_EMPTY),
    "lora_target_parameters": Key(REFUSED, "LoRA targets are lora_target_modules", inert=_EMPTY),
    "lora_task_type": Key(REFUSED, "Aria is a causal LM", inert=("CAUSAL_LM", None)),
    "use_rslora": Key(REFUSED, "rank-stabilised LoRA is not implemented", inert=_OFF),
    "use_dora": Key(REFUSED, "DoRA is not implemented", inert=_OFF),
    "load_in_8bit": Key(REFUSED, "quantized (bitsandbytes) training is not supported: quantize_base: int8 trains "
                                 "LoRA over aria-jax's own int8 base", inert=_OFF),
    "load_in_4bit": Key(REFUSED, "quantized (bitsandbytes) training is not supported: quantize_base: int4 trains "
                                 "LoRA over aria-jax's own int4 base", inert=_OFF),
})


def canonical(name: str) -> str:
    """The TrainConfig field an alias sets (``evaluation_strategy`` -> ``eval_strategy``); other names as they are."""
    key = KEYS.get(name)
    return key.target if key is not None and key.kind == ALIAS else name


def _same(value: Any, inert: tuple) -> bool:
    return any(type(value) is not bool and value == v if type(v) is not bool else value is v for v in inert)


def classify(raw: dict[str, Any], fields: set[str]
             ) -> tuple[dict[str, Any], list[str], list[tuple[str, str]], list[str]]:
    """Recipe keys -> (TrainConfig values, one note per no-op or inert refused key, (key, why) errors, unknown keys).

    ``fields``: the TrainConfig fields. An alias sets its field (an error when the field is also given another
    value); a refused key at any value but an inert one is an error naming the key and the reason.
    """
    values: dict[str, Any] = {}
    notes: list[str] = []
    errors: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, value in raw.items():
        key = KEYS.get(name)
        if name in fields:
            values[name] = value
        elif key is None or key.kind == MEANING:
            unknown.append(name)
        elif key.kind == ALIAS:
            if value is None:  # transformers' default for these: not given
                continue
            if key.target in raw and raw[key.target] != value:
                errors.append((name, f"is another name of '{key.target}', which is given another value"))
            elif key.target not in raw:
                values[key.target] = value
        elif key.kind == NOOP:
            notes.append(f"{name}: no effect here ({key.note})")
        elif key.inert and _same(value, key.inert):
            notes.append(f"{name}: {value!r}: nothing to do ({key.note})")
        else:
            errors.append((name, f"not supported: {key.note}"))
    return values, notes, errors, unknown


def table() -> str:
    """Every key, its kind and what it does (``train.py --list-keys``)."""
    width = max(map(len, KEYS))
    lines = []
    for kind in (MEANING, ALIAS, NOOP, REFUSED):
        for name in sorted(n for n, k in KEYS.items() if k.kind == kind):
            key = KEYS[name]
            what = f"= {key.target}: {key.note}" if kind == ALIAS else key.note
            lines.append(f"{name:<{width}}  {kind:<8}  {what}")
    return "\n".join(lines)


def check_trainer_keys(cfg: Any, max_steps: int) -> tuple[str, str] | None:
    """(key, why) of the first bad value among the trainer keys of ours beyond the original Aria ones (types are
    already checked), or None."""
    for key in ("save_strategy", "eval_strategy", "logging_strategy"):
        if getattr(cfg, key) not in STRATEGIES:
            return key, f"must be one of {', '.join(STRATEGIES)}"
    if cfg.log_level not in LOG_LEVELS:
        return "log_level", f"must be one of {', '.join(LOG_LEVELS)}"
    if cfg.torch_dtype == "float16":
        return "torch_dtype", "float16 is not supported (bfloat16 or float32)"
    if cfg.torch_dtype is not None and cfg.torch_dtype not in DTYPES:
        return "torch_dtype", f"must be one of {', '.join(DTYPES)} or null"
    if not cfg.optim.startswith("adamw"):
        return "optim", "only AdamW is implemented (adamw_torch, adamw_torch_fused, adamw_hf, ...: all AdamW here)"
    for name in cfg.report_to:
        if name not in REPORTERS + OTHER_REPORTERS:
            return "report_to", f"{name!r} is not one of {', '.join(REPORTERS + OTHER_REPORTERS)}"
    for key in ("warmup_steps", "eval_delay"):
        if getattr(cfg, key) < 0:
            return key, "must be >= 0"
    if cfg.warmup_steps > max_steps or (cfg.warmup_steps > 1 and not isinstance(cfg.warmup_steps, int)):
        return "warmup_steps", f"must be an integer in [0, {max_steps}] or a fraction in (0, 1) of the steps"
    for key in ("dataset_train_split", "dataset_test_split"):
        split = getattr(cfg, key)
        if not split.strip() or split in (".", "..") or any(c in split for c in "/\\\0"):
            return key, "must be a file name without .jsonl (DIR/<split>.jsonl), like train or test"
    for key in ("model_revision", "peft_model_path", "logging_dir", "run_name"):
        value = getattr(cfg, key)
        if value is not None and (not value.strip() or "\0" in value):
            return key, "must be a non-empty string or null"
    for name, value in (cfg.env or {}).items():
        if not isinstance(name, str) or not name or any(c in name for c in "=\0") or \
                not isinstance(value, str | int | float | bool) or "\0" in str(value):
            return "env", f"{name!r}: expected NAME: value with a plain name and a string, number or boolean"
    return None
