"""AriaConfig reads the transformers 5.x, transformers 4.x and original custom-code config.json dialects."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aria_jax import Aria, AriaConfig
from aria_jax.config import ConfigError

# rhymes-ai/Aria's HF-format config.json (aria-spec.md §1.4), in the 4.x dialect it ships in.
REAL_ARIA = {
    "architectures": ["AriaForConditionalGeneration"],
    "image_token_index": 9,
    "model_type": "aria",
    "pad_token_id": 2,
    "ignore_index": -100,
    "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
    "torch_dtype": "bfloat16",
    "vision_feature_layer": -1,
    "text_config": {
        "model_type": "aria_text",
        "hidden_size": 2560,
        "intermediate_size": 1664,
        "moe_intermediate_size": 1664,
        "max_position_embeddings": 65536,
        "moe_num_experts": 64,
        "moe_topk": 6,
        "num_experts_per_tok": 6,
        "num_attention_heads": 20,
        "num_key_value_heads": 20,
        "num_hidden_layers": 28,
        "rope_theta": 5000000,
        "vocab_size": 100352,
    },
    "vision_config": {
        "model_type": "idefics3_vision",
        "image_size": 980,
        "patch_size": 14,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "attention_heads": 16,
    },
}


def write(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def assert_matches_transformers(ours: AriaConfig, hf) -> None:
    t, v = hf.text_config, hf.vision_config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "moe_num_experts",
        "moe_topk",
        "moe_num_shared_experts",
        "max_position_embeddings",
    ):
        assert getattr(ours.text, field) == getattr(t, field), field
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "layer_norm_eps",
        "num_channels",
    ):
        assert getattr(ours.vision, field) == getattr(v, field), field
    assert dict(ours.projector_patch_to_query) == hf.projector_patch_to_query_dict
    assert ours.image_token_id == hf.image_token_id


def test_real_config_4x_dialect_equals_preset_and_transformers(tmp_path):
    from transformers import AriaConfig as HFConfig

    path = write(tmp_path, REAL_ARIA)
    ours = AriaConfig.from_pretrained(path)
    assert ours == AriaConfig.preset("aria")
    assert_matches_transformers(ours, HFConfig.from_pretrained(path))


def test_5x_dialect_as_saved_by_transformers(tmp_path):
    from transformers import AriaConfig as HFConfig

    hf = HFConfig(
        text_config={
            "model_type": "aria_text",
            "hidden_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 10,
            "num_hidden_layers": 3,
            "moe_num_experts": 5,
            "moe_topk": 3,
            "intermediate_size": 24,
            "rope_parameters": {"rope_type": "default", "rope_theta": 123.0},
        },
        vision_config={"model_type": "idefics3_vision", "hidden_size": 36, "num_attention_heads": 6},
        projector_patch_to_query_dict={49: 3},
    )
    hf.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert_matches_transformers(AriaConfig.from_pretrained(tmp_path), hf)


def test_original_custom_code_dialect_uses_moe_intermediate_size(tmp_path):
    cfg = json.loads(json.dumps(REAL_ARIA))
    cfg["text_config"].update(model_type="aria_moe_lm", intermediate_size=13568)
    cfg["vision_config"]["model_type"] = "aria_vision_model"
    ours = AriaConfig.from_pretrained(write(tmp_path, cfg))
    assert ours.text.intermediate_size == 1664
    assert ours.text == AriaConfig.preset("aria").text


def test_to_dict_round_trips_and_transformers_builds_the_same_shapes():
    from transformers import AriaConfig as HFConfig
    from transformers import AriaForConditionalGeneration

    cfg = AriaConfig.preset("tiny")
    assert AriaConfig.from_dict(cfg.to_dict()) == cfg
    hf = AriaForConditionalGeneration(HFConfig(**cfg.to_dict()))
    ours = sum(x.size for x in __import__("jax").tree.leaves(Aria.param_shapes(cfg)))
    post_layernorm = 2 * cfg.vision.hidden_size  # zeros in every checkpoint; never applied here
    assert ours == sum(p.numel() for p in hf.parameters()) - post_layernorm


def test_aria_preset_has_25_3b_parameters_like_transformers():
    """Abstract shapes only: compares with transformers' own count on the meta device (aria-spec.md §10)."""
    import jax
    from transformers import AriaConfig as HFConfig
    from transformers import AriaForConditionalGeneration

    ours = sum(x.size for x in jax.tree.leaves(Aria.param_shapes(AriaConfig.preset("aria"))))
    with torch.device("meta"):
        hf = AriaForConditionalGeneration(HFConfig(**REAL_ARIA))
    assert ours == sum(p.numel() for p in hf.parameters()) - 2 * 1152
    assert ours == 25_307_311_216 - 2304


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("text_config"), "missing or malformed key 'text_config'"),
        (lambda c: c["text_config"].pop("hidden_size"), "missing key 'text_config.hidden_size'"),
        (
            lambda c: c["text_config"].update(num_experts_per_tok=4),
            r"contradictory values: text_config.moe_topk=6, text_config.num_experts_per_tok=4",
        ),
        (
            lambda c: c["text_config"].update(moe_intermediate_size=100),
            r"text_config.intermediate_size=1664, text_config.moe_intermediate_size=100",
        ),
        (
            lambda c: c["text_config"].update(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
            r"text_config.rope_theta=5000000, text_config.rope_parameters.rope_theta=10000.0",
        ),
        (
            lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4}),
            "rope_scaling .* is not supported",
        ),
        (
            lambda c: c["text_config"].update(num_key_value_heads=3),
            r"num_attention_heads \(20\) is not a multiple of text_config.num_key_value_heads \(3\)",
        ),
        (
            lambda c: c["text_config"].update(model_type="llama"),
            "text_config.model_type 'llama' is not an Aria text model",
        ),
        (
            lambda c: c["text_config"].update(moe_topk=65, num_experts_per_tok=65),
            r"moe_topk \(65\) must be in 1..moe_num_experts \(64\)",
        ),
        (lambda c: c["text_config"].update(vocab_size="big"), "text_config.vocab_size must be an integer, got 'big'"),
        (lambda c: c["vision_config"].pop("image_size"), "missing key 'vision_config.image_size'"),
        (lambda c: c.update(projector_patch_to_query_dict={"a": 1}), "projector_patch_to_query_dict has non-integer"),
    ],
)
def test_bad_values_fail_naming_the_file_and_key(tmp_path, edit, message):
    cfg = json.loads(json.dumps(REAL_ARIA))
    edit(cfg)
    with pytest.raises(ConfigError, match=message) as info:
        AriaConfig.from_pretrained(write(tmp_path, cfg))
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AriaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        AriaConfig.from_pretrained(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        AriaConfig.preset("huge")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@given(st.lists(st.tuples(st.sampled_from([None, "text_config", "vision_config"]), st.integers(0, 30), JSON_VALUES,
                          st.booleans()), min_size=1, max_size=3))
def test_mutated_configs_raise_only_config_errors(edits):
    """Any value of any key (or its removal): a config, or ConfigError. Before: TypeError, ZeroDivisionError,
    OverflowError for e.g. layer_norm_eps null, num_attention_heads 0, a projector entry of 1e999."""
    raw = json.loads(json.dumps(REAL_ARIA))
    for section, index, value, remove in edits:
        target = raw if section is None else raw[section] if isinstance(raw.get(section), dict) else raw
        key = sorted(target)[index % len(target)] if target else "x"
        if remove:
            target.pop(key, None)
        else:
            target[key] = value
    try:
        AriaConfig.from_dict(raw)
    except ConfigError as e:
        assert "\n" not in str(e)
