"""``aria-jax plan``: the parameters' bytes per device, float or weight-only quantized (``--quantize``).

The params are the ``jax.ShapeDtypeStruct``s ``model.schema.declared_params`` declares, each with its target
``NamedSharding`` on the mesh; a weight that ``--quantize`` covers (aria_jax.quant) is its ``_q``/``_scale`` pair:
int8 values (one byte each) with a float32 scale per output channel, or int4 values two per byte (``packed``, as
GPUs and TPUs hold them) with a float32 scale per group of 128 input channels. Everything else (norms, router,
embeddings, vision tower, projector, and ``lm_head`` unless quantized) is in the compute dtype. On CPU the runtime
holds int4 one value per byte (``Runtime.int4_packed``): ``cpu_int4_extra`` says how much more that is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aria_jax.config import AriaConfig
from aria_jax.errors import InputError
from aria_jax.model.schema import declared_params
from aria_jax.parallel.sharding import partition_spec
from aria_jax.quant import QuantSpec, parse


def key_path(path) -> str:
    """A tree path as ``a.b.c``."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def parse_quantize(value: str | None) -> QuantSpec | None:
    """``--quantize`` -> QuantSpec or None; a bad value is one line naming it (exit 2)."""
    try:
        return parse(value)
    except ValueError as e:
        raise InputError(f"--quantize '{value}': {e}") from None


def abstract_tree(cfg: AriaConfig, dtype: jnp.dtype, mesh: Mesh, fsdp: bool = False, quant: QuantSpec | None = None,
                  packed: bool = True) -> dict:
    """The params as ShapeDtypeStructs with their target NamedShardings on ``mesh`` (no tracing, nothing allocated);
    ``quant``: the weights it covers as their ``_q``/``_scale`` pairs (``packed``: int4 two per byte)."""
    shapes, logical = declared_params(cfg, dtype, quant, packed)
    flat_logical = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    leaves = []
    for (path, leaf), spec in zip(flat, flat_logical, strict=True):
        sharding = NamedSharding(mesh, partition_spec(tuple(spec), leaf.shape, mesh, key_path(path), fsdp))
        leaves.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def shard_bytes(x: jax.ShapeDtypeStruct, itemsize: int | None = None) -> int:
    """Per-device bytes of one array: size * itemsize / the product of the mesh axes its spec names."""
    mesh, spec = x.sharding.mesh, x.sharding.spec
    ways = math.prod(mesh.shape[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry))
    return math.prod(x.shape) * (itemsize or jnp.dtype(x.dtype).itemsize) // ways


def _quantized_leaf(name: str) -> bool:
    return name.endswith(("_q", "_scale"))


def params_bytes(tree: dict, itemsize: int | None = None) -> dict[str, int]:
    """Per-device parameter bytes: total, routed experts (their ``_q``/``_scale`` pairs when quantized), the rest,
    and the split into quantized weights (values + scales) and float parameters."""
    routed = other = quantized = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = key_path(path)
        n = shard_bytes(leaf, itemsize)
        base = name.removesuffix("_q").removesuffix("_scale") if _quantized_leaf(name) else name
        if base.split(".")[-1] in ("gate_up", "down") and ".mlp." in f".{base}.":
            routed += n
        else:
            other += n
        quantized += n if _quantized_leaf(name) else 0
    total = routed + other
    return {"total": total, "routed_experts": routed, "other": other, "quantized": quantized,
            "float": total - quantized}


def cpu_int4_extra(cfg: AriaConfig, dtype: jnp.dtype, mesh: Mesh, quant: QuantSpec | None) -> int:
    """Per-device bytes the CPU runtime holds on top of the packed plan: int4 values one per byte (0 for int8)."""
    if quant is None or quant.format != "int4":
        return 0
    unpacked = params_bytes(abstract_tree(cfg, dtype, mesh, quant=quant, packed=False))["total"]
    return unpacked - params_bytes(abstract_tree(cfg, dtype, mesh, quant=quant))["total"]


def weights_label(dtype: jnp.dtype, quant: QuantSpec | None) -> str:
    """How the report names the weights: ``bfloat16``, or ``int4 (groups of 128, packed) + bfloat16``."""
    if quant is None:
        return dtype.name
    detail = "per channel" if quant.format == "int8" else f"groups of {quant.group}, two per byte"
    head = "" if quant.lm_head else ", lm_head float"
    return f"{quant.format} ({detail}{head}) + {dtype.name}"


def dequantized_bytes(tree: dict, cfg: AriaConfig, itemsize: int) -> int:
    """Per-device bytes of the largest set of quantized weights dequantized at once: one decoder layer's (or
    ``lm_head``), in the compute dtype. A rough bound on the transient copy: XLA may fuse it into the dot."""
    layer = head = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = key_path(path)
        if not name.endswith("_q"):
            continue
        values = shard_bytes(leaf, 1) * (2 if leaf.dtype == jnp.uint8 else 1) * itemsize
        if ".layers." in name:
            layer += values // cfg.text.num_hidden_layers
        else:
            head = max(head, values)
    return max(layer, head)
