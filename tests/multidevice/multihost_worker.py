"""One of two processes (4 CPU devices each) joined by jax.distributed: forward + one SGD step on a shared mesh.

Usage: multihost_worker.py CHECKPOINT_DIR OUT.npz   (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set)
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from mesh_fixtures import batch, loss_fn  # noqa: E402

from aria_jax import Aria  # noqa: E402
from aria_jax.parallel import distributed  # noqa: E402

directory, out_path = sys.argv[1], sys.argv[2]
assert distributed.initialize()
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
model = Aria.from_pretrained(directory, dtype="float32", mesh="data=2,expert=4")
b = batch()
rows = slice(jax.process_index(), jax.process_index() + 1)  # each process owns one of the two rows
inputs = [distributed.global_batch(model.mesh, b[k][rows]) for k in ("input_ids", "attention_mask")]
# The three images belong to the rows as (row 0: image 0; row 1: images 1, 2): replicate them (uneven split).
pixels = [distributed.global_batch(model.mesh, b[k], axes=()) for k in ("pixel_values", "pixel_mask")]
loss = loss_fn(model.module)


@jax.jit
def forward_and_step(params, ids, mask, pv, pm):
    logits = model.module.apply({"params": params}, ids, mask, pv, pm).logits
    value, grads = jax.value_and_grad(loss)(params, ids, mask, pv, pm)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return logits, value, loss(new, ids, mask, pv, pm)


logits, before, after = forward_and_step(model.params, *inputs, *pixels)
logits = multihost_utils.process_allgather(logits, tiled=True)
if jax.process_index() == 0:
    np.savez(out_path, logits=np.asarray(logits), before=np.asarray(before), after=np.asarray(after))
print("done", jax.process_index())
