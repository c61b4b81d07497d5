"""The stacked and unrolled parameter layouts: lossless both ways, and the same logits and tokens."""

import jax
import numpy as np
import pytest
from conftest import rel_err

from aria_jax import param_layout
from aria_jax.api import Aria, resolve_layout
from aria_jax.config import AriaConfig


@pytest.fixture(scope="module")
def pair():
    cfg = AriaConfig.preset("tiny")
    stacked = Aria.from_config(cfg, seed=3, dtype="float32", layout="stacked")
    unrolled = Aria.from_config(cfg, seed=3, dtype="float32", layout="unrolled")
    return cfg, stacked, unrolled


def test_roundtrip_is_exact(pair):
    cfg, stacked, unrolled = pair
    text = unrolled.run_params["language_model"]
    assert "layers" not in text and f"layers_{cfg.text.num_hidden_layers - 1}" in text
    assert f"gate_up_{cfg.text.moe_num_experts - 1}" in text["layers_0"]["mlp"]
    back = param_layout.stack(unrolled.run_params)
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
    # module + params stay the canonical (stacked) pair under either layout
    canonical, _, _ = unrolled.module.apply({"params": unrolled.params}, ids, mask)
    assert rel_err(canonical, a) <= 1e-5
    assert float(np.abs(np.asarray(a)).max()) > 0
    np.testing.assert_array_equal(
        unrolled.generate(ids, mask, max_new_tokens=8), stacked.generate(ids, mask, max_new_tokens=8)
    )


def test_layout_choice():
    assert resolve_layout("auto", None) == ("unrolled" if jax.default_backend() == "cpu" else "stacked")
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        resolve_layout("rows", None)
