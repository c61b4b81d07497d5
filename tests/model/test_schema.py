"""The static parameter table equals what the traced model declares (shapes, dtypes and logical axes)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from conftest import traced_params

from aria_jax.config import AriaConfig
from aria_jax.model.schema import declared_params


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}


def _variants():
    tiny = AriaConfig.preset("tiny")
    yield "tiny", tiny
    yield "gqa", dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_key_value_heads=1, head_dim=24))
    yield "no vision layers used", dataclasses.replace(tiny, vision_feature_layer=0)
    yield "one vision layer used", dataclasses.replace(tiny, vision_feature_layer=-2)
    yield "aria", AriaConfig.preset("aria")


@pytest.mark.parametrize("name,cfg", list(_variants()), ids=[n for n, _ in _variants()])
def test_table_equals_the_traced_model(name, cfg):
    shapes, logical = declared_params(cfg, jnp.bfloat16)
    want_shapes, want_logical = traced_params(cfg, jnp.bfloat16)
    got, want = _flat(shapes), _flat(want_shapes)
    assert sorted(got) == sorted(want)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert {k: tuple(v) for k, v in _flat(logical).items()} == {k: tuple(v) for k, v in _flat(want_logical).items()}


@pytest.mark.parametrize("fmt,packed,lm_head", [("int8", True, True), ("int4", True, False), ("int4", False, True)])
@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_quantized_table_equals_the_traced_model(fmt, packed, lm_head, layout):
    """With Runtime(quant=...) the model declares each covered weight as its _q/_scale pair, as the table says
    (the unrolled layout: one pair per expert, as aria_jax.parallel.layout converts the stacked table)."""
    import flax.linen as nn

    from aria_jax.model.aria import AriaModel, example_inputs
    from aria_jax.parallel.layout import to_layout
    from aria_jax.quant import QuantSpec
    from aria_jax.runtime import Runtime

    cfg = AriaConfig.preset("tiny")
    spec = QuantSpec(fmt, lm_head=lm_head)
    runtime = Runtime(quant=spec, int4_packed=packed)
    model = AriaModel(cfg, dtype=jnp.bfloat16, moe_backend="dense", layout=layout, runtime=runtime)
    boxed = jax.eval_shape(model.init, jax.random.key(0), **example_inputs(cfg))["params"]
    shapes, logical = declared_params(cfg, jnp.bfloat16, spec, packed)
    got = _flat(jax.eval_shape(lambda t: to_layout(t, layout), shapes))
    want = _flat(nn.unbox(boxed))
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert any(k.endswith("gate_up_q']") or "gate_up_q_0" in k for k in got)
    assert ("['lm_head']['kernel_q']" in "".join(got)) == lm_head
    if layout == "stacked":
        want_logical = _flat(nn.get_partition_spec(boxed))
        assert {k: tuple(v) for k, v in _flat(logical).items()} == {k: tuple(v) for k, v in want_logical.items()}
