"""The compiled decode loop of a quantized model reads the quantized bytes: XLA must neither hoist a weight's
dequantization out of the loop (a float copy of every weight carried through it) nor dequantize a weight into a
float buffer inside it (both happened before kernels/quantized.py kept the dequantization inside its matmul)."""

import re

import jax
import numpy as np
import pytest

from aria_jax import Aria

FLOAT = re.compile(r"\b(?:bf16|f16|f32)\[([\d,]*)\]")


def decode_loop_hlo(model: Aria, batch: int) -> str:
    """The optimized HLO of the decode loop ``model.generate`` runs (captured from its first call)."""
    decoder = model._decoder
    loop, captured = decoder._loop, []

    def spy(*args, **kwargs):
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a, args)
        captured.append((abstract, kwargs))
        return loop(*args, **kwargs)

    decoder._loop = spy
    try:
        ids = np.random.default_rng(0).integers(3, model.config.text.vocab_size, (batch, 7))
        model.generate(ids, np.ones_like(ids), max_new_tokens=4, min_new_tokens=4)
    finally:
        decoder._loop = loop
    (args, kwargs), = captured
    return loop.lower(*args, **kwargs).compile().as_text()


def elements(dims: str) -> int:
    return int(np.prod([int(v) for v in dims.split(",")])) if dims else 1


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_decode_loop_holds_no_float_copy_of_a_quantized_weight(checkpoint, fmt, batch):
    model = Aria.from_pretrained(checkpoint("mha"), dtype="float32", quantize=fmt)
    assert model.layout == model.runtime.quant_layout
    params = jax.tree_util.tree_leaves_with_path(model.params)
    quantized = {tuple(sorted(d for d in leaf.shape[-2:])) for path, leaf in params
                 if jax.tree_util.keystr(path).endswith("_q']")}
    quantized = {(n, k * (2 if fmt == "int4" and model.runtime.int4_packed else 1)) for n, k in quantized}
    float_params = sum(leaf.size for _, leaf in params if np.issubdtype(leaf.dtype, np.floating))
    hlo = decode_loop_hlo(model, batch)

    # (a) the while loop carries no more float elements than the float parameters and the decode state hold
    (outer,) = [line for line in hlo.splitlines() if ' while(' in line and 'op_name="jit(_loop_impl)/while"' in line]
    while_shape = outer.split(" = (", 1)[1].split(") while(", 1)[0]
    carried = sum(elements(d) for d in FLOAT.findall(while_shape))
    state_floats = carried - float_params
    cache = 2 * model.config.text.num_hidden_layers * batch * model.config.text.num_key_value_heads * (
        model.config.text.head_dim) * 64  # a generous bound on the float KV cache and logits of this tiny run
    assert state_floats <= cache, f"{state_floats} float elements carried beyond the parameters"

    # (b) no computed (non-fusion-internal) float array has a quantized weight's (N, K) shape
    inside_fusion, copies = False, []
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")):
            inside_fusion = bool(re.match(r"%(fused|wrapped|[\w.-]*fusion|[\w.-]*computation)", line))
            continue
        if inside_fusion or "get-tuple-element" in line or "parameter(" in line:
            continue
        head = line.split("=", 2)[1] if line.count("=") >= 2 else ""
        for dims in FLOAT.findall(head.split("(")[0] if head.strip().startswith(("f", "b")) else ""):
            shape = tuple(sorted(int(v) for v in dims.split(",") if v and int(v) != 1))
            if shape in quantized:
                copies.append(line.strip()[:160])
    assert not copies, copies
