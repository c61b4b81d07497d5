"""Orbax checkpoints of the training state (trainable params, optimizer state, step) and the data position.

Saves are asynchronous; Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


def open_manager(directory: str, keep: int | None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    out = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    )
    return out["state"], out["data"]


def resolve_resume(spec: bool | str | None, default_dir: str) -> tuple[str, int | None] | None:
    """resume_from_checkpoint -> (checkpoints directory, step or None for the latest); None: start fresh."""
    if spec in (None, False):
        return None
    if spec is True:
        return default_dir, None
    path = os.path.abspath(str(spec))
    name = os.path.basename(path.rstrip("/"))
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None
