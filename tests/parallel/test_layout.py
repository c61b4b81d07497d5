"""The stacked and unrolled parameter layouts: lossless both ways, and the same logits and tokens."""

import jax
import numpy as np
import pytest
from conftest import rel_err

from aria_jax.config import AriaConfig
from aria_jax.inference.api import Aria, resolve_layout
from aria_jax.parallel import layout as param_layout
from aria_jax.runtime import Runtime


@pytest.fixture(scope="module")
def pair():
    cfg = AriaConfig.preset("tiny")
    stacked = Aria.from_config(cfg, seed=3, dtype="float32", layout="stacked")
    unrolled = Aria.from_config(cfg, seed=3, dtype="float32", layout="unrolled")
    return cfg, stacked, unrolled


def test_roundtrip_is_exact(pair):
    cfg, stacked, unrolled = pair
    text = unrolled.params["language_model"]
    assert "layers" not in text and f"layers_{cfg.text.num_hidden_layers - 1}" in text
    assert f"gate_up_{cfg.text.moe_num_experts - 1}" in text["layers_0"]["mlp"]
    back = param_layout.stack(unrolled.params)
    assert jax.tree.structure(back) == jax.tree.structure(stacked.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert param_layout.unroll(stacked.params)["language_model"]["layers_1"]["mlp"]["down_2"].shape == (
        cfg.text.intermediate_size, cfg.text.hidden_size)


def test_same_logits_and_tokens(pair):
    cfg, stacked, unrolled = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(10, cfg.text.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    a, b = stacked.forward(ids, mask), unrolled.forward(ids, mask)
    assert rel_err(b, a) <= 1e-5
    # module + params are one pair in the model's layout; stacked_params() is the canonical tree, read in any
    canonical = stacked.module.apply({"params": unrolled.stacked_params()}, ids, mask).logits
    assert rel_err(canonical, a) <= 1e-5
    assert param_layout.layout_of(unrolled.params) == "unrolled" and param_layout.layout_of(stacked.params) == "stacked"
    assert float(np.abs(np.asarray(a)).max()) > 0
    np.testing.assert_array_equal(
        unrolled.generate(ids, mask, max_new_tokens=8), stacked.generate(ids, mask, max_new_tokens=8)
    )


def test_layout_choice():
    cpu, accelerator = Runtime("cpu", layout="unrolled"), Runtime("gpu")
    assert resolve_layout("auto", None, cpu) == "unrolled" and resolve_layout("auto", None, accelerator) == "stacked"
    assert resolve_layout("stacked", None, cpu) == "stacked"
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        resolve_layout("rows", None, cpu)


def test_layerwise_layout_roundtrips_and_gives_the_same_loss_and_gradients(pair):
    """unroll_layers / stack_layers (the CPU training layout: per-layer trees, experts still stacked) are exact
    inverses, also inside an optimizer state, and the per-layer model's loss and gradients equal the scanned one's."""
    import jax.numpy as jnp
    import optax

    from aria_jax.model.aria import AriaModel

    cfg, stacked, _ = pair
    per_layer = param_layout.unroll_layers(stacked.params)
    text = per_layer["language_model"]
    assert "layers" not in text and text["layers_0"]["mlp"]["gate_up"].shape[0] == cfg.text.moe_num_experts
    back = param_layout.stack_layers(per_layer)
    assert jax.tree.structure(back) == jax.tree.structure(stacked.params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    opt_state = optax.adam(1e-3).init(stacked.params)
    moved = param_layout.map_param_trees(param_layout.unroll_layers, opt_state)
    assert "layers_1" in moved[0].mu["language_model"] and int(moved[0].count) == 0
    restored = param_layout.map_param_trees(param_layout.stack_layers, moved)
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(10, cfg.text.vocab_size, (2, 12)))
    mask = jnp.ones_like(ids).at[1, :4].set(0)

    def loss(model, params):
        logits = model.apply({"params": params}, ids, mask)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) * mask)

    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(AriaModel(cfg), p))(stacked.params)
    got_loss, got_grads = jax.value_and_grad(
        lambda p: loss(AriaModel(cfg, layout="per_layer"), p))(per_layer)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    got_grads = param_layout.stack_layers(got_grads)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        b = np.asarray(b)  # vision and projector gradients are zero (no image): compare against the largest entry
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1e-30))


def test_to_layout_goes_between_every_pair(pair):
    """to_layout / to_stacked / layout_of: every layout to every other, exactly."""
    _, stacked, _ = pair
    for src in ("stacked", "per_layer", "unrolled"):
        tree = param_layout.to_layout(stacked.params, src)
        assert param_layout.layout_of(tree) == src
        for dst in ("stacked", "per_layer", "unrolled"):
            back = param_layout.to_stacked(param_layout.to_layout(tree, dst))
            for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked.params), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
