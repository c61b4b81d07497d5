"""Export: params -> HF safetensors that transformers loads (LoRA merged), and LoRA runs end to end."""

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from flax import traverse_util
from hf_models import image_batch
from train_helpers import read_metrics, run_train, write_dataset

from aria_jax import Aria
from aria_jax.checkpoint.peft import load_adapter
from aria_jax.training.export import export_hf
from aria_jax.training.lora import merge_lora


def _hf_logits(directory, batch):
    from transformers import AriaForConditionalGeneration

    model = AriaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()


def test_export_round_trips_and_transformers_loads_it(aria_model, tmp_path):
    model = aria_model("gqa")
    params = jax.tree.map(lambda x: x * 1.01, model.stacked_params())  # not the checkpoint's own values
    out = export_hf(params, model.config, str(tmp_path / "export"))
    again = Aria.from_pretrained(out, dtype="float32")
    flat_again = traverse_util.flatten_dict(again.stacked_params())
    assert set(flat_again) == set(traverse_util.flatten_dict(params))
    for path, a in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_again[path]), err_msg=str(path))
    batch = image_batch("gqa", np.random.default_rng(3))
    valid = batch["attention_mask"].astype(bool)
    ours = np.asarray(again.forward(**batch))
    assert rel_err(ours[valid], _hf_logits(out, batch)[valid]) <= 1e-4


def _train(tmp_path, chat_dir, name, *extra):
    data = write_dataset(tmp_path / "data", n=12)
    out = tmp_path / name
    result = run_train([f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{data}: 1}}", f"output_dir={out}",
                        "max_image_size=490", "per_device_train_batch_size=4", "max_steps=12", "save_steps=6",
                        "warmup_ratio=0.1", "max_seq_length=256", "gradient_checkpointing=true", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, read_metrics(out)


@pytest.mark.slow
def test_full_finetune_loss_falls_and_export_loads_in_transformers(tmp_path, chat_dir):
    out, metrics = _train(tmp_path, chat_dir, "full", "learning_rate=2e-3", "freeze_vit=true")
    losses = [m["lm_loss"] for m in metrics]
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s",
                "tflops"):
        assert np.isfinite(metrics[-1][key]), key
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())
    assert (out / "train_config.yaml").exists()
    exported = Aria.from_pretrained(out / "export" / "model", dtype="float32")
    base = Aria.from_pretrained(chat_dir[0], dtype="float32")
    flat_e, flat_b = traverse_util.flatten_dict(exported.stacked_params()), traverse_util.flatten_dict(base.stacked_params())
    for path in flat_b:  # the ViT is frozen; the rest moved
        same = np.array_equal(np.asarray(flat_e[path]), np.asarray(flat_b[path]))
        assert same == (path[0] == "vision_tower"), path
    ids = np.array([[20, 21, 22, 23, 24, 25]])
    assert rel_err(np.asarray(exported.forward(ids)), _hf_logits(out / "export" / "model", {"input_ids": ids})) <= 1e-4


@pytest.mark.slow
def test_lora_run_exports_merged_weights_and_adapter(tmp_path, chat_dir):
    out, metrics = _train(tmp_path, chat_dir, "lora", "use_peft=true", "learning_rate=1e-2", "lora_dropout=0.0",
                          "freeze_projector=true")
    losses = [m["lm_loss"] for m in metrics]
    assert np.mean(losses[-3:]) < losses[0], losses
    base = Aria.from_pretrained(chat_dir[0], dtype="float32")
    adapter = load_adapter(out / "export" / "adapter", base.config)  # PEFT's format (tests/checkpoint/test_peft_adapters.py)
    assert "gate_up_a" in adapter.lora["language_model"]["layers"]["mlp"]
    assert "projector" not in adapter.lora and "vision_tower" not in adapter.lora  # frozen parts get no adapters
    assert adapter.scale == 32.0 / 8
    merged = merge_lora(base.stacked_params(), adapter.lora, adapter.scale)
    exported = Aria.from_pretrained(out / "export" / "model", dtype="float32")
    for path, value in traverse_util.flatten_dict(merged).items():
        np.testing.assert_allclose(np.asarray(traverse_util.flatten_dict(exported.stacked_params())[path]), np.asarray(value),
                                   rtol=0, atol=1e-6, err_msg=str(path))
    ids = np.array([[20, 21, 22, 23, 24, 25]])
    assert rel_err(np.asarray(exported.forward(ids)), _hf_logits(out / "export" / "model", {"input_ids": ids})) <= 1e-4
