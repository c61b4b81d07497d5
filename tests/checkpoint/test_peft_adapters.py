"""PEFT LoRA adapters in and out (aria_jax.checkpoint.peft): transformers + peft load the adapters aria-jax writes and
give the logits of our merged model; aria-jax loads the adapters peft writes (and the original rhymes-ai/Aria
trainer's layout, grouped experts included) and gives peft's logits; bad adapter directories are one line."""

import json
import os
import types

import jax
import numpy as np
import pytest
import torch
from conftest import rel_err
from flax import traverse_util
from hf_models import image_batch, make_hf_model
from safetensors.numpy import save_file

from aria_jax import Aria
from aria_jax.checkpoint.peft import AdapterError, load_adapter
from aria_jax.errors import InputError
from aria_jax.model.lora import SITES, original_name, pair_paths
from aria_jax.training.export import export_adapter
from aria_jax.training.lora import RULES, init_lora, merge_lora

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0


def _random_lora(params, rank=R, seed=0, rules=RULES):
    """Pairs on every trainable site (text, vision, projector) with nonzero B, so each one moves the logits."""
    lora = init_lora(params, list(rules), rank, jax.random.key(seed))
    flat = traverse_util.flatten_dict(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    return traverse_util.unflatten_dict(
        {p: np.asarray(jax.random.normal(k, v.shape) * 0.3 if p[-1].endswith("_b") else v)
         for (p, v), k in zip(sorted(flat.items()), keys, strict=True)})


def _peft_logits(peft_model, batch):
    peft_model.eval()
    with torch.no_grad():
        return peft_model(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()


def _export(lora, directory, **cfg):
    recipe = types.SimpleNamespace(lora_r=R, lora_alpha=ALPHA, lora_dropout=0.05, model_name_or_path="tiny",
                                   freeze_llm_layers=[], **cfg)
    return export_adapter(lora, RULES, recipe, str(directory))


@pytest.mark.parametrize("name", ["gqa", pytest.param("mha", marks=pytest.mark.slow)])  # mha: the long run only
def test_peft_loads_our_adapter_with_our_logits(aria_model, checkpoint, tmp_path, name):
    model = aria_model(name)
    base = model.stacked_params()
    lora = _random_lora(base)
    out = _export(lora, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == R and meta["lora_alpha"] == ALPHA
    assert any("vision_tower" in m for m in meta["target_modules"]) and meta["target_parameters"]

    batch = image_batch(name, np.random.default_rng(5))
    valid = batch["attention_mask"].astype(bool)
    merged = Aria(model.config, merge_lora(base, lora, ALPHA / R), dtype="float32")
    ours = np.asarray(merged.forward(**batch))
    hf = peft.PeftModel.from_pretrained(make_hf_model(name), out)
    # every tensor of the file went into the model, unchanged (peft only warns about keys it cannot place)
    loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(hf, save_embedding_layers=False).items()}
    from safetensors.numpy import load_file

    written = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert set(loaded) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    theirs = _peft_logits(hf, batch)
    err = rel_err(ours[valid], theirs[valid])
    print(f"{name}: our merged model vs peft on transformers: rel err {err:.2e}")
    assert err <= 1e-4
    assert rel_err(np.asarray(model.forward(**batch))[valid], theirs[valid]) > 1e-2  # the adapter matters

    again = Aria.from_pretrained(checkpoint(name), dtype="float32", adapter=out)  # and back in
    assert rel_err(np.asarray(again.forward(**batch))[valid], ours[valid]) <= 1e-5


PEFT_TARGETS = (r".*(self_attn\.(q|k|v|o|out)_proj|mlp\.fc[12]|shared_experts\.(gate|up|down)_proj"
                r"|cross_attn\.(q_proj|k_proj|v_proj|linear)|feed_forward\.linear_(in|out)|lm_head)$")


@pytest.mark.parametrize("name", [pytest.param("gqa", marks=pytest.mark.slow), "top1"])
def test_we_load_a_peft_adapter_with_peft_logits(checkpoint, tmp_path, name):
    torch.manual_seed(1)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                             rank_pattern={"lm_head": 2}, alpha_pattern={"o_proj": 3.0},
                             init_lora_weights=False)  # random A and B
    hf = peft.get_peft_model(make_hf_model(name), config)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "lora_" in pname:
                p.mul_(0.5)
    hf.save_pretrained(tmp_path / "adapter")

    batch = image_batch(name, np.random.default_rng(6))
    valid = batch["attention_mask"].astype(bool)
    theirs = _peft_logits(hf, batch)
    for layout in ("stacked", "unrolled"):
        ours = Aria.from_pretrained(checkpoint(name), dtype="float32", adapter=tmp_path / "adapter", layout=layout)
        err = rel_err(np.asarray(ours.forward(**batch))[valid], theirs[valid])
        print(f"{name} ({layout}): peft's adapter in aria-jax vs peft on transformers: rel err {err:.2e}")
        assert err <= 1e-4
    plain = Aria.from_pretrained(checkpoint(name), dtype="float32")
    assert rel_err(np.asarray(plain.forward(**batch))[valid], theirs[valid]) > 1e-2

    adapter = load_adapter(tmp_path / "adapter", plain.config)
    assert adapter.scale == ALPHA / R and adapter.r == R
    sites = {s.module.rsplit(".", 2)[-2] + "." + s.module.rsplit(".", 1)[-1] for s in adapter.sites}
    assert {"experts.fc1", "experts.fc2", "self_attn.out_proj", "feed_forward.linear_in", "cross_attn.linear"} <= sites
    flat = traverse_util.flatten_dict(adapter.lora)
    assert flat[("language_model", "lm_head", "kernel_a")].shape[-1] == 2  # its rank_pattern rank

    # written out again (rank_pattern / alpha_pattern for the pairs of another rank), peft gives the same logits
    again = peft.PeftModel.from_pretrained(make_hf_model(name), _export(adapter.lora, tmp_path / "again"))
    err = rel_err(_peft_logits(again, batch)[valid], theirs[valid])
    print(f"{name}: peft's adapter through aria-jax and back into peft: rel err {err:.2e}")
    assert err <= 1e-5


def _original_adapter(lora, directory, r=R, alpha=ALPHA):
    """The adapter the original trainer writes: custom-code module names, its GroupedGemmLoraLayer's (E, in, r) /
    (E, r, out) expert pairs, target_modules the full names its get_lora_target_modules lists."""
    flat = traverse_util.flatten_dict(lora)
    tensors, modules = {}, []
    for site in SITES:
        a_path, b_path = pair_paths(site.path)
        if a_path not in flat:
            continue
        a, b = np.asarray(flat[a_path]), np.asarray(flat[b_path])
        for layer in range(a.shape[0]) if site.layered else [None]:
            la, lb = (a[layer], b[layer]) if site.layered else (a, b)
            name = original_name(site.name(layer))
            if site.n_batch == 2:
                ta, tb = la, lb
            else:
                ta, tb = la.reshape(-1, la.shape[-1]).T, lb.reshape(lb.shape[0], -1).T
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(ta)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(tb)
            modules.append(name)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05,
            "target_modules": modules, "base_model_name_or_path": "rhymes-ai/Aria"}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(meta, f)
    return directory


def test_the_original_trainers_adapter_loads_exactly(aria_model, tmp_path):
    model = aria_model("gqa")
    lora = _random_lora(model.stacked_params(), seed=3)
    directory = _original_adapter(lora, tmp_path / "original")
    adapter = load_adapter(directory, model.config)
    assert adapter.scale == ALPHA / R
    want, got = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(adapter.lora)
    assert set(got) == set(want)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    # and exported again in transformers 5's form, it is the same adapter
    again = load_adapter(_export(adapter.lora, tmp_path / "t5"), model.config)
    for path, value in want.items():
        np.testing.assert_allclose(traverse_util.flatten_dict(again.lora)[path], value, rtol=0, atol=0)


def test_frozen_layers_are_left_out_and_load_as_zeros(aria_model, tmp_path):
    model = aria_model("gqa")
    lora = _random_lora(model.stacked_params(), seed=4)
    recipe = types.SimpleNamespace(lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0, model_name_or_path="tiny",
                                   freeze_llm_layers=[0])
    out = export_adapter(lora, RULES, recipe, str(tmp_path / "frozen0"))
    meta = json.loads((tmp_path / "frozen0" / "adapter_config.json").read_text())
    assert not any(".layers.0." in m for m in meta["target_modules"] if m.startswith("model.language_model"))
    got = traverse_util.flatten_dict(load_adapter(out, model.config).lora)
    q_b = got[("language_model", "layers", "self_attn", "q_kernel_b")]
    assert not q_b[0].any() and q_b[1].any()


# -- bad adapter directories: one line naming the file and key, an InputError ------------------------------------


def _good(tmp_path, aria_model):
    model = aria_model("gqa")
    lora = _random_lora(model.stacked_params(), seed=2)
    return _export(lora, tmp_path / "adapter"), model.config


def _rewrite(directory, edit):
    from safetensors.numpy import load_file

    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(directory, **changes):
    path = os.path.join(directory, "adapter_config.json")
    meta = json.loads(open(path).read())
    meta.update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


Q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
CASES = {
    "not a directory": (lambda d: os.rename(d, d + "-gone"), r"adapter: not a directory"),
    "no config": (lambda d: os.remove(os.path.join(d, "adapter_config.json")), r"adapter_config\.json: missing$"),
    "no weights": (lambda d: os.rename(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin")),
                   r"adapter_model\.safetensors: missing \(adapter_model\.bin is pickled"),
    "config not JSON": (lambda d: open(os.path.join(d, "adapter_config.json"), "w").write("{r: 4"),
                        r"adapter_config\.json: not valid JSON"),
    "not LoRA": (lambda d: _edit_config(d, peft_type="IA3"), r"adapter_config\.json: peft_type 'IA3'"),
    "rank mismatch": (lambda d: _edit_config(d, r=8), r"lora_A\.weight': rank 4, but adapter_config\.json says r=8"),
    "DoRA": (lambda d: _edit_config(d, use_dora=True), r"adapter_config\.json: use_dora: DoRA adapters are not supported"),
    "unknown module": (lambda d: _rewrite(d, lambda t: t.update({"base_model.model.model.language_model.layers.0.mlp.router.lora_A.weight": np.zeros((4, 64), np.float32)})),
                       r"module 'model\.language_model\.layers\.0\.mlp\.router' is not one of this Aria model's linear layers"),
    "layer out of range": (lambda d: _rewrite(d, lambda t: t.update({k.replace("layers.0.", "layers.7."): v for k, v in t.items() if "layers.0.self_attn.q_proj" in k})),
                           r"module 'model\.language_model\.layers\.7\.self_attn\.q_proj' is not one of"),
    "not a LoRA key": (lambda d: _rewrite(d, lambda t: t.update({"base_model.model.model.language_model.norm.weight": np.zeros(64, np.float32)})),
                       r"tensor 'base_model\.model\.model\.language_model\.norm\.weight': not a LoRA weight"),
    "embedding of another shape": (lambda d: _rewrite(d, lambda t: t.update({"base_model.model.lm_head.base_layer.weight": np.zeros((2, 2), np.float32)})),
                                   r"tensor 'base_model\.model\.lm_head\.base_layer\.weight': shape \[2, 2\], the model's is \[128, 64\]"),
    "DoRA key": (lambda d: _rewrite(d, lambda t: t.update({f"{Q0}.lora_magnitude_vector": np.zeros(64, np.float32)})),
                 r"lora_magnitude_vector': DoRA \(use_dora\) is not supported"),
    "no partner": (lambda d: _rewrite(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), rf"tensor '{Q0}\.lora_A\.weight': has no lora_B partner"),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.update({f"{Q0}.lora_B.weight": np.zeros((60, 4), np.float32)})),
                    rf"tensor '{Q0}\.lora_A\.weight': lora_A \[4, 64\] and lora_B \[60, 4\] do not fit the module \(expected lora_A \[r, 64\] and lora_B \[64, r\]"),
    "experts not in target_parameters": (lambda d: _edit_config(d, target_parameters=None),
                                         r"mlp\.experts\.(base_layer\.)?lora_[AB]\.weight': adapter_config\.json target_parameters names no parameter"),
    "truncated weights": (lambda d: open(os.path.join(d, "adapter_model.safetensors"), "r+b").truncate(100),
                          r"adapter_model\.safetensors: (truncated|corrupt)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_is_one_line_naming_it(tmp_path, aria_model, checkpoint, case):
    directory, config = _good(tmp_path, aria_model)
    damage, message = CASES[case]
    damage(directory)
    with pytest.raises(AdapterError, match=message) as info:
        load_adapter(directory, config)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    with pytest.raises(AdapterError, match=message):  # before any weight is read
        Aria.from_pretrained(checkpoint("gqa"), dtype="float32", adapter=directory)
