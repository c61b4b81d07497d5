"""lora_target_modules as the original rhymes-ai/Aria trainer reads them: substrings of the original model's module
names, frozen parts left out, modules LoRA cannot adapt refused (aria_jax.training.lora.select_rules)."""

import pytest
from hf_models import CONFIGS

from aria_jax.config import AriaConfig
from aria_jax.training.lora import select_rules

# The original recipes' list (recipes/config_lora.yaml, examples/*/config_lora.yaml).
RECIPE = ["fc1", "fc2", "q_proj", "k_proj", "v_proj", "linear", "o_proj", "up_proj", "down_proj", "out_proj",
          "gate_proj", "lm_head"]
TEXT = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "experts.fc1", "experts.fc2",
        "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj", "language_model.lm_head"}
VISION = {"vit:self_attn.q_proj", "vit:self_attn.k_proj", "vit:self_attn.v_proj", "vit:self_attn.out_proj",
          "vit:mlp.fc1", "vit:mlp.fc2"}
PROJECTOR = {"cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.linear",
             "feed_forward.linear_in", "feed_forward.linear_out"}


def _config():
    spec = CONFIGS["gqa"]
    return AriaConfig.from_dict({"text_config": spec["text_config"], "vision_config": spec["vision_config"],
                                 "projector_patch_to_query_dict": spec["projector_patch_to_query_dict"]})


def _names(rules):
    out = set()
    for r in rules:
        tail = ".".join(r.module.split(".")[-2:])
        out.add(f"vit:{tail}" if r.part == "vit" else tail)
    return out


def test_the_recipe_list_with_the_recipes_freezes_selects_the_decoder():
    rules = select_rules(RECIPE, {"vit", "projector"}, _config())
    assert _names(rules) == TEXT
    assert {r.target for r in rules if r.module.endswith("experts.fc1")} == {"fc1"}


def test_unfrozen_vision_tower_and_projector_get_lora_by_substring():
    rules = select_rules(RECIPE, set(), _config())
    # fc1 / fc2 also select the vision MLP, q/k/v_proj the vision and projector projections, out_proj the vision
    # attention, linear the projector's cross_attn.linear and its FFN's linear_in / linear_out
    assert _names(rules) == TEXT | VISION | PROJECTOR
    by_module = {r.module: r.target for r in rules}
    assert by_module["multi_modal_projector.feed_forward.linear_in"] == "linear"  # the first matching target wins
    assert not any("multihead_attn" in r.module for r in rules)  # PEFT's LoRA there never runs in the original


def test_substrings_as_the_original_matches_them():
    config = _config()
    assert _names(select_rules(["linear_in"], set(), config)) == {"feed_forward.linear_in"}
    assert _names(select_rules(["ffn.linear"], set(), config)) == {"feed_forward.linear_in", "feed_forward.linear_out"}
    assert _names(select_rules(["self_attn.q"], {"projector"}, config)) == {"self_attn.q_proj", "vit:self_attn.q_proj"}
    assert _names(select_rules(["lm_head"], {"vit", "projector"})) == {"language_model.lm_head"}
    # a target that only matches frozen parts selects nothing there, and is no error (the recipes' out_proj)
    assert _names(select_rules(["out_proj", "q_proj"], {"vit", "projector"})) == {"self_attn.q_proj"}


@pytest.mark.parametrize(("targets", "frozen", "message"), [
    (["nope"], set(), r"unknown lora_target_modules: nope \(no module of Aria contains it"),
    (["mlp"], {"vit"}, r"'mlp' matches module language_model\.model\.layers\.N\.mlp, which LoRA cannot adapt"),
    (["experts"], set(), r"'experts' matches module language_model\.model\.layers\.N\.mlp\.experts, which LoRA cannot"),
    (["layer_norm1"], {"projector"}, r"'layer_norm1' matches module vision_tower\.vision_model\.encoder\.layers\.N\.layer_norm1"),
    (["embed_tokens"], set(), r"'embed_tokens' matches module language_model\.model\.embed_tokens"),
    (["layers.1.self_attn"], set(), r"'layers\.1\.self_attn' selects language_model\.model\.layers\.N\.self_attn\.q_proj in only some layers"),
    ([""], set(), r"target '' is not a module name"),
])
def test_bad_targets_are_refused_naming_them(targets, frozen, message):
    with pytest.raises(ValueError, match=message):
        select_rules(targets, frozen, _config())


def test_frozen_parts_are_not_matched():
    # layer_norm1 would be refused in an unfrozen vision tower; frozen, it is skipped as the original skips it
    assert _names(select_rules(["layer_norm1", "q_proj"], {"vit", "projector"}, _config())) == {"self_attn.q_proj"}


def test_layer_numbers_that_name_every_layer_together():
    config = _config()  # two decoder layers
    rules = select_rules(["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"], {"vit", "projector"}, config)
    assert _names(rules) == {"self_attn.q_proj"}
    with pytest.raises(ValueError, match=r"'layers\.0\.self_attn\.q_proj' selects .* in only some layers"):
        select_rules(["layers.0.self_attn.q_proj"], {"vit", "projector"}, config)
    with pytest.raises(ValueError, match="in only some layers"):  # without the config the layer count is unknown
        select_rules(["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"], {"vit", "projector"})


@pytest.mark.slow
def test_a_run_with_vision_and_projector_unfrozen_exports_an_adapter_peft_loads(tmp_path, chat_dir):
    """train.py with the recipes' targets and nothing frozen: LoRA on the vision tower and the projector too; the
    exported adapter loads in peft + transformers and in aria-jax, both giving the exported merged model's logits."""
    import json

    import numpy as np
    import torch
    from conftest import rel_err
    from train_helpers import run_train, write_dataset

    from aria_jax import Aria

    peft = pytest.importorskip("peft")
    from transformers import AriaForConditionalGeneration

    data = write_dataset(tmp_path / "data", n=8)
    out = tmp_path / "run"
    result = run_train([f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{data}: 1}}", f"output_dir={out}",
                        "max_image_size=490", "per_device_train_batch_size=2", "max_steps=3", "save_steps=3",
                        "max_seq_length=256", "use_peft=true", "freeze_vit=false", "freeze_projector=false",
                        "learning_rate=1e-2", "lora_dropout=0.0", f"lora_target_modules=[{','.join(RECIPE)}]"])
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = out / "export" / "adapter"
    modules = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    for name in ("vision_tower.encoder.layers.0.self_attn.out_proj", "vision_tower.encoder.layers.1.mlp.fc1",
                 "multi_modal_projector.cross_attn.linear", "multi_modal_projector.feed_forward.linear_out"):
        assert "model." + name in modules, name

    rng = np.random.default_rng(0)
    batch = {"input_ids": np.array([[20, 21, 9, 9, 9, 9, 22, 23]]), "attention_mask": np.ones((1, 8), np.int64),
             "pixel_values": rng.uniform(-1, 1, (1, 3, 490, 490)).astype(np.float32),
             "pixel_mask": np.ones((1, 490, 490), bool)}
    exported = np.asarray(Aria.from_pretrained(out / "export" / "model", dtype="float32").forward(**batch))
    loaded = np.asarray(Aria.from_pretrained(chat_dir[0], dtype="float32", adapter=adapter).forward(**batch))
    base = np.asarray(Aria.from_pretrained(chat_dir[0], dtype="float32").forward(**batch))
    hf = AriaForConditionalGeneration.from_pretrained(chat_dir[0], dtype=torch.float32)
    hf.set_attn_implementation("eager")
    model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    print(f"trained adapter: aria-jax {rel_err(loaded, exported):.2e}, peft {rel_err(theirs, exported):.2e} "
          f"from the exported merged model; base {rel_err(base, exported):.2e}")
    assert rel_err(loaded, exported) <= 1e-5
    assert rel_err(theirs, exported) <= 1e-4
    assert rel_err(base, exported) > 1e-3  # the run moved the adapters
