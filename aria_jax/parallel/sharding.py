"""Device meshes and parameter shardings: mesh specs like ``"data=2,expert=4,tensor=1"`` and logical-axis rules.

Every parameter carries logical axis names (``aria_jax.model.schema``); ``RULES`` maps the
ones worth sharding onto a physical mesh axis: routed experts on ``expert``; text attention heads and the
vocabulary on ``tensor``. Everything else (vision tower, projector, norms, shared experts) is replicated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aria_jax.config import AriaConfig
from aria_jax.errors import InputError
from aria_jax.model.schema import declared_params
from aria_jax.quant import QuantSpec

MESH_AXES = ("data", "expert", "tensor")

# logical axis -> physical mesh axis; logical axes not listed are replicated.
RULES: dict[str, str] = {
    "expert": "expert",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
}

# What each sharded logical axis is, for error messages.
_DESCRIBE = {
    "expert": "moe_num_experts",
    "q_heads": "text num_attention_heads",
    "kv_heads": "text num_key_value_heads",
    "vocab": "vocab_size",
}


class MeshError(InputError):
    """A mesh spec that cannot be built, or that does not divide the model's sharded dimensions."""


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4}`` (axes from data, expert, tensor; sizes >= 1)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise MeshError(f"mesh '{spec}': '{part}' is not AXIS=SIZE with a positive integer size")
        if name not in MESH_AXES:
            raise MeshError(f"mesh '{spec}': unknown axis '{name}'; use {', '.join(MESH_AXES)}")
        if name in axes:
            raise MeshError(f"mesh '{spec}': axis '{name}' given twice")
        axes[name] = int(size)
    if not axes:
        raise MeshError(f"mesh '{spec}': no axes (expected e.g. 'data=2,expert=4,tensor=1')")
    return axes


def make_mesh(spec: str | Mesh | None, devices: list | None = None) -> Mesh | None:
    """A ``Mesh`` from a spec string (on the first N devices), a ``Mesh`` as is, or None."""
    if spec is None or isinstance(spec, Mesh):
        return spec
    axes = parse_mesh_spec(spec)
    devices = list(devices if devices is not None else jax.devices())
    needed = math.prod(axes.values())
    if needed > len(devices):
        raise MeshError(f"mesh '{spec}' needs {needed} devices, only {len(devices)} available")
    return jax.make_mesh(
        tuple(axes.values()),
        tuple(axes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
        devices=devices[:needed],
    )


def partition_spec(
    logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, where: str, fsdp: bool = False
) -> PartitionSpec:
    """The physical spec of one parameter; raises MeshError when a sharded dimension does not divide.

    ``fsdp``: also split each parameter's largest remaining dimension that divides over the ``data`` axis (fully
    sharded data parallel: weights, gradients and optimizer state no longer replicate over ``data``; XLA gathers
    each layer's weights when it runs). The stacked ``layers`` axis is never split.
    """
    physical = []
    for axis, size in zip(logical, shape, strict=True):
        target = RULES.get(axis) if axis else None
        ways = mesh.shape.get(target, 1) if target else 1
        if ways == 1:
            physical.append(None)
            continue
        if size % ways:
            options = ", ".join(str(d) for d in range(1, size + 1) if size % d == 0)
            raise MeshError(
                f"{where}: {_DESCRIBE[axis]}={size} does not divide over mesh axis '{target}' of size {ways} "
                f"(use {target}={options})"
            )
        physical.append(target)
    ways = mesh.shape.get("data", 1)
    if fsdp and ways > 1:
        free = [i for i, (axis, size) in enumerate(zip(logical, shape, strict=True))
                if physical[i] is None and axis != "layers" and size % ways == 0]
        if free:
            physical[max(free, key=lambda i: shape[i])] = "data"
    return PartitionSpec(*physical)


def param_shardings(cfg: AriaConfig, mesh: Mesh | str, fsdp: bool = False, quant: QuantSpec | None = None,
                    packed: bool = True) -> dict:
    """The NamedSharding of every parameter (a tree shaped like the params) on ``mesh`` (``fsdp``: see above);
    ``quant``/``packed``: the quantized parameters' ``_q``/``_scale`` pairs (aria_jax.quant)."""
    mesh = make_mesh(mesh)
    shapes, logical = declared_params(cfg, jnp.float32, quant, packed)
    flat_logical = jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    shardings = [
        NamedSharding(
            mesh,
            partition_spec(
                tuple(spec), leaf.shape, mesh, jax.tree_util.keystr(path, simple=True, separator="."), fsdp
            ),
        )
        for (path, spec), leaf in zip(flat_logical, flat_shapes, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), shardings)
