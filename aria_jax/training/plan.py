"""How a run is laid out: the output directory, the mesh and how batch rows split over it, the global batch, the
weights' dtypes, and the step plan (total steps, warmup, and when to log, save and evaluate: the *_strategy /
*_steps keys, as transformers reads them)."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import jax
import jax.numpy as jnp

from aria_jax.errors import one_line
from aria_jax.parallel import distributed
from aria_jax.parallel.sharding import MeshError, make_mesh, param_shardings
from aria_jax.quant import QuantSpec
from aria_jax.training.config import RecipeError, TrainConfig


@dataclasses.dataclass(frozen=True)
class Rows:
    """How a global batch's rows are split: over mesh ``axes``; this process builds block ``index`` of ``count``
    (multi-host), and each block's images are padded to a multiple of ``image_multiple`` (its data shards)."""

    axes: tuple[str, ...] = ()
    index: int = 0
    count: int = 1
    image_multiple: int = 1


def make_train_mesh(spec: str | None):
    """The recipe's mesh (None: one device); a bad spec is a recipe error naming the key."""
    try:
        return make_mesh(spec)
    except MeshError as e:
        raise RecipeError(f"config key 'mesh': {e}") from None


def data_ways(mesh) -> int:
    """Data-parallel devices: the size of the mesh's ``data`` axis (1 without a mesh or without that axis)."""
    return 1 if mesh is None else int(mesh.shape.get("data", 1))


def global_batch(per_device: int, mesh) -> int:
    """Rows of one global (micro-)batch: ``per_device`` rows on each data-parallel device, as the original."""
    return per_device * data_ways(mesh)


def batch_rows(mesh, batch_size: int) -> Rows:
    """Rows over the mesh's ``data`` axis when it divides the batch (else replicated: every process builds all)."""
    if mesh is None:
        return Rows()
    axes = distributed.batch_axes(mesh, batch_size)
    try:
        index, count = distributed.row_block(mesh, batch_size, axes)
    except ValueError as e:
        raise RecipeError(f"config key 'mesh': {e}") from None
    ways = math.prod(mesh.shape[a] for a in axes)
    return Rows(axes, index, count, ways // count)


def place(params: dict, config, mesh, fsdp: bool, quant: QuantSpec | None = None, packed: bool = True) -> dict:
    """Params onto the mesh with the sharding rules (and FSDP over data if asked); unchanged without a mesh.
    ``quant``/``packed``: the base is quantized (aria_jax.quant), its ``_q``/``_scale`` pairs sharded as stored."""
    if mesh is None:
        return params
    try:
        shardings = param_shardings(config, mesh, fsdp=fsdp, quant=quant, packed=packed)
    except MeshError as e:
        raise RecipeError(f"config key 'mesh': {e}") from None
    return distributed.place(params, shardings)


def onto_mesh(tree, mesh):
    """Leaves still on one local device (step counters, LoRA init, ...) replicated over ``mesh``; others as they are."""
    if mesh is None:
        return tree
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: x if x.sharding.device_set == replicated.device_set
                        else distributed.place(x, replicated), tree)


def check_output_dir(path: str) -> None:
    """``output_dir`` must be a directory that can be written, or one that can be created (its nearest existing
    ancestor a writable directory). Checked before anything is written; nothing is created."""
    target = os.path.abspath(path)
    if os.path.lexists(os.path.join(target, "checkpoints")) and not os.path.isdir(os.path.join(target, "checkpoints")):
        raise RecipeError(f"config key 'output_dir': {path}: its 'checkpoints' is not a directory")
    existing = target
    while not os.path.isdir(existing):
        if os.path.lexists(existing):  # a file, or a link to nothing, where a directory must be
            where = "is not a directory" if existing == target else f"lies below {existing}, which is not a directory"
            raise RecipeError(f"config key 'output_dir': {path}: {where}")
        existing = os.path.dirname(existing)
    try:  # os.access ignores read-only mounts on some file systems (and root ignores permissions); a real file not
        fd, probe = tempfile.mkstemp(prefix=".aria-jax-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RecipeError(f"config key 'output_dir': {path}: cannot write in {existing} "
                          f"({exc.strerror or one_line(exc)})") from None


def float32(tree: dict) -> dict:
    """The trained weights' master copy: float32 whatever the weight dtype."""
    return jax.tree.map(lambda x: x if x.dtype == jnp.float32 else x.astype(jnp.float32), tree)


def dtype_of(params: dict) -> str:
    """The dtype most of the float parameters have (by size): a quantized base's int8 values and float32 scales
    (aria_jax.quant) are not counted."""
    sizes: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or str(getattr(path[-1], "key", "")).endswith("_scale"):
            continue
        sizes[str(leaf.dtype)] = sizes.get(str(leaf.dtype), 0) + leaf.size
    return max(sizes, key=sizes.get) if sizes else "float32"


def interval(value: float, total: int) -> int:
    """A *_steps value: an integer, or a fraction (< 1) of the total steps rounded up (transformers' rule)."""
    return max(1, math.ceil(value * total)) if value < 1 else int(value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The optimizer steps of a run and the steps that log, save and evaluate."""

    cfg: TrainConfig
    total: int
    per_epoch: int  # optimizer steps per epoch (an epoch: every training sample once)
    batch: int  # rows of one global micro-batch

    @classmethod
    def make(cls, cfg: TrainConfig, num_samples: int, batch: int) -> Plan:
        per_epoch = max(1, math.ceil(num_samples / batch / cfg.gradient_accumulation_steps))
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.num_train_epochs))
        return cls(cfg, total, per_epoch, batch)

    @property
    def warmup(self) -> int:
        """warmup_steps when > 0 (a fraction < 1 of the steps, or a count), else warmup_ratio of the steps."""
        if self.cfg.warmup_steps > 0:
            return min(self.total, interval(self.cfg.warmup_steps, self.total))
        return math.ceil(self.cfg.warmup_ratio * self.total)

    def epoch_end(self, step: int) -> bool:
        return step % self.per_epoch == 0 or step == self.total

    def log_at(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.logging_first_step and step == 1:
            return True
        if cfg.logging_strategy == "steps":
            return step % interval(cfg.logging_steps, self.total) == 0 or step == self.total
        return cfg.logging_strategy == "epoch" and self.epoch_end(step)

    def save_at(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.save_strategy == "steps":
            return step % interval(cfg.save_steps, self.total) == 0 or step == self.total
        return cfg.save_strategy == "epoch" and self.epoch_end(step)

    def eval_at(self, step: int) -> bool:
        cfg = self.cfg
        if cfg.eval_strategy == "steps":
            every = interval(cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, self.total)
            return step % every == 0 and step >= cfg.eval_delay
        return cfg.eval_strategy == "epoch" and self.epoch_end(step) and step / self.per_epoch >= cfg.eval_delay

    def describe(self, mesh, per_device: int) -> str:
        cfg = self.cfg
        return (f"global batch: {self.batch} rows (per_device_train_batch_size {per_device} x {data_ways(mesh)} "
                f"data-parallel device(s)) x gradient_accumulation_steps {cfg.gradient_accumulation_steps} = "
                f"{self.batch * cfg.gradient_accumulation_steps} samples per step; {self.total} steps "
                f"({self.per_epoch} per epoch), warmup {self.warmup}")
