"""Aria as pure Flax Linen modules: no file IO, no platform checks.

``schema`` (every parameter's shape, logical axes and HF tensor), ``layers`` (parameters with logical axes, norms,
linear layers, LoRA hooks), ``attention`` and ``kv_cache``, ``moe`` (router, routed and shared experts),
``decoder`` (the text decoder), ``vision`` (the vision tower), ``projector``, and ``aria`` (the whole model and the
image-token merge).
"""
