"""Aria's mixture of experts: top-k router, dropless routed experts, shared experts (aria-spec.md §4.3).

The routed experts run through ``aria_jax.kernels.experts.run_experts``, which picks the kernel from the backend
asked for, the platform's choice (``Runtime.experts``), the weights' layout and the mesh. With ``split_experts``
(the ``unrolled`` parameter layout) every expert's weights are their own arrays (``gate_up_{e}``, ``down_{e}``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from aria_jax.config import AriaTextConfig
from aria_jax.kernels.activations import silu, softmax
from aria_jax.kernels.experts import MOE_BACKENDS, ExpertLora, ExpertWeights, run_experts
from aria_jax.model.layers import Linear, lora_input, lora_pair, param, weight
from aria_jax.quant import Holding
from aria_jax.runtime import Runtime


def route(x: jax.Array, router_kernel: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k on the raw router logits, then softmax over the k selected logits only.

    Returns (logits (T, E), weights (T, k), expert ids (T, k)).
    """
    logits = jnp.einsum("td,de->te", x, router_kernel)
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    return logits, softmax(top_logits), top_ids


class SharedExperts(nn.Module):
    """The ``moe_num_shared_experts`` shared experts, folded into one SwiGLU MLP of width I * n_shared."""

    config: AriaTextConfig
    dtype: jnp.dtype = jnp.float32
    matvec_split: int = 1
    quant: Holding | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, d = self.config.shared_intermediate_size, self.config.hidden_size
        linear = lambda n, axes, name: Linear(n, axes, False, self.dtype, self.matvec_split, self.quant,  # noqa: E731
                                              name=name)
        gate = linear(f, ("embed", "mlp"), "gate_proj")(x)
        up = linear(f, ("embed", "mlp"), "up_proj")(x)
        return linear(d, ("mlp", "embed"), "down_proj")(silu(gate) * up)


class MoE(nn.Module):
    """(B, T, D) -> (B, T, D): routed experts + shared experts, no capacity limit and no dropped tokens.

    With a ``mesh`` whose ``expert`` axis has more than one device, the routed experts run expert-parallel
    (aria_jax.kernels.expert_parallel) with ``ep_schedule``.
    """

    config: AriaTextConfig
    backend: str = "auto"
    dtype: jnp.dtype = jnp.float32
    mesh: Mesh | None = None
    ep_schedule: str = "auto"
    split_experts: bool = False  # one array per expert: the unrolled parameter layout
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the layer output and the router logits (B*T, E) for the auxiliary losses."""
        cfg = self.config
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"unknown MoE backend '{self.backend}'; choose one of {', '.join(MOE_BACKENDS)}")
        e, d = cfg.moe_num_experts, cfg.hidden_size
        router = param(self, "router_kernel", (d, e), ("embed", "expert_router"), self.dtype)
        tokens = x.reshape(-1, d)
        logits, weights, ids = route(tokens, router, cfg.moe_topk)
        routed = run_experts(tokens, weights, ids, self.expert_weights(), self.backend, self.runtime.experts,
                             self.mesh, self.ep_schedule, self.runtime.matvec_split)
        shared = SharedExperts(cfg, self.dtype, self.runtime.matvec_split, self.runtime.holding(),
                               name="shared_experts")(x)
        return routed.reshape(x.shape) + shared, logits

    def expert_weights(self) -> ExpertWeights:
        """This layer's routed expert weights in its layout, with their LoRA pairs."""
        e, d, f = self.config.moe_num_experts, self.config.hidden_size, self.config.intermediate_size
        qt = self.runtime.holding()
        if self.split_experts:
            gate_up = tuple(weight(self, "gate_up", (d, 2 * f), ("expert_embed", "expert_mlp"), self.dtype, qt,
                                   suffix=f"_{i}") for i in range(e))
            down = tuple(weight(self, "down", (f, d), ("expert_mlp", "expert_embed"), self.dtype, qt,
                                suffix=f"_{i}") for i in range(e))
            return ExpertWeights(gate_up, down)
        gate_up = weight(self, "gate_up", (e, d, 2 * f), ("expert", "expert_embed", "expert_mlp"), self.dtype, qt,
                         lead=1)
        down = weight(self, "down", (e, f, d), ("expert", "expert_mlp", "expert_embed"), self.dtype, qt, lead=1)
        pairs = lora_pair(self, "gate_up"), lora_pair(self, "down")
        lora = None if pairs == (None, None) else ExpertLora(*pairs, lambda v: lora_input(self, v))
        return ExpertWeights(gate_up, down, lora)
