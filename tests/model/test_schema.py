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
