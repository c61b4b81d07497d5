"""One of two processes (4 CPU devices each) joined by jax.distributed: Aria.forward / generate on a shared mesh.

Usage: multihost_generate.py CHECKPOINT_DIR OUT_PREFIX   (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
set); writes OUT_PREFIX{process}.npz.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from mesh_fixtures import batch  # noqa: E402

from aria_jax import Aria  # noqa: E402
from aria_jax.parallel import distributed  # noqa: E402

directory, prefix = sys.argv[1], sys.argv[2]
assert distributed.initialize()
assert jax.process_count() == 2 and jax.device_count() == 8
model = Aria.from_pretrained(directory, dtype="float32", mesh="data=2,expert=4")
b = batch()
args = [b[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")]  # the same on both processes
out = {}
out["logits"] = np.asarray(model.forward(*args))
out["greedy"] = model.generate(*args, max_new_tokens=8)
# Global arrays as inputs: each process passes only its own row; the images replicated.
rows = slice(jax.process_index(), jax.process_index() + 1)
glob = [distributed.global_batch(model.mesh, a[rows]) for a in args[:2]]
glob += [distributed.global_batch(model.mesh, a, axes=()) for a in args[2:]]
out["greedy_global"] = model.generate(*glob, max_new_tokens=8)
out["stream"] = np.stack(list(model.generate_stream(*args, max_new_tokens=8)), axis=1)
plan = model._plan(*args, max_new_tokens=8)  # the host-checked loop (as stop strings): rows stop after 3 tokens
out["stopped"] = model._decoder.run(**{**plan, "stop_check": lambda row: len(row) >= 3})[0]
np.savez(f"{prefix}{jax.process_index()}.npz", **out)
print("done", jax.process_index())
