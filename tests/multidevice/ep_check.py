"""Run with 8 CPU devices: expert-parallel MoE equals the single-device reference (values and gradients)."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from aria_jax.kernels.expert_parallel import experts_expert_parallel  # noqa: E402
from aria_jax.kernels.experts import EXPERT_BACKENDS  # noqa: E402

assert jax.device_count() == 8
rng = np.random.default_rng(0)
t, e, d, f, k = 48, 8, 16, 8, 3
x = rng.standard_normal((t, d)).astype(np.float32)
gate_up = rng.standard_normal((e, d, 2 * f)).astype(np.float32)
down = rng.standard_normal((e, f, d)).astype(np.float32)
ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
ids[:20, 0] = 5  # a busy expert
weights = rng.uniform(size=(t, k)).astype(np.float32)


def loss_fn(run):
    return lambda x, w, gu, dn: (run(x, w, gu, dn) ** 2).sum()


ref_run = lambda x, w, gu, dn: EXPERT_BACKENDS["dense"](x, w, ids, gu, dn)  # noqa: E731
ref = np.asarray(ref_run(x, weights, gate_up, down))
ref_grads = jax.grad(loss_fn(ref_run), argnums=(0, 1, 2, 3))(x, weights, gate_up, down)
worst = 0.0
for shape in ({"expert": 8}, {"data": 2, "expert": 4}, {"expert": 4, "tensor": 2}, {"data": 4, "expert": 2}):
    mesh = Mesh(np.array(jax.devices()).reshape(tuple(shape.values())), tuple(shape))
    for schedule in ("replicated", "all_to_all"):
        for backend in ("blocked", "ragged"):
            def run(x, w, gu, dn, mesh=mesh, schedule=schedule, backend=backend):
                return experts_expert_parallel(x, w, ids, gu, dn, mesh=mesh, backend=EXPERT_BACKENDS[backend],
                                               schedule=schedule)
            out = np.asarray(jax.jit(run)(x, weights, gate_up, down))
            err = np.abs(out - ref).max() / np.abs(ref).max()
            grads = jax.jit(jax.grad(loss_fn(run), argnums=(0, 1, 2, 3)))(x, weights, gate_up, down)
            gerr = max(float(np.abs(np.asarray(g) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
                       for g, r in zip(grads, ref_grads, strict=True))
            assert err <= 1e-5 and gerr <= 1e-5, (shape, schedule, backend, err, gerr)
            worst = max(worst, err, gerr)
# A capacity factor small enough to overflow drops pairs: results then differ (the dropless default does not).
mesh = Mesh(np.array(jax.devices()).reshape(8), ("expert",))
dropped = experts_expert_parallel(x, weights, ids, gate_up, down, mesh=mesh, backend=EXPERT_BACKENDS["blocked"],
                                  schedule="all_to_all", capacity_factor=0.5)
assert np.abs(np.asarray(dropped) - ref).max() / np.abs(ref).max() > 1e-2
print(f"OK worst relative error {worst:.2e}")
