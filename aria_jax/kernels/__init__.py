"""Kernels: how the model's heavy products run on each platform.

The routed experts' backends (``experts``: dense reference, gather, ragged_dot, blocked, split), the CPU grouped MLP
with its hand-written VJP (``grouped_mlp``), expert parallelism over a mesh (``expert_parallel``), single-row
matvecs (``matmul``) and activations with torch's numerics (``activations``). Which one runs is decided once, in
``aria_jax.runtime``; the kernels take that decision as an argument and never look at the platform themselves.
"""
