"""Weight-only quantization formats: which weights are quantized, how they are stored, and the host-side math.

- ``int8``: symmetric, one float32 scale per output channel (``scale = max|w| / 127`` over the input channels).
- ``int4``: symmetric, one float32 scale per output channel and group of ``group`` (128) input channels
  (``scale = max|w| / 7``, values in [-8, 7]), stored two per byte.

A quantized weight ``name`` of logical shape ``(*lead, *in, *out)`` (lead: the layer and expert axes; in: the axes a
matmul contracts) is two parameters: ``{name}_q`` of shape ``(*lead, N, K)`` (int8; output channel major, so one
output channel's bytes are contiguous, as torch stores them) or ``(*lead, N, K/2)`` (uint8: two int4 values per
byte, packed), with N = prod(out), K = prod(in); and ``{name}_scale``, float32 ``(*lead, N)`` (int8) or
``(*lead, N, K/group)`` (int4). Packing: in every group of ``group`` input channels, byte j holds value j in its low
nibble and value j + group/2 in its high nibble (two's complement nibbles). On CPU the runtime holds int4 values one
per byte (``Runtime.int4_packed`` False: XLA:CPU unpacks nibbles several times slower than it reads int8), everywhere
else packed; on disk int4 is always packed.

Norms, the router, the embeddings and biases stay in the compute dtype. ``lm_head`` is quantized unless
``QuantSpec.lm_head`` is False; the vision tower and projector stay in the compute dtype.

This module is numpy only (conversion and loading run it on the host, one tensor at a time); the matmuls on
quantized weights are in ``aria_jax.kernels.quantized``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from aria_jax.errors import InputError

FORMATS = ("int8", "int4")
DEFAULT_GROUP = 128
QMAX = {"int8": 127, "int4": 7}

# Text-decoder weights that are quantized: (path suffix, leading non-contracted axes, contracted axes). Paths are
# those of the stacked layout without the leading "language_model/layers/" (which adds one leading axis).
LAYER_WEIGHTS = {
    "self_attn/q_kernel": (0, 1),
    "self_attn/k_kernel": (0, 1),
    "self_attn/v_kernel": (0, 1),
    "self_attn/o_kernel": (0, 2),
    "mlp/gate_up": (1, 1),
    "mlp/down": (1, 1),
    "mlp/shared_experts/gate_proj/kernel": (0, 1),
    "mlp/shared_experts/up_proj/kernel": (0, 1),
    "mlp/shared_experts/down_proj/kernel": (0, 1),
}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A quantization format and the weights it covers."""

    format: str
    group: int = DEFAULT_GROUP
    lm_head: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise InputError(f"unknown quantization '{self.format}'; choose one of {', '.join(FORMATS)}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 2 or self.group % 2:
            raise InputError(f"quantization group must be an even integer >= 2, got {self.group!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> QuantSpec:
        return cls(str(data["format"]), int(data.get("group", DEFAULT_GROUP)), bool(data.get("lm_head", True)))


@dataclasses.dataclass(frozen=True)
class Holding:
    """How a model holds and multiplies its quantized weights (``Runtime.holding()``)."""

    spec: QuantSpec
    packed: bool = True  # int4 two per byte in memory
    fused_rows: int = 0  # aria_jax.kernels.quantized: rows up to this take the fused forms


def parse(value: str | QuantSpec | None) -> QuantSpec | None:
    """``"int8"`` / ``"int4"`` / ``"none"`` / None / a QuantSpec -> QuantSpec or None; ValueError naming the value."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if value in ("none", ""):
        return None
    return QuantSpec(str(value))


def group_size(k: int, group: int) -> int:
    """The group along K actually used: ``group`` when it divides K, else the largest even divisor of K below it."""
    if k % group == 0:
        return group
    for g in range(min(group, k), 1, -1):
        if k % g == 0 and g % 2 == 0:
            return g
    raise ValueError(f"cannot group {k} input channels for int4 (an even group size must divide it)")


def weight_axes(path: str) -> tuple[int, int] | None:
    """(leading axes, contracted axes) of the parameter at ``path`` (stacked layout, "/"-joined, from the params
    root) when it is a weight quantization can cover, else None."""
    if path == "language_model/lm_head/kernel":
        return 0, 1
    prefix = "language_model/layers/"
    if path.startswith(prefix) and path[len(prefix):] in LAYER_WEIGHTS:
        lead, n_in = LAYER_WEIGHTS[path[len(prefix):]]
        return lead + 1, n_in
    return None


def quantized_weight(path: str, spec: QuantSpec | None) -> tuple[int, int] | None:
    """``weight_axes(path)`` when ``spec`` quantizes that weight (``lm_head`` only with ``spec.lm_head``)."""
    if spec is None or (path == "language_model/lm_head/kernel" and not spec.lm_head):
        return None
    return weight_axes(path)


def stored_shapes(shape: tuple[int, ...], lead: int, n_in: int, spec: QuantSpec, packed: bool = True
                  ) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
    """(``_q`` shape, ``_scale`` shape, ``_q`` dtype) of a weight of logical ``shape``."""
    k = math.prod(shape[lead : lead + n_in])
    n = math.prod(shape[lead + n_in :])
    head = tuple(shape[:lead])
    if spec.format == "int8":
        return (*head, n, k), (*head, n), np.dtype(np.int8)
    g = group_size(k, spec.group)
    if packed:
        return (*head, n, k // 2), (*head, n, k // g), np.dtype(np.uint8)
    return (*head, n, k), (*head, n, k // g), np.dtype(np.int8)


def stored_axes(axes: tuple[str | None, ...], lead: int, n_in: int, spec: QuantSpec
                ) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of ``_q`` and ``_scale``: the leading axes, then the first output axis' name for N and the first
    input axis' name for K (a flattened axis is sharded as its first axis would be)."""
    head = tuple(axes[:lead])
    n_name, k_name = axes[lead + n_in], axes[lead]
    scale = (*head, n_name) if spec.format == "int8" else (*head, n_name, None)
    return (*head, n_name, k_name), scale


def quantize(w: np.ndarray, lead: int, n_in: int, spec: QuantSpec, packed: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
    """A weight of logical shape ``(*lead, *in, *out)`` -> (``_q``, ``_scale``) as ``stored_shapes`` describes."""
    w = np.asarray(w, dtype=np.float32)
    head = w.shape[:lead]
    k = math.prod(w.shape[lead : lead + n_in])
    n = math.prod(w.shape[lead + n_in :])
    wt = np.swapaxes(w.reshape(*head, k, n), -1, -2)  # (*head, N, K)
    qmax = QMAX[spec.format]
    g = k if spec.format == "int8" else group_size(k, spec.group)
    blocks = wt.reshape(*head, n, k // g, g)
    amax = np.max(np.abs(blocks), axis=-1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax - 1, qmax).astype(np.int8).reshape(*head, n, k)
    if spec.format == "int8":
        return q, scale[..., 0]
    return (pack_int4(q, g) if packed else q), scale


def pack_int4(q: np.ndarray, group: int) -> np.ndarray:
    """int8 values in [-8, 7] (..., K) -> uint8 (..., K/2): per group, value j low nibble, j + group/2 high."""
    *head, k = q.shape
    g = q.reshape(*head, k // group, 2, group // 2).astype(np.uint8)
    return ((g[..., 0, :] & 0x0F) | ((g[..., 1, :] & 0x0F) << 4)).reshape(*head, k // 2)


def unpack_int4(p: np.ndarray, group: int) -> np.ndarray:
    """The inverse of ``pack_int4``: uint8 (..., K/2) -> int8 (..., K)."""
    *head, half = p.shape
    b = p.view(np.int8).reshape(*head, half * 2 // group, 1, group // 2)
    lo = np.left_shift(b, 4) >> 4
    hi = b >> 4
    return np.concatenate([lo, hi], axis=-2).reshape(*head, half * 2)


def dequantize(q: np.ndarray, scale: np.ndarray, logical_shape: tuple[int, ...], lead: int, n_in: int
               ) -> np.ndarray:
    """(``_q``, ``_scale``) -> the float32 weight of ``logical_shape`` (packed int4 recognised by its uint8 dtype)."""
    head = logical_shape[:lead]
    k = math.prod(logical_shape[lead : lead + n_in])
    n = math.prod(logical_shape[lead + n_in :])
    groups = 1 if scale.ndim == q.ndim - 1 else scale.shape[-1]
    if q.dtype == np.uint8:
        q = unpack_int4(q, k // groups)
    blocks = q.astype(np.float32).reshape(*head, n, groups, k // groups)
    scale = scale.reshape(*head, n, groups)
    wt = (blocks * scale[..., None]).reshape(*head, n, k)
    return np.swapaxes(wt, -1, -2).reshape(logical_shape)
