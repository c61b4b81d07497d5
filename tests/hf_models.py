"""Tiny random transformers Aria models, saved in each of the three checkpoint key layouts (aria-spec.md §8).

Importable without torch (the configs and numpy batches are used by tests that need no reference model); making or
saving a transformers model imports torch."""

from __future__ import annotations

import json
import os

import numpy as np

# Structural variety: GQA and MHA, 4/8/6 experts, top-2/3/1, 1 or 2 shared experts, head dims 16/10/12,
# vision head dims 8/6/12, and two image sizes (query counts) per model.
CONFIGS: dict[str, dict] = {
    "gqa": dict(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            moe_num_experts=4,
            moe_topk=2,
            moe_num_shared_experts=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        projector_patch_to_query_dict={16: 4, 4: 2},
    ),
    "mha": dict(
        text_config=dict(
            vocab_size=160,
            hidden_size=48,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=10,
            moe_num_experts=8,
            moe_topk=3,
            moe_num_shared_experts=2,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6},
        ),
        vision_config=dict(
            hidden_size=36,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=6,
            image_size=70,
            patch_size=5,
        ),
        projector_patch_to_query_dict={196: 6, 49: 3},
    ),
    "top1": dict(
        text_config=dict(
            vocab_size=100,
            hidden_size=72,
            intermediate_size=20,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            moe_num_experts=6,
            moe_topk=1,
            moe_num_shared_experts=1,
            rms_norm_eps=1e-5,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=42,
            patch_size=14,
        ),
        projector_patch_to_query_dict={9: 3},
    ),
}
# Not in the parity sweep: takes real 490/980 px images from the processor cheaply (70 px patches) and has room for
# the test tokenizer's 400 tokens.
EXTRA_CONFIGS: dict[str, dict] = {
    "chat": dict(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, moe_num_experts=4, moe_topk=2,
                         moe_num_shared_experts=1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=980, patch_size=70),
        projector_patch_to_query_dict={49: 4, 196: 8},
    ),
}
IMAGE_TOKEN = 9


def make_hf_model(name: str, seed: int = 0, scale: float = 4.0, dtype=None):
    """A random transformers AriaForConditionalGeneration (float32 unless ``dtype``); ``scale`` widens the init so
    logits are not flat."""
    import torch
    from transformers import AriaConfig, AriaForConditionalGeneration

    spec = {**CONFIGS, **EXTRA_CONFIGS}[name]
    cfg = AriaConfig(
        text_config={"model_type": "aria_text", **spec["text_config"]},
        vision_config={"model_type": "idefics3_vision", **spec["vision_config"]},
        projector_patch_to_query_dict=spec["projector_patch_to_query_dict"],
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if scale != 1.0 and p.ndim >= 2:
                p.mul_(scale)
            elif p.ndim == 1 and "post_layernorm" not in pname:
                # Non-trivial norm weights and biases so their loading and use are tested too.
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if pname.endswith("weight") else 0.0))
        model.model.multi_modal_projector.query.normal_(0, 1.0)
        # Image tokens as large as text embeddings would be in a trained model, so images visibly move the logits.
        for lin in (
            model.model.multi_modal_projector.feed_forward.linear_in,
            model.model.multi_modal_projector.feed_forward.linear_out,
        ):
            lin.weight.normal_(0, 2.0 / lin.weight.shape[1] ** 0.5)
    return model.to(torch.float32 if dtype is None else dtype).eval()


def _hub_to_original(key: str) -> str:
    """Inverse of convert_aria_weights_to_hf.py's renames: the original custom-code names."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    key = key.replace("multi_modal_projector.layer_norm.", "multi_modal_projector.ln_ffn.")
    key = key.replace("cross_attn.layer_norm_kv.", "cross_attn.ln_kv.")
    return key.replace("multi_modal_projector.feed_forward.", "multi_modal_projector.ffn.")


def save_layout(model, layout: str, directory: str, max_shard_size: str | None = None) -> str:
    """Write ``model`` as an HF directory in one of the layouts: transformers5, hub, original."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    if layout == "hub":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
        # Write config.json in the 4.x dialect the hub's HF-format repo uses (rope_theta, moe_intermediate_size).
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        tc = cfg["text_config"]
        tc["rope_theta"] = tc.pop("rope_parameters")["rope_theta"]
        tc["moe_intermediate_size"] = tc["intermediate_size"]
        tc["num_experts_per_tok"] = tc["moe_topk"]
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        return directory
    model.config.save_pretrained(directory)
    if layout == "transformers5":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
    elif layout == "original":
        from safetensors.torch import load_file

        hub_dir = directory + "_hubtmp"
        model.save_pretrained(hub_dir)

        state = {
            _hub_to_original(k): v
            for k, v in load_file(os.path.join(hub_dir, "model.safetensors")).items()
            if "post_layernorm" not in k
        }
        state.update(
            {
                f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(2)
                for i in range(model.config.text_config.num_hidden_layers)
            }
        )
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        tc, vc = cfg["text_config"], cfg["vision_config"]
        tc["model_type"] = "aria_moe_lm"
        tc["moe_intermediate_size"] = tc["intermediate_size"]
        tc["intermediate_size"] = 13568  # unused by the original code, as in the real custom-code config
        tc["rope_theta"] = tc.pop("rope_parameters")["rope_theta"]
        vc["model_type"] = "aria_vision_model"
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    else:
        raise ValueError(layout)
    save_file(state, os.path.join(directory, "model.safetensors"))
    return directory


def text_batch(vocab: int, rng: np.random.Generator, lengths=(11, 7)) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random text (no image tokens): ids and attention mask."""
    t = max(lengths)
    ids = np.full((len(lengths), t), 2, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        tokens = rng.integers(10, vocab, n)
        ids[row, t - n :] = tokens
        mask[row, t - n :] = 1
    return ids, mask


def image_batch(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two prompts with three images of the largest size: two partially masked, one full; left padding."""
    spec = CONFIGS[name]
    patch = spec["vision_config"]["patch_size"]
    patches = max(spec["projector_patch_to_query_dict"])
    queries = spec["projector_patch_to_query_dict"][patches]
    side = int(round(patches**0.5)) * patch
    vocab = spec["text_config"]["vocab_size"]
    pixel_values = rng.uniform(-1, 1, (3, 3, side, side)).astype(np.float32)
    pixel_mask = np.ones((3, side, side), bool)
    pixel_mask[0, side - patch - 3 :, :] = False  # some rows padded (one patch row only partly)
    pixel_mask[1, :, side // 2 + 1 :] = False  # columns padded
    for i in range(2):
        pixel_values[i][:, ~pixel_mask[i]] = -1.0  # padding is -1 after normalisation, as the processor does
    rows = [
        [*rng.integers(10, vocab, 3)] + [IMAGE_TOKEN] * queries + [*rng.integers(10, vocab, 4)],
        [*rng.integers(10, vocab, 2)]
        + [IMAGE_TOKEN] * queries
        + [*rng.integers(10, vocab, 2)]
        + [IMAGE_TOKEN] * queries
        + [*rng.integers(10, vocab, 3)],
    ]
    t = max(map(len, rows))
    ids = np.full((2, t), 2, np.int64)
    mask = np.zeros((2, t), np.int64)
    for r, row in enumerate(rows):
        ids[r, t - len(row) :] = row
        mask[r, t - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "pixel_mask": pixel_mask}
