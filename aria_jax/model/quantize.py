"""Whole parameter trees quantized and dequantized (formats: aria_jax.quant), one weight at a time on the host.

``quantize_params`` turns a float stacked tree into the quantized one ``AriaModel`` declares under
``Runtime(quant=...)``; ``dequantize_params`` is its inverse up to rounding (the float tree of the same model, for
export and for the dense reference). Weights move to the host one at a time and the quantized pair goes back to the
leaf's device, so a device never holds more than one extra float weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.config import AriaConfig
from aria_jax.model.schema import param_specs
from aria_jax.quant import QuantSpec, dequantize, quantize, quantized_weight, weight_axes


def _items(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _items(value, path + "/")
        else:
            yield path, value


def _set(tree: dict, path: str, value) -> None:
    *parents, name = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[name] = value


def _place(value: np.ndarray, like) -> jax.Array:
    device = next(iter(like.devices())) if isinstance(like, jax.Array) and len(like.devices()) == 1 else None
    return jax.device_put(value, device)


def quantize_params(params: dict, spec: QuantSpec, packed: bool = True) -> dict:
    """A float stacked params tree -> the same tree with every weight ``spec`` covers as its ``_q``/``_scale``
    pair. The input tree is not modified; its float weights can be dropped afterwards."""
    out: dict = {}
    for path, leaf in _items(params):
        rule = quantized_weight(path, spec)
        if rule is None:
            _set(out, path, leaf)
            continue
        q, scale = quantize(np.asarray(jax.device_get(leaf), np.float32), *rule, spec, packed)
        _set(out, path + "_q", _place(q, leaf))
        _set(out, path + "_scale", _place(scale, leaf))
    return out


def dequantize_params(params: dict, cfg: AriaConfig, dtype: jnp.dtype = jnp.float32) -> dict:
    """A quantized stacked params tree -> the float tree of the same model (weights = values x scales)."""
    specs = param_specs(cfg)
    leaves = dict(_items(params))
    out: dict = {}
    for path, leaf in leaves.items():
        if path.endswith("_scale") and path[: -len("_scale")] + "_q" in leaves:
            continue
        if path.endswith("_q") and path[: -len("_q")] in specs:
            base = path[: -len("_q")]
            w = dequantize(np.asarray(jax.device_get(leaf)), np.asarray(jax.device_get(leaves[base + "_scale"])),
                           specs[base][0], *weight_axes(base))
            _set(out, base, _place(w.astype(np.dtype(dtype)), leaf))
        else:
            _set(out, path, leaf)
    return out


def is_quantized(params: dict) -> bool:
    """Whether a params tree holds quantized weights."""
    return any(path.endswith("_q") for path, _ in _items(params))
