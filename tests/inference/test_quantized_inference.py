"""Aria.from_pretrained(path, quantize=...): the quantized model equals the float model run on its dequantized
weights (every expert backend, both layouts, float32 and bfloat16), greedy generation included, and stays close to
the float checkpoint (KL of the next-token distributions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aria_jax import Aria
from aria_jax.errors import InputError
from aria_jax.model.quantize import dequantize_params, is_quantized
from tests.conftest import rel_err


def reference(model: Aria, dtype=jnp.float32) -> Aria:
    """The float model holding the quantized model's dequantized weights (the dense expert backend)."""
    params = jax.tree.map(lambda a: a.astype(dtype), dequantize_params(model.stacked_params(), model.config, dtype))
    return Aria(model.config, params, dtype, "dense", model.processor, layout="stacked")


def token_ids(vocab: int, shape=(2, 11), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_every_backend_and_layout_equals_the_dequantized_float_model(checkpoint, fmt):
    path = checkpoint("mha")
    loaded = {layout: Aria.from_pretrained(path, dtype="float32", quantize=fmt, layout=layout)
              for layout in ("stacked", "unrolled")}
    assert all(is_quantized(m.stacked_params()) for m in loaded.values())
    ids = token_ids(loaded["stacked"].config.text.vocab_size)
    ref = reference(loaded["stacked"]).forward(ids)
    for layout, model in loaded.items():
        for backend in ("auto", "gather", "blocked", "ragged", "dense"):
            out = Aria(model.config, model.params, model.dtype, backend, layout=layout, runtime=model.runtime)
            assert rel_err(out.forward(ids), ref) <= 1e-5, (layout, backend)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_greedy_generation_equals_the_dequantized_float_model(checkpoint, fmt):
    model = Aria.from_pretrained(checkpoint("gqa"), dtype="float32", quantize=fmt)
    ids = token_ids(model.config.text.vocab_size, (1, 7), seed=3)
    ours = model.generate(input_ids=ids, max_new_tokens=12)
    ref = reference(model).generate(input_ids=ids, max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_bfloat16_quantized_model_keeps_float32_scales(checkpoint):
    """bfloat16 activations over int8 weights with float32 scales and accumulation: the next-token distribution is
    the float32 one on the same (dequantized) weights up to bfloat16 rounding (a max-error bound is no measure here:
    in bfloat16 a router's near tie can flip, quantized or not)."""
    model = Aria.from_pretrained(checkpoint("gqa"), dtype="bfloat16", quantize="int8")
    leaves = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(model.stacked_params())}
    assert {a.dtype for k, a in leaves.items() if k.endswith("_scale']")} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for k, a in leaves.items() if k.endswith("_q']")} == {jnp.dtype(jnp.int8)}
    assert leaves["['language_model']['embed_tokens']"].dtype == jnp.bfloat16
    ids = token_ids(model.config.text.vocab_size, (4, 24), seed=2)
    out = model.forward(ids)
    ref = reference(model, jnp.float32).forward(ids)
    kl, top1 = kl_top1(ref, out)
    assert out.dtype == jnp.bfloat16 and kl <= 1e-3 and top1 >= 0.9, (kl, top1)


def kl_top1(float_logits, quant_logits) -> tuple[float, float]:
    p = jax.nn.log_softmax(jnp.asarray(float_logits, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(quant_logits, jnp.float32), -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), -1)
    return float(kl.mean()), float((p.argmax(-1) == q.argmax(-1)).mean())


@pytest.mark.parametrize("fmt,bound", [("int8", 1e-3), ("int4", 3e-2)])
def test_next_token_distribution_stays_close_to_the_float_model(checkpoint, aria_model, fmt, bound):
    """On a tiny random model (the benchmark model's figures are in bench/README.md)."""
    float_model = aria_model("gqa")
    model = Aria.from_pretrained(checkpoint("gqa"), dtype="float32", quantize=fmt)
    ids = token_ids(model.config.text.vocab_size, (4, 24), seed=5)
    kl, top1 = kl_top1(float_model.forward(ids), model.forward(ids))
    assert kl <= bound and top1 >= 0.5, (kl, top1)
    assert kl > 0  # really quantized


def test_bad_quantize_value_is_one_clear_error(checkpoint):
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        Aria.from_pretrained(checkpoint("gqa"), quantize="int3")
