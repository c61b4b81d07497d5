"""The TrainingArguments keys of the original recipes with their meaning here (issue 20, items 1 and 4): evaluation
on each dataset's test.jsonl (eval_loss against transformers' loss on the same samples), save / logging / eval
strategies and steps, per-device batches over a data-parallel mesh, torch_dtype, report_to (TensorBoard, W&B),
log_level and TrlParser's env."""

from __future__ import annotations

import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from original_recipes import ORIGINAL_FULL, ORIGINAL_LORA, original_dataset
from train_helpers import REPO, read_metrics, run_train, train_main

from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training.config import TrainConfig, load_config
from aria_jax.training.losses import IGNORE_INDEX
from aria_jax.training.plan import Plan

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")


# ---------------------------------------------------------------------------------------------------- the plan


def _plan(num_samples: int, batch: int, **keys) -> Plan:
    return Plan.make(TrainConfig(model_config={}, **keys), num_samples, batch)


def _steps(plan: Plan, at) -> list[int]:
    return [s for s in range(1, plan.total + 1) if at(s)]


def test_save_strategies():
    plan = _plan(64, 8, max_steps=8, save_strategy="steps", save_steps=0.25)  # a fraction: every 2 of 8
    assert _steps(plan, plan.save_at) == [2, 4, 6, 8]
    plan = _plan(64, 8, max_steps=8, save_strategy="steps", save_steps=3)
    assert _steps(plan, plan.save_at) == [3, 6, 8]  # and the last step
    # 10 samples, 2 rows x 1 micro-batch a step: epochs of 5 steps
    plan = _plan(10, 2, save_strategy="epoch", num_train_epochs=2, gradient_accumulation_steps=1)
    assert plan.total == 10 and _steps(plan, plan.save_at) == [5, 10]
    plan = _plan(10, 2, save_strategy="epoch", max_steps=7, gradient_accumulation_steps=1)
    assert _steps(plan, plan.save_at) == [5, 7]
    plan = _plan(10, 2, save_strategy="no", max_steps=7, gradient_accumulation_steps=1)
    assert _steps(plan, plan.save_at) == []
    # 10 samples, 2 rows x 2 micro-batches: ceil(2.5) = 3 steps an epoch
    assert _plan(10, 2, gradient_accumulation_steps=2, num_train_epochs=2).total == 6


def test_logging_and_eval_strategies():
    plan = _plan(100, 1, max_steps=10, logging_steps=4, gradient_accumulation_steps=1)
    assert _steps(plan, plan.log_at) == [4, 8, 10]
    plan = _plan(100, 1, max_steps=10, logging_steps=4, logging_first_step=True, gradient_accumulation_steps=1)
    assert _steps(plan, plan.log_at) == [1, 4, 8, 10]
    plan = _plan(100, 1, max_steps=10, logging_strategy="no", gradient_accumulation_steps=1)
    assert _steps(plan, plan.log_at) == []
    plan = _plan(10, 2, logging_strategy="epoch", num_train_epochs=3, gradient_accumulation_steps=1)
    assert _steps(plan, plan.log_at) == [5, 10, 15]
    # eval_steps defaults to logging_steps; eval_delay in steps
    plan = _plan(100, 1, max_steps=10, eval_strategy="steps", logging_steps=3, gradient_accumulation_steps=1)
    assert _steps(plan, plan.eval_at) == [3, 6, 9]
    plan = _plan(100, 1, max_steps=10, eval_strategy="steps", eval_steps=3, eval_delay=4,
                 gradient_accumulation_steps=1)
    assert _steps(plan, plan.eval_at) == [6, 9]
    # eval_delay in epochs with eval_strategy epoch
    plan = _plan(10, 2, eval_strategy="epoch", num_train_epochs=3, eval_delay=2, gradient_accumulation_steps=1)
    assert _steps(plan, plan.eval_at) == [10, 15]
    plan = _plan(100, 1, max_steps=10, gradient_accumulation_steps=1)  # eval_strategy: no
    assert _steps(plan, plan.eval_at) == []


def test_warmup_steps_and_ratio():
    assert _plan(100, 1, max_steps=10, warmup_steps=3).warmup == 3
    assert _plan(100, 1, max_steps=10, warmup_steps=0.25).warmup == 3  # a fraction, rounded up
    assert _plan(100, 1, max_steps=10, warmup_ratio=0.1).warmup == 1
    assert _plan(100, 1, max_steps=10, warmup_ratio=0.1, warmup_steps=5).warmup == 5  # steps win when > 0


# ---------------------------------------------------------------------------------------------------- runs


def _tiny(out, *extra: str) -> list[str]:
    return ["--config", TINY, "--output_dir", str(out), "--export", "false", *extra]


def test_save_and_logging_at_epoch_ends(tmp_path, capsys):
    """tiny_cpu: 32 synthetic samples, 4 rows x 2 micro-batches a step: an epoch is 4 steps."""
    out = tmp_path / "out"
    assert train_main(_tiny(out, "--max_steps", "6", "--save_strategy", "epoch", "--logging_strategy", "epoch",
                            "--logging_first_step", "true", "--save_total_limit", "null")) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 4, 6]
    assert [m["epoch"] for m in read_metrics(out)] == [0.25, 1.0, 1.5]
    assert sorted(int(p) for p in os.listdir(out / "checkpoints") if p.isdigit()) == [4, 6]


def test_per_device_batch_is_per_data_parallel_device(tmp_path):
    """mesh data=2 with 2 rows per device: 4 rows a micro-batch, x 2 micro-batches. A synthetic sample of tiny_cpu
    is 48 text tokens + 2 image tokens: 400 tokens a step, and a quarter of the 32 samples' epoch."""
    out = tmp_path / "out"
    result = run_train(_tiny(out, "--mesh", "data=2", "--per_device_train_batch_size", "2", "--max_steps", "2",
                             "--save_strategy", "no"),
                       {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("global batch: 4 rows (per_device_train_batch_size 2 x 2 data-parallel device(s)) x "
            "gradient_accumulation_steps 2 = 8 samples per step") in result.stdout
    metrics = read_metrics(out)
    assert [m["tokens"] for m in metrics] == [400, 400]
    assert [m["epoch"] for m in metrics] == [0.25, 0.5]


def test_torch_dtype_bfloat16_keeps_frozen_weights_in_bfloat16(tmp_path):
    from flax import traverse_util

    from aria_jax.training.trainer import build

    for peft in ("false", "true"):
        cfg = load_config(TINY, ["torch_dtype=bfloat16", f"use_peft={peft}", f"output_dir={tmp_path}"])
        setup = build(cfg, log=lambda line: None)
        frozen = traverse_util.flatten_dict(setup.frozen)
        trainable = traverse_util.flatten_dict(setup.trainable)
        bf16 = sum(v.size for v in frozen.values() if v.dtype == jnp.bfloat16)
        assert bf16 >= 0.9 * sum(v.size for v in frozen.values())  # (a norm or two may be kept in float32)
        assert {v.dtype for v in trainable.values()} == {jnp.dtype(jnp.float32)}
        assert any(p[0] == "vision_tower" for p in frozen)  # freeze_vit
        if peft == "false":
            assert all(p[0] != "vision_tower" for p in trainable) and any(p[0] == "projector" for p in trainable)
    cfg = load_config(TINY, [f"output_dir={tmp_path}"])  # default: float32 throughout
    setup = build(cfg, log=lambda line: None)
    assert {v.dtype for v in traverse_util.flatten_dict(setup.frozen).values()} == {jnp.dtype(jnp.float32)}


def _hf_loss(hf_model, processor, records) -> tuple[float, int]:
    """transformers' mean loss over the label tokens of ``records``, each sample alone, and the token count."""
    encoder = D.JsonlEncoder(processor, 980, False)
    total, count = 0.0, 0
    for record in records:
        sample = encoder(record)
        n = int(np.sum(sample.labels[1:] != IGNORE_INDEX))
        inputs = {"input_ids": torch.as_tensor(sample.input_ids[None].astype(np.int64)),
                  "labels": torch.as_tensor(sample.labels[None].astype(np.int64))}
        if sample.pixel_values is not None:
            inputs["pixel_values"] = torch.as_tensor(sample.pixel_values)
            inputs["pixel_mask"] = torch.as_tensor(sample.pixel_mask)
        with torch.no_grad():
            total += hf_model(**inputs).loss.item() * n
        count += n
    return total / count, count


def test_eval_on_each_datasets_test_split(tmp_path, monkeypatch, capsys, chat_dir):
    """The full recipe verbatim, on a converted aria-jax directory given on the command line, with evaluation
    turned on: the test.jsonl of two datasets (one of them with a training weight of 0) in batches of 4 (the last
    one filled up), before the first step and after each. Before training, eval_loss is transformers' loss on the
    same samples."""
    from aria_jax.checkpoint.convert import convert
    from aria_jax.inference.processor import AriaProcessor

    converted = str(tmp_path / "converted")
    convert(chat_dir[0], converted, dtype="float32", progress=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config_full.yaml").write_text(ORIGINAL_FULL)
    original_dataset(tmp_path / "path/to/dataset1", "one", test=True)
    original_dataset(tmp_path / "path/to/dataset2", "two", test=True)
    original_dataset(tmp_path / "path/to/dataset3", "three")
    code = train_main(["--config", "config_full.yaml", "--model_name_or_path", converted, "--tokenizer_path",
                       converted, "--dataset_mixer", "{path/to/dataset1: 1, path/to/dataset2: 0, path/to/dataset3: 2}",
                       "--output_dir", "out", "--max_steps", "2", "--per_device_train_batch_size", "2",
                       "--gradient_accumulation_steps", "1", "--bf16", "false", "--torch_dtype", "float32",
                       "--learning_rate", "1e-3", "--warmup_ratio", "0", "--eval_strategy", "steps", "--eval_steps",
                       "1", "--eval_on_start", "--per_device_eval_batch_size", "4", "--save_strategy", "no",
                       "--report_to", "none"])
    stdout = capsys.readouterr().out
    assert code == 0
    lines = read_metrics(tmp_path / "out")
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 1, 2] and [m["step"] for m in lines if "lm_loss" in m] == [1, 2]
    test_records = J.read_jsonl("path/to/dataset1", "test") + J.read_jsonl("path/to/dataset2", "test")
    assert all(m["eval_samples"] == len(test_records) == 6 and m["eval_dropped_samples"] == 0 for m in evals)
    want, tokens = _hf_loss(chat_dir[1], AriaProcessor.from_pretrained(chat_dir[0]), test_records)
    assert all(m["eval_label_tokens"] == tokens for m in evals)
    assert abs(evals[0]["eval_loss"] - want) <= 1e-4 * want, (evals[0]["eval_loss"], want)
    assert evals[2]["eval_loss"] != evals[0]["eval_loss"]
    assert sorted(os.listdir(tmp_path / "out")) == ["export", "metrics.jsonl", "train_config.yaml"]
    assert f"eval_loss {evals[2]['eval_loss']:.4f}" in stdout.splitlines()[-1]
    assert "evaluation: 6 samples of path/to/dataset1/test.jsonl, path/to/dataset2/test.jsonl" in stdout


def test_eval_without_any_test_split_is_one_line(tmp_path, capsys, chat_dir):
    data = original_dataset(tmp_path / "ds")
    assert train_main(["--model_name_or_path", chat_dir[0], "--dataset_mixer", f"{{{data}: 1}}", "--output_dir",
                       str(tmp_path / "out"), "--max_steps", "1", "--max_image_size", "490", "--export", "false",
                       "--eval_strategy", "epoch", "--save_strategy", "no", "--gradient_checkpointing", "false",
                       "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "eval_strategy epoch: no dataset of dataset_mixer has a test.jsonl: no evaluation (as the original)" in stdout
    assert all("eval_loss" not in m for m in read_metrics(tmp_path / "out"))


class FakeWandb(types.ModuleType):
    """Records what the trainer asks of ``wandb``."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, data, step):
                fake.calls.append(("log", step, dict(data)))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_report_to_wandb_and_env(tmp_path, monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "from-the-shell")  # restored after the test; env: replaces it
    monkeypatch.setenv("ARIA_JAX_TEST_ENV", "")
    out = tmp_path / "out"
    assert train_main(_tiny(out, "--max_steps", "2", "--report_to", "wandb", "--run_name", "my-run", "--env",
                            "{WANDB_PROJECT: aria-ft, ARIA_JAX_TEST_ENV: 7}", "--save_strategy", "no")) == 0
    assert os.environ["ARIA_JAX_TEST_ENV"] == "7"
    kind, init = fake.calls[0]
    assert kind == "init" and init["project"] == "aria-ft" and init["name"] == "my-run"
    assert init["config"]["run_name"] == "my-run"
    logged = [c for c in fake.calls if c[0] == "log"]
    metrics = read_metrics(out)
    assert [c[1] for c in logged] == [m["step"] for m in metrics] == [1, 2]
    assert [c[2]["train/lm_loss"] for c in logged] == [m["lm_loss"] for m in metrics]
    assert fake.calls[-1] == ("finish",)
    assert not (out / "tensorboard").exists()  # report_to: wandb only
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("level, printed", [("warning", True), pytest.param("error", False, marks=pytest.mark.slow)])
def test_report_to_wandb_without_wandb_and_log_level(tmp_path, monkeypatch, capsys, level, printed):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: the import fails
    out = tmp_path / "out"
    assert train_main(_tiny(out, "--max_steps", "1", "--report_to", "wandb", "--log_level", level)) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    warning = ("warning: report_to: wandb is not installed (pip install wandb): metrics go to metrics.jsonl and "
               "TensorBoard instead")
    assert stdout == ([warning] if printed else [])
    assert (out / "tensorboard").is_dir() and [m["step"] for m in read_metrics(out)] == [1]
    written = yaml.safe_load((out / "train_config.yaml").read_text())
    assert written["report_to"] == ["wandb"] and written["log_level"] == level


def test_peft_model_path_continues_the_adapter_of_a_run(tmp_path, monkeypatch, chat_dir):
    """The LoRA recipe exports its adapter (PEFT's format); a second run given it as peft_model_path starts where
    the first ended: its evaluation before the first step is the first run's last, not the base model's (the
    first run's evaluation before its first step, its B being 0). The adapter's r and alpha count, not the
    recipe's lora_r / lora_alpha, as with the original's PeftModel.from_pretrained."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config_lora.yaml").write_text(ORIGINAL_LORA)
    original_dataset(tmp_path / "path/to/dataset1", "one", test=True)
    original_dataset(tmp_path / "path/to/dataset2", "two")
    original_dataset(tmp_path / "path/to/dataset3", "three")
    common = ["--config", "config_lora.yaml", "--model_name_or_path", chat_dir[0], "--tokenizer_path", chat_dir[0],
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--bf16", "false",
              "--torch_dtype", "float32", "--learning_rate", "5e-3", "--warmup_ratio", "0", "--eval_strategy",
              "steps", "--eval_on_start", "--save_strategy", "no", "--report_to", "none", "--max_image_size", "490"]
    assert train_main([*common, "--output_dir", "first", "--max_steps", "2", "--eval_steps", "2"]) == 0
    first = [m for m in read_metrics("first") if "eval_loss" in m]
    assert [m["step"] for m in first] == [0, 2] and first[1]["eval_loss"] != first[0]["eval_loss"]
    assert train_main([*common, "--output_dir", "second", "--max_steps", "1", "--peft_model_path",
                       "first/export/adapter", "--lora_r", "4", "--lora_alpha", "8"]) == 0
    second = [m for m in read_metrics("second") if "eval_loss" in m]
    assert second[0]["step"] == 0
    assert abs(second[0]["eval_loss"] - first[1]["eval_loss"]) <= 1e-5 * first[1]["eval_loss"], (second, first)


def test_peft_model_path_that_is_no_adapter_is_one_line(tmp_path, capsys, chat_dir):
    data = original_dataset(tmp_path / "ds")
    (tmp_path / "adapter").mkdir()
    code = train_main(["--model_name_or_path", chat_dir[0], "--dataset_mixer", f"{{{data}: 1}}", "--output_dir",
                       str(tmp_path / "out"), "--use_peft", "--peft_model_path", str(tmp_path / "adapter")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: config key 'peft_model_path': "), err
    assert "adapter_config.json" in err[0] and not (tmp_path / "out").exists()
