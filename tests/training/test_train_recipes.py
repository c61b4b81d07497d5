"""The original rhymes-ai/Aria recipes run unchanged (issue 20: items 1-4 and 7, the training side).

The recipe files below are the original repository's (recipes/config_{lora,full}.yaml verbatim; the examples'
examples/{refcoco,nlvr2,nextqa,code_sft}/config_{lora,full}.yaml as their differences from those), run with the
original command-line forms on a tiny model served from a Hugging Face cache built here (HF_HUB_OFFLINE: nothing is
downloaded) and on datasets in the original JSONL format (text-only, one image, several images, several turns,
``"text": null`` image items, ``"video": null``). Every other key of transformers' TrainingArguments and TRL's
SFTConfig / ModelConfig / ScriptArguments is in the key table, honoured, accepted without effect (one line) or
refused with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml
from original_recipes import (
    EXAMPLES,
    ORIGINAL_FULL,
    ORIGINAL_LORA,
    hub_cache,
    original_dataset,
    original_recipe,
    run_recipe,
    safetensors_dtypes,
)
from train_helpers import REPO, read_metrics, stderr_lines, train_main

from aria_jax.training import dataset as J
from aria_jax.training.config import TrainConfig, load_recipe
from aria_jax.training.recipe_keys import ALIAS, KEYS, MEANING, MEANINGS, NOOP, REFUSED

# Every field of the dataclasses a recipe of the original could carry, as pinned there (transformers 4.46.3, TRL
# 0.9.6 with its SFTScriptArguments and TrlParser's env) and as they are now (TRL 1.16; transformers' fields are
# read from the installed version below). Read from the wheels' sources.
TRAINING_ARGUMENTS_4_46 = """
accelerator_config adafactor adam_beta1 adam_beta2 adam_epsilon auto_find_batch_size average_tokens_across_devices
batch_eval_metrics bf16 bf16_full_eval data_seed dataloader_drop_last dataloader_num_workers
dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor ddp_backend ddp_broadcast_buffers
ddp_bucket_cap_mb ddp_find_unused_parameters ddp_timeout debug deepspeed disable_tqdm dispatch_batches do_eval
do_predict do_train eval_accumulation_steps eval_delay eval_do_concat_batches eval_on_start eval_steps eval_strategy
eval_use_gather_object evaluation_strategy fp16 fp16_backend fp16_full_eval fp16_opt_level fsdp fsdp_config
fsdp_min_num_params fsdp_transformer_layer_cls_to_wrap full_determinism gradient_accumulation_steps
gradient_checkpointing gradient_checkpointing_kwargs greater_is_better group_by_length half_precision_backend
hub_always_push hub_model_id hub_private_repo hub_strategy hub_token ignore_data_skip include_for_metrics
include_inputs_for_metrics include_num_input_tokens_seen include_tokens_per_second jit_mode_eval label_names
label_smoothing_factor learning_rate length_column_name load_best_model_at_end local_rank log_level
log_level_replica log_on_each_node logging_dir logging_first_step logging_nan_inf_filter logging_steps
logging_strategy lr_scheduler_kwargs lr_scheduler_type max_grad_norm max_steps metric_for_best_model mp_parameters
neftune_noise_alpha no_cuda num_train_epochs optim optim_args optim_target_modules output_dir overwrite_output_dir
past_index per_device_eval_batch_size per_device_train_batch_size per_gpu_eval_batch_size per_gpu_train_batch_size
prediction_loss_only push_to_hub push_to_hub_model_id push_to_hub_organization push_to_hub_token ray_scope
remove_unused_columns report_to restore_callback_states_from_checkpoint resume_from_checkpoint run_name
save_on_each_node save_only_model save_safetensors save_steps save_strategy save_total_limit seed
skip_memory_metrics split_batches tf32 torch_compile torch_compile_backend torch_compile_mode
torch_empty_cache_steps torchdynamo tpu_metrics_debug tpu_num_cores use_cpu use_ipex use_legacy_prediction_loop
use_liger_kernel use_mps_device warmup_ratio warmup_steps weight_decay
""".split()
TRL_0_9_6 = """
chars_per_token dataset_batch_size dataset_kwargs dataset_num_proc dataset_text_field eval_packing max_seq_length
model_init_kwargs neftune_noise_alpha num_of_sequences packing
attn_implementation bnb_4bit_quant_type load_in_4bit load_in_8bit lora_alpha lora_dropout lora_modules_to_save
lora_r lora_target_modules lora_task_type model_name_or_path model_revision torch_dtype trust_remote_code
use_bnb_nested_quant use_peft
config dataset_name dataset_test_split dataset_train_split gradient_checkpointing_use_reentrant env
""".split()
TRL_1_16 = """
activation_offloading assistant_only_loss chat_template_path completion_only_loss dataset_kwargs dataset_num_proc
dataset_text_field eos_token eval_packing learning_rate loss_type max_length model_init_kwargs packing
packing_strategy pad_to_multiple_of pad_token padding_free router_aux_loss_coef shuffle_dataset truncation_mode
trust_remote_code
attn_implementation bnb_4bit_quant_storage bnb_4bit_quant_type dtype load_in_4bit load_in_8bit lora_alpha
lora_dropout lora_modules_to_save lora_r lora_target_modules lora_target_parameters lora_task_type
model_name_or_path model_revision use_bnb_nested_quant use_dora use_peft use_rslora
dataset_config dataset_name dataset_streaming dataset_test_split dataset_train_split ignore_bias_buffers
""".split()
# The original Aria's own keys (aria/config.py: AriaModelConfig, AriaSFTScriptArguments).
ARIA_KEYS = """
tokenizer_path peft_model_path freeze_vit freeze_projector freeze_llm freeze_llm_layers moe_z_loss_coeff
moe_aux_loss_coeff max_image_size split_image dataset_mixer
""".split()


# ---------------------------------------------------------------------------------------------------- keys


def test_every_key_a_recipe_may_carry_is_in_the_table():
    from transformers import TrainingArguments

    installed = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    every = set(installed) | set(TRAINING_ARGUMENTS_4_46) | set(TRL_0_9_6) | set(TRL_1_16) | set(ARIA_KEYS)
    assert sorted(every - set(KEYS)) == []
    assert {k.kind for k in KEYS.values()} == {MEANING, ALIAS, NOOP, REFUSED}
    # our recipe's fields are exactly the keys with a meaning, and every alias sets one of them
    assert set(MEANINGS) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(KEYS[k].target in MEANINGS for k in KEYS if KEYS[k].kind == ALIAS)
    assert {k for k in KEYS if KEYS[k].kind == REFUSED} >= {"fp16", "push_to_hub", "load_in_4bit", "packing"}


def test_list_keys_prints_every_key(capsys):
    assert train_main(["--list-keys"]) == 0
    printed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert printed == set(KEYS)


@pytest.mark.parametrize("name", ["config_lora", "config_full", *EXAMPLES])
def test_original_recipes_load_with_their_values(tmp_path, monkeypatch, name):
    """Each original recipe, its dataset paths made real (relative to the working directory, as there): every key
    is accepted; the values are the recipe's; dataloader_num_workers gets its one line."""
    text = original_recipe(name)
    recipe = yaml.safe_load(text)
    monkeypatch.chdir(tmp_path)
    for path in recipe["dataset_mixer"]:
        original_dataset(tmp_path / path)
    (tmp_path / "recipe.yaml").write_text(text)
    cfg, notes = load_recipe("recipe.yaml")
    for key, value in recipe.items():
        if KEYS[key].kind != MEANING:
            continue
        got = getattr(cfg, key)
        if key == "report_to":
            assert got == [value]
        elif isinstance(got, float):
            assert got == float(value), key
        else:
            assert got == value, key
    assert [n for n in notes if n.startswith("dataloader_num_workers")] == [
        "dataloader_num_workers: no effect here (samples are encoded in the training process, ahead of the "
        "accelerator; no worker processes)"]
    assert len(notes) == 1, notes
    assert cfg.torch_dtype == "bfloat16" and cfg.save_strategy == "epoch" and cfg.eval_strategy == "no"
    assert cfg.log_level == "info" and cfg.model_name_or_path == "rhymes-ai/Aria"


def test_a_dump_of_transformers_training_arguments_is_accepted(tmp_path):
    """Every field of the installed transformers' TrainingArguments at its default (``to_dict()``, as a recipe
    written from one would carry them): the values of the keys with a meaning are taken, and every other key gets
    exactly one line."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"))
    dump = args.to_dict()
    with open(os.path.join(REPO, "configs", "tiny_cpu.yaml")) as f:
        tiny = yaml.safe_load(f)
    (tmp_path / "dump.yaml").write_text(yaml.safe_dump({**dump, "model_config": tiny["model_config"]}))
    cfg, notes = load_recipe(str(tmp_path / "dump.yaml"))
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.adam_beta2, cfg.weight_decay) == (
        args.learning_rate, args.num_train_epochs, args.adam_beta2, args.weight_decay)
    assert cfg.lr_scheduler_type == getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    assert cfg.optim.startswith("adamw")
    assert cfg.per_device_train_batch_size == args.per_device_train_batch_size and cfg.output_dir == args.output_dir
    assert sorted(n.split(":")[0] for n in notes) == sorted(k for k in dump if KEYS[k].kind in (NOOP, REFUSED))


@pytest.mark.parametrize("args, needle", [
    (["fp16=true"], "config key 'fp16': not supported: float16 is not supported"),
    (["--push_to_hub", "true"], "config key 'push_to_hub': not supported"),
    (["--packing"], "config key 'packing': not supported: samples are never packed"),
    (["--load_in_4bit=true"], "config key 'load_in_4bit': not supported: quantized"),
    (["--optim", "adafactor"], "config key 'optim': only AdamW"),
    (["--torch_dtype", "float16"], "config key 'torch_dtype': float16 is not supported"),
    (["--report_to", "wandbb"], "config key 'report_to': 'wandbb' is not one of"),
    (["--save_strategy", "best"], "config key 'save_strategy': must be one of no, steps, epoch"),
    (["--dataloader_num_workrs", "8"], "unknown config key(s): dataloader_num_workrs"),
    (["--eval_steps", "0"], "config key 'eval_steps': must be an integer"),
    (["--dataset_train_split", "../train"], "config key 'dataset_train_split'"),
    (["--learning_rate"], "config key 'learning_rate': expected a number, got True"),
    (["--config"], "--config: expected a recipe file"),
    (["stray"], "override 'stray': expected key=value"),
])
def test_unknown_unsupported_and_bad_keys_are_one_line(tmp_path, capsys, args, needle):
    config = ["--config", os.path.join(REPO, "configs", "tiny_cpu.yaml")] if args != ["--config"] else []
    code = train_main([*config, "--output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_command_line_forms(tmp_path, capsys):
    """``--key value``, ``--key=value``, ``key=value``, a list after ``--key``, ``--flag``, ``--no_flag``, an alias
    and a no-op key: what train_config.yaml records, and the no-op's and the inert refused key's lines."""
    out = tmp_path / "out"
    code = train_main(["--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), "--output_dir", str(out),
                       "--learning_rate", "1e-5", "--max_steps=1", "export=false", "--freeze_llm_layers", "0", "1",
                       "--bf16", "--no_gradient_checkpointing", "--run_name", "2024", "--evaluation_strategy", "no",
                       "--dataloader_num_workers", "8", "--fp16", "false", "--save_strategy", "no"])
    stdout = capsys.readouterr().out
    assert code == 0
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["learning_rate"] == 1e-5 and written["max_steps"] == 1 and written["export"] is False
    assert written["freeze_llm_layers"] == [0, 1] and written["bf16"] is True
    assert written["gradient_checkpointing"] is False and written["run_name"] == "2024"
    assert "dataloader_num_workers" not in written and "fp16" not in written
    assert "dataloader_num_workers: no effect here" in stdout and "fp16: False: nothing to do" in stdout
    assert not (out / "checkpoints").exists()  # save_strategy no


def test_dataset_mixer_weight_zero_skips_a_dataset(tmp_path):
    kept, skipped = original_dataset(tmp_path / "kept", "kept"), original_dataset(tmp_path / "skipped", "skipped")
    records = J.load_datasets({kept: 1, skipped: 0})
    texts = json.dumps([r.messages for r in records])
    assert len(records) == 4 and "kept" in texts and "skipped" not in texts
    records = J.load_datasets({kept: 0.5, skipped: 2})
    assert len(records) == 2 + 8


# ---------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, chat_dir):
    return hub_cache(tmp_path_factory.mktemp("hf_home"), chat_dir[0])


def test_original_lora_recipe_runs_from_the_hub_cache(tmp_path, hf_home):
    """recipes/config_lora.yaml verbatim (model and tokenizer rhymes-ai/Aria, found in the cache), its datasets at
    its paths (weights 1, 0.5 and 2), the original command-line form for a one-step run."""
    (tmp_path / "config_lora.yaml").write_text(ORIGINAL_LORA)
    for i, path in enumerate(("path/to/dataset1", "path/to/dataset2", "path/to/dataset3")):
        original_dataset(tmp_path / path, f"d{i}")
    result = run_recipe(["--config", "config_lora.yaml", "--output_dir", "out", "--max_steps", "1",
                         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps=1"], tmp_path,
                        {"HF_HOME": hf_home})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    lines = result.stdout.splitlines()
    assert "global batch: 2 rows (per_device_train_batch_size 2 x 1 data-parallel device(s))" in result.stdout
    assert any(line.startswith("dataloader_num_workers: no effect here") for line in lines)
    assert "dropped and counted (dropped_samples), not cut as the original trainer cuts it" in result.stdout
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert [line for line in lines if line.startswith("warning: report_to: wandb")] == [
            "warning: report_to: wandb is not installed (pip install wandb): metrics go to metrics.jsonl and "
            "TensorBoard instead"]
        assert (out / "tensorboard").is_dir()
    assert [m["step"] for m in read_metrics(out)] == [1]
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]  # save_strategy epoch: the last step ends the run
    assert safetensors_dtypes(out / "export" / "model") == {"F32"}  # trained in bfloat16 + float32: exported as F32
    assert os.path.isdir(out / "export" / "adapter")
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["model_name_or_path"] == "rhymes-ai/Aria" and written["dataset_mixer"] == {
        "path/to/dataset1": 1, "path/to/dataset2": 0.5, "path/to/dataset3": 2}


@pytest.mark.parametrize("args, needle", [
    (["--model_revision", "no-such-branch"], "config key 'model_name_or_path': rhymes-ai/Aria: cannot fetch"),
    (["--model_name_or_path", "rhymes-ai/Aria-Base-64K"], "rhymes-ai/Aria-Base-64K: cannot fetch from the hub"),
    (["--tokenizer_path", "rhymes-ai/Aria-Chat"], "config key 'tokenizer_path': rhymes-ai/Aria-Chat"),
])
def test_uncached_hub_ids_are_one_line(tmp_path, hf_home, args, needle):
    (tmp_path / "config_full.yaml").write_text(ORIGINAL_FULL)
    for path in ("path/to/dataset1", "path/to/dataset2", "path/to/dataset3"):
        original_dataset(tmp_path / path)
    result = run_recipe(["--config", "config_full.yaml", "--output_dir", "out", *args], tmp_path,
                        {"HF_HOME": hf_home})
    err = stderr_lines(result.stderr)
    assert result.returncode == 2 and len(err) == 1 and needle in err[0], result.stderr[-3000:]
    assert "not in the local cache" in err[0] or "HF_HUB_OFFLINE" in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_model_revision_picks_the_cached_commit(tmp_path, hf_home):
    """``model_revision`` (a commit of the cache) resolves the hub id offline; training reads that snapshot."""
    (tmp_path / "config_full.yaml").write_text(ORIGINAL_FULL)
    for path in ("path/to/dataset1", "path/to/dataset2", "path/to/dataset3"):
        original_dataset(tmp_path / path)
    commit = "4844f0b" + "0" * 33
    result = run_recipe(["--config", "config_full.yaml", "--output_dir", "out", "--model_revision", commit,
                         "--max_steps", "1", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                         "1", "--report_to", "none", "--torch_dtype", "float32", "--save_strategy", "no",
                         "--log_level", "warning"], tmp_path, {"HF_HOME": hf_home})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ""  # log_level warning: no info line, and no warning in this run
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1]
    assert sorted(os.listdir(tmp_path / "out")) == ["export", "metrics.jsonl", "train_config.yaml"]
    assert safetensors_dtypes(tmp_path / "out" / "export" / "model") == {"F32"}
