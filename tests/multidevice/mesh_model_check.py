"""8 CPU devices: logits, greedy tokens and gradients on several meshes equal one device and transformers.

Usage: mesh_model_check.py [MESH ...] (default: the four below)."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mesh_fixtures import batch, loss_fn, make_checkpoint, rel  # noqa: E402

from aria_jax import Aria  # noqa: E402

assert jax.device_count() == 8
directory = tempfile.mkdtemp()
hf = make_checkpoint(directory)
b = batch()
valid = b["attention_mask"].astype(bool)
with torch.no_grad():
    hf_logits = hf(**{k: torch.as_tensor(v) for k, v in b.items()}).logits.numpy()

single = Aria.from_pretrained(directory, dtype="float32", layout="stacked")  # the mesh models' layout
ref_logits = np.asarray(single.forward(**b))
ref_tokens = single.generate(**b, max_new_tokens=8)
grad = jax.jit(jax.grad(loss_fn(single.module)))
ref_grads = grad(single.params, *(b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")))
assert rel(ref_logits[valid], hf_logits[valid]) <= 1e-4

for spec in sys.argv[1:] or ("expert=8", "data=2,expert=4", "expert=4,tensor=2", "data=8"):
    model = Aria.from_pretrained(directory, dtype="float32", mesh=spec)
    gate_up = model.params["language_model"]["layers"]["mlp"]["gate_up"]
    assert len(gate_up.sharding.device_set) == 8 if "expert" in spec else True
    logits = np.asarray(model.forward(**b))
    tokens = model.generate(**b, max_new_tokens=8)
    grads = jax.jit(jax.grad(loss_fn(model.module)))(
        model.params, *(b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask"))
    )
    e_mesh = rel(logits[valid], ref_logits[valid])
    e_hf = rel(logits[valid], hf_logits[valid])
    # Per leaf, relative to its own largest gradient, floored at 1e-3 of the largest anywhere: the attention key
    # biases have analytically zero gradients (softmax ignores a per-query constant): their scale is noise.
    scale = max(float(np.abs(np.asarray(r)).max()) for r in jax.tree.leaves(ref_grads))
    e_grad = max(
        float(np.abs(np.asarray(g) - np.asarray(r)).max()) / max(float(np.abs(np.asarray(r)).max()), 1e-3 * scale)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
    )
    print(f"{spec}: logits vs 1 device {e_mesh:.1e}, vs transformers {e_hf:.1e}, grads {e_grad:.1e}")
    assert e_mesh <= 1e-5 and e_hf <= 1e-4 and e_grad <= 1e-5, spec
    np.testing.assert_array_equal(tokens, ref_tokens)
print("OK")
