"""Shared building blocks: parameters with logical axes, norms, linear layers (the attention softmax is
aria_jax.kernels.attention.masked_softmax)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aria_jax.kernels.matmul import project
from aria_jax.kernels.quantized import QWeight
from aria_jax.quant import Holding, stored_axes, stored_shapes

Initializer = jax.nn.initializers.Initializer
normal = nn.initializers.normal(stddev=0.02)


def param(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
    init: Initializer = normal,
) -> jax.Array:
    """A parameter annotated with logical axis names (one per dimension) for the sharding rules."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def weight(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
    quant: Holding | None = None,
    lead: int = 0,
    n_in: int = 1,
    suffix: str = "",
) -> jax.Array | QWeight:
    """A matmul weight (``lead`` leading axes, then ``n_in`` contracted axes, then the output axes): the parameter
    ``{name}{suffix}``, or with ``quant`` the pair ``{name}_q{suffix}`` / ``{name}_scale{suffix}`` (aria_jax.quant)."""
    if quant is None:
        return param(module, name + suffix, shape, axes, dtype)
    shape, axes = tuple(shape), tuple(axes)
    q_shape, s_shape, q_dtype = stored_shapes(shape, lead, n_in, quant.spec, quant.packed)
    q_axes, s_axes = stored_axes(axes, lead, n_in, quant.spec)
    q = param(module, f"{name}_q{suffix}", q_shape, q_axes, q_dtype, nn.initializers.zeros)
    scale = param(module, f"{name}_scale{suffix}", s_shape, s_axes, jnp.float32, nn.initializers.ones)
    return QWeight(q, scale, shape[lead + n_in :], quant.fused_rows)


# LoRA hooks (aria_jax.training.lora): a pair ``{name}_a`` (..., in, r) / ``{name}_b`` (..., r, out) in the "lora"
# collection adds ``dropout(x) @ a @ b`` to the matmul with parameter ``name``; b carries the alpha / r scale.
LORA = "lora"
_LORA_DROPOUT: contextvars.ContextVar[float] = contextvars.ContextVar("lora_dropout", default=0.0)


@contextlib.contextmanager
def lora_dropout(rate: float) -> Iterator[None]:
    """Trace-time LoRA dropout rate (applied only when a "dropout" rng is given to ``apply``)."""
    token = _LORA_DROPOUT.set(float(rate))
    try:
        yield
    finally:
        _LORA_DROPOUT.reset(token)


def lora_pair(module: nn.Module, name: str) -> tuple[jax.Array, jax.Array] | None:
    if not module.has_variable(LORA, name + "_a"):
        return None
    return module.get_variable(LORA, name + "_a"), module.get_variable(LORA, name + "_b")


def lora_input(module: nn.Module, x: jax.Array) -> jax.Array:
    """Inverted dropout on a LoRA branch's input when a rate is set and a "dropout" rng is available."""
    rate = _LORA_DROPOUT.get()
    if rate <= 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def lora_delta(module: nn.Module, name: str, x: jax.Array, n_in: int) -> jax.Array | int:
    """``dropout(x) @ a @ b`` contracting the last ``n_in`` axes of x, or 0 without a LoRA pair for ``name``."""
    pair = lora_pair(module, name)
    if pair is None:
        return 0
    a, b = pair
    h = project(lora_input(module, x), a.astype(x.dtype), n_in)
    return project(h, b.astype(x.dtype))


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)``; the kernel is [in, out] (a transposed torch ``nn.Linear`` weight)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    matvec_split: int = 1  # Runtime.matvec_split: a single row as this many partial matvecs (kernels.matmul)
    quant: Holding | None = None  # quantized kernel (Runtime.holding)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = weight(self, "kernel", (x.shape[-1], self.features), self.axes, self.dtype, self.quant)
        y = project(x, kernel, split=self.matvec_split) + lora_delta(self, "kernel", x, 1)
        if self.use_bias:
            y = y + param(self, "bias", (self.features,), self.axes[1:], self.dtype, nn.initializers.zeros)
        return y


class RMSNorm(nn.Module):
    """Llama RMSNorm as transformers computes it: normalise in float32, cast back, then scale (no 1 + w)."""

    eps: float
    axis_name: str = "embed"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * y.astype(x.dtype)


class LayerNorm(nn.Module):
    """torch ``nn.LayerNorm``: float32 statistics with the two-pass variance, affine in the input dtype."""

    eps: float
    axis_name: str = "vision_embed"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param(self, "scale", (d,), (self.axis_name,), self.dtype, nn.initializers.ones)
        bias = param(self, "bias", (d,), (self.axis_name,), self.dtype, nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# torch evaluates these in float32 and rounds once to the input dtype; so do we (it matters in bfloat16).
