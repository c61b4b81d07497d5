"""QLoRA (recipe key quantize_base): LoRA over a frozen int8 / int4 base. The objective and its LoRA gradients equal
those over the dequantized float base; a run's loss tracks LoRA over the float base; its checkpoints hold the
adapter and never the base; resume is exact; the merged export loads in transformers with the logits of the
quantized base + adapter."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from flax import traverse_util
from safetensors.numpy import load_file
from train_helpers import REPO, read_metrics, stderr_lines, train_main

from aria_jax import Aria
from aria_jax.checkpoint.peft import load_adapter
from aria_jax.config import AriaConfig
from aria_jax.model.aria import AriaModel
from aria_jax.model.layers import LORA
from aria_jax.model.lora import merge_pairs
from aria_jax.model.quantize import dequantize_params, quantize_params
from aria_jax.quant import QuantSpec
from aria_jax.runtime import detect
from aria_jax.training import checkpoint as ckpt
from aria_jax.training import steps as S
from aria_jax.training.config import TrainConfig, load_config
from aria_jax.training.lora import init_lora, scale_lora, select_rules
from aria_jax.training.trainer import TIMING_KEYS

TINY = os.path.join(REPO, "configs", "tiny_cpu.yaml")
TARGETS = TrainConfig().lora_target_modules


def tiny_config() -> AriaConfig:
    return AriaConfig.from_dict(load_config(TINY).model_config)


def batch(config: AriaConfig, seed: int = 0) -> dict:
    """Two rows, each with one image (2 query tokens) and text; labels on the text after the image."""
    rng = np.random.default_rng(seed)
    image = config.image_token_id
    ids = np.array([[20, 21, image, image, *rng.integers(10, 60, 6)], [33, image, image, *rng.integers(10, 60, 7)]])
    labels = np.where(np.arange(ids.shape[1]) >= 4, ids, -100)
    side = config.vision.image_size
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32),
            "labels": jnp.asarray(labels), "pixel_values": jnp.asarray(rng.uniform(-1, 1, (2, 3, side, side)),
                                                                       jnp.float32),
            "pixel_mask": jnp.ones((2, side, side), bool)}


@pytest.fixture(scope="module")
def tiny_base() -> tuple[AriaConfig, dict]:
    """The tiny model's float params (stacked), initialised once."""
    config = tiny_config()
    return config, Aria.from_config(config, seed=0, dtype="float32", layout="stacked").params


def quantized_base(params: dict, fmt: str) -> dict:
    """``params`` quantized as the runtime holds them (int4 one value per byte on CPU)."""
    return quantize_params(params, QuantSpec(fmt), detect().int4_packed)


def random_b(lora: dict, seed: int = 1) -> dict:
    """B is zero at init: give it values so every pair carries a gradient into A."""
    flat = traverse_util.flatten_dict(lora)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return traverse_util.unflatten_dict({p: jax.random.normal(k, v.shape) * 0.1 if p[-1].endswith("_b") else v
                                         for (p, v), k in zip(sorted(flat.items()), keys, strict=True)})


@pytest.mark.parametrize("fmt,targets", [pytest.param("int8", TARGETS, id="int8-lm_head_pair", marks=pytest.mark.slow),
                                         pytest.param("int4", [t for t in TARGETS if t != "lm_head"],
                                                      id="int4-fused_lm_head")])
def test_objective_and_lora_gradients_over_a_quantized_base_equal_the_dequantized_base(tiny_base, fmt, targets):
    config, float_params = tiny_base
    quantized = quantized_base(float_params, fmt)
    dequantized = dequantize_params(quantized, config)
    rules = select_rules(targets, {"vit"}, config)
    lora = init_lora(quantized, rules, 4, jax.random.key(3), config)  # shapes from the schema: kernel is kernel_q
    same = init_lora(dequantized, rules, 4, jax.random.key(3))  # shapes from the float weights
    assert jax.tree.structure(lora) == jax.tree.structure(same)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(same), strict=True))
    assert "gate_up_a" in lora["language_model"]["layers"]["mlp"]  # the routed experts have pairs
    lora = random_b(lora)

    spec = S.LossSpec(config.text.moe_topk, 1e-4, 1e-5, 1, lora_scale=2.0)
    data, rng, denom = batch(config), jax.random.key(0), jnp.float32(12)

    def compiled(module):
        run = jax.jit(jax.value_and_grad(S.make_objective(module, spec), has_aux=True))
        return lambda params: (lambda out: (float(out[0][0]), out[1]))(run(lora, params, data, rng, denom))

    runtime = detect()
    q_value, q_grads = compiled(AriaModel(config, runtime=runtime.replace(quant=QuantSpec(fmt))))(quantized)
    float_run = compiled(AriaModel(config, runtime=runtime))
    (d_value, d_grads), (f_value, _) = float_run(dequantized), float_run(float_params)
    assert abs(q_value - d_value) <= 1e-5 * abs(d_value)
    for (path, g), ref in zip(traverse_util.flatten_dict(q_grads).items(),
                              traverse_util.flatten_dict(d_grads).values(), strict=True):
        assert np.abs(np.asarray(ref)).max() > 0, path
        assert rel_err(g, ref) <= 1e-5, (path, rel_err(g, ref))
    assert abs(q_value - f_value) > 1e-5 * abs(f_value)  # the base really is quantized: the check can fail


def test_merging_into_quantized_weights_is_refused(tiny_base):
    config, float_params = tiny_base
    quantized = quantized_base(float_params, "int8")
    lora = init_lora(quantized, select_rules(["q_proj"], {"vit"}, config), 2, jax.random.key(0), config)
    with pytest.raises(ValueError, match="quantized"):
        merge_pairs(quantized, lora, 1.0)


@pytest.mark.parametrize("args,message", [
    (["quantize_base=int4"], "config key 'quantize_base': trains LoRA over a frozen quantized base: set use_peft: true"),
    (["quantize_base=int3", "use_peft=true"], "config key 'quantize_base': must be one of int8, int4 or null"),
])
def test_bad_quantize_base_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert train_main(["--config", TINY, f"output_dir={out}", *args]) == 2
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


# End to end: LoRA over the float base and QLoRA int8 / int4, the same data, seed and steps.
STEPS = 12
RUN_ARGS = ["--config", TINY, "use_peft=true", f"max_steps={STEPS}", "save_steps=6", "save_total_limit=2",
            "report_to=none", "disable_tqdm=true", "log_level=warning"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    out = {}
    for name, extra in (("float", []), ("int8", ["quantize_base=int8"]), ("int4", ["quantize_base=int4"])):
        out[name] = root / name
        assert train_main([*RUN_ARGS, f"output_dir={out[name]}", *extra]) == 0, name
    return out


def deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_qlora_loss_tracks_lora_over_the_float_base(runs):
    losses = {name: [m["lm_loss"] for m in read_metrics(out)] for name, out in runs.items()}
    print({name: (round(v[0], 5), round(v[-1], 5)) for name, v in losses.items()})  # reported figures
    assert all(len(v) == STEPS for v in losses.values())
    assert losses["float"][-1] < losses["float"][0] - 0.05  # LoRA learns in these steps
    for fmt in ("int8", "int4"):
        assert losses[fmt] != losses["float"]  # a quantized base: not the same run
        assert abs(losses[fmt][-1] - losses["float"][-1]) <= 0.02 * losses["float"][-1], (fmt, losses)


def stored_arrays(checkpoints) -> dict[str, tuple[tuple[int, ...], str]]:
    manager = ckpt.open_manager(str(checkpoints), None, create=False)
    try:
        metadata = manager.item_metadata(max(manager.all_steps()))["state"]
    finally:
        manager.close()
    flat = jax.tree_util.tree_flatten_with_path(metadata)[0]
    return {"/".join(ckpt._key(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat
            if hasattr(leaf, "shape")}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_checkpoints_hold_the_adapter_and_no_base_weights(runs, fmt):
    stored = stored_arrays(runs[fmt] / "checkpoints")
    counters = {p for p in stored if p == "step" or p.endswith("/count")}
    pairs = {p for p in stored if p.rsplit("/", 1)[-1].endswith(("_a", "_b"))}
    assert set(stored) == counters | pairs, sorted(set(stored) - counters - pairs)  # no kernel, _q, _scale, norm...
    trained = {p[len("trainable/"):] for p in pairs if p.startswith("trainable/")}
    assert any(p.endswith("mlp/gate_up_a") for p in trained)
    # every array is a pair or one of its two AdamW moments: the bytes are three adapters and the counters
    adapter = sum(math.prod(stored[f"trainable/{p}"][0]) * 4 for p in trained)
    total = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in stored.values())
    assert total == 3 * adapter + sum(np.dtype(stored[p][1]).itemsize for p in counters)
    assert stored == stored_arrays(runs["float"] / "checkpoints")  # what a LoRA run over the float base stores


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(runs, tmp_path):
    resumed = tmp_path / "resumed"
    args = [*RUN_ARGS, f"output_dir={resumed}", "quantize_base=int4",
            f"resume_from_checkpoint={runs['int4'] / 'checkpoints' / '6'}"]
    assert train_main(args) == 0
    assert deterministic(read_metrics(resumed)) == deterministic(read_metrics(runs["int4"]))[6:]
    a = load_file(str(resumed / "export" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["int4"] / "export" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_merged_export_loads_in_transformers_with_the_quantized_base_plus_adapter_logits(runs, fmt):
    from transformers import AriaForConditionalGeneration

    config = tiny_config()
    adapter = load_adapter(runs[fmt] / "export" / "adapter", config)  # the PEFT adapter export works too
    assert "gate_up_a" in adapter.lora["language_model"]["layers"]["mlp"]
    quantized = Aria.from_config(config, seed=load_config(TINY).seed, dtype="float32", layout="stacked",
                                 quantize=fmt).params  # the run's base, quantized as the trainer did
    module = AriaModel(config, runtime=detect().replace(quant=QuantSpec(fmt)))
    data = batch(config, seed=5)
    inputs = [data[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")]
    variables = {"params": quantized, LORA: scale_lora(adapter.lora, adapter.scale)}
    ours = np.asarray(module.apply(variables, *inputs).logits)
    base = np.asarray(module.apply({"params": quantized}, *inputs).logits)

    model = AriaForConditionalGeneration.from_pretrained(runs[fmt] / "export" / "model", dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        theirs = model(**{k: torch.as_tensor(np.array(v)) for k, v in data.items() if k != "labels"}).logits.numpy()
    print(fmt, "export vs quantized base + adapter:", rel_err(theirs, ours), "adapter's effect:", rel_err(base, ours))
    assert rel_err(theirs, ours) <= 1e-4
    assert rel_err(base, ours) > 1e-3  # the trained adapter changes the logits: the comparison can fail
