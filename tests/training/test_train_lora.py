"""LoRA: adapters through the model (per-expert pairs through the grouped matmul) equal the merged weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import traverse_util
from hf_models import image_batch

from aria_jax.model.aria import AriaModel
from aria_jax.model.layers import LORA
from aria_jax.training.lora import RULES, init_lora, merge_lora, scale_lora


def _random_lora(params, rank=4, seed=0):
    lora = init_lora(params, list(RULES), rank, jax.random.key(seed))
    flat = traverse_util.flatten_dict(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    # B is zero at init; give it values so every pair changes the output.
    flat = {p: (jax.random.normal(k, v.shape) * 0.5 if p[-1].endswith("_b") else v) for (p, v), k in
            zip(sorted(flat.items()), keys, strict=True)}
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("backend", ["ragged", "blocked"])
def test_lora_unmerged_equals_merged(aria_model, backend):
    model = aria_model("gqa")
    batch = {k: jnp.asarray(v) for k, v in image_batch("gqa", np.random.default_rng(7)).items()}
    lora = _random_lora(model.stacked_params())
    shapes = {"/".join(p): v.shape for p, v in traverse_util.flatten_dict(lora).items()}
    e, d, f = model.config.text.moe_num_experts, model.config.text.hidden_size, model.config.text.intermediate_size
    assert shapes["language_model/layers/mlp/gate_up_a"] == (2, e, d, 4)  # (L, E, in, r)
    assert shapes["language_model/layers/mlp/gate_up_b"] == (2, e, 4, 2 * f)  # (L, E, r, out)
    scale = 2.0
    module = AriaModel(model.config, moe_backend=backend)  # the expert LoRA branch: per-expert A, B in the grouped op
    run = jax.jit(lambda v: module.apply(v, **batch)[0])
    unmerged = np.asarray(run({"params": model.stacked_params(), LORA: scale_lora(lora, scale)}))
    merged = np.asarray(run({"params": merge_lora(model.stacked_params(), lora, scale)}))
    base = np.asarray(run({"params": model.stacked_params()}))
    valid = np.asarray(batch["attention_mask"]).astype(bool)
    assert rel_err(unmerged[valid], merged[valid]) <= 1e-5
    assert rel_err(base[valid], merged[valid]) > 1e-2  # the adapters really change the logits


@pytest.mark.slow
def test_lora_dropout_only_with_a_dropout_rng(aria_model):
    from aria_jax.model.layers import lora_dropout

    model = aria_model("gqa")
    ids = jnp.asarray(np.random.default_rng(0).integers(10, 100, (2, 9)))
    lora = scale_lora(_random_lora(model.stacked_params()), 2.0)
    module = AriaModel(model.config, moe_backend="ragged")
    variables = {"params": model.stacked_params(), LORA: lora}
    with lora_dropout(0.5):
        plain = module.apply(variables, ids)[0]
        a = module.apply(variables, ids, rngs={"dropout": jax.random.key(1)})[0]
        b = module.apply(variables, ids, rngs={"dropout": jax.random.key(1)})[0]
        c = module.apply(variables, ids, rngs={"dropout": jax.random.key(2)})[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(plain))
