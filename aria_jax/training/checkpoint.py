"""Orbax checkpoints of the training state (trainable params, optimizer state, step) and the data position.

Saves are asynchronous; Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save (or a save that fails, e.g. on a full disk) leaves the previous checkpoint as the latest
loadable one. A failed save is an ``OSError`` naming the checkpoints directory; a checkpoint that does not fit the
model (another shape, another set of parameters) is a ``RecipeError`` naming the parameter, found from the
checkpoint's metadata before anything is restored.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp

from aria_jax.errors import one_line
from aria_jax.training.config import RecipeError

_RESUME = "config key 'resume_from_checkpoint'"


def open_manager(directory: str, keep: int | None, create: bool = True) -> ocp.CheckpointManager:
    """A manager that saves into ``directory`` (created when ``create``), or with ``create=False`` one that only
    reads it (nothing is created or cleaned up)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def _save_error(exc: Exception, directory: str) -> OSError | None:
    """The OSError behind a failed save (Orbax and TensorStore report ENOSPC and the like as other types, with the
    error code in the message), naming the checkpoints directory; None when it was not the file system."""
    code = exc.errno if isinstance(exc, OSError) else None
    match = re.search(r"os_error_code='?(\d+)", str(exc))
    if code is None and match:
        code = int(match.group(1))
    if code is None:
        return None
    return OSError(code, f"cannot save a checkpoint ({os.strerror(code)})", str(directory))


@contextlib.contextmanager
def _saving(manager: ocp.CheckpointManager) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        error = _save_error(exc, manager.directory)
        if error is None:
            raise
        raise error from None


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict) -> None:
    """Start saving ``step`` (asynchronously); a failure of the previous save surfaces here as an OSError."""
    with _saving(manager):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)))


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the last save; a failure is an OSError naming the checkpoints directory."""
    with _saving(manager):
        manager.wait_until_finished()


def close_quietly(manager: ocp.CheckpointManager) -> None:
    """Close after a failure: wait for (and forget) saves in flight."""
    with contextlib.suppress(Exception):
        manager.wait_until_finished()
    with contextlib.suppress(Exception):
        manager.close()
    gc.collect()


class _OrbaxErrors(logging.Filter):
    """Orbax logs a failed background save as an ERROR with a traceback before raising it to us, and asyncio logs
    the failed writes it gathered ("exception was never retrieved") when they are collected; we report the failure
    as one line instead (``save``/``finish``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "exception was never retrieved" not in record.getMessage()
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def _quiet_closed_loop(previous):
    """An unraisable-exception hook without the tracebacks of TensorStore writes that finish after a failed save
    closed Orbax's event loop (``Exception ignored ... RuntimeError: Event loop is closed``)."""

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    return hook


@contextlib.contextmanager
def quiet_orbax_errors() -> Iterator[None]:
    """While saving: Orbax's own reports of a failed save silenced (the failure is raised to us and becomes one
    line). After a failure they stay silenced: its stray writes may still report until the process exits."""
    loggers, quiet = [logging.getLogger("absl"), logging.getLogger("asyncio")], _OrbaxErrors()
    for logger in loggers:
        logger.addFilter(quiet)
    previous = sys.unraisablehook
    sys.unraisablehook = _quiet_closed_loop(previous)
    yield
    for logger in loggers:  # only when no failure propagates (a generator context skips this on an exception)
        logger.removeFilter(quiet)
    sys.unraisablehook = previous


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def shapes(tree) -> dict[str, tuple[int, ...]]:
    """``path/to/leaf`` -> shape of every array leaf of a state tree or of a checkpoint's metadata tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(k) for k in path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def check_fits(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The checkpoint's trained parameters must be this run's, shape for shape (one line naming the first that is
    not)."""
    def trained(tree: dict) -> dict:
        return {k.removeprefix("trainable/"): v for k, v in tree.items() if k.startswith("trainable/")}

    stored, expected = trained(stored), trained(expected)
    for path, shape in expected.items():
        if path not in stored:
            raise RecipeError(f"{_RESUME}: {where}: has no parameter {path} (saved by a run with another model, or "
                              "another use_peft / freeze_* / lora_target_modules setting?)")
        if stored[path] != shape:
            raise RecipeError(f"{_RESUME}: {where}: parameter {path} has shape {stored[path]} in the checkpoint but "
                              f"{shape} in this model")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise RecipeError(f"{_RESUME}: {where}: parameter {extra[0]} is in the checkpoint but not trained by this run "
                          "(another model, or another use_peft / freeze_* / lora_target_modules setting?)")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """The state and data position of ``step``; the checkpoint is checked against ``abstract_state`` first.
    An unreadable or mismatched checkpoint is a RecipeError naming it."""
    where = os.path.join(str(manager.directory), str(step))
    try:
        metadata = manager.item_metadata(step)["state"]
    except Exception as exc:  # Orbax / TensorStore raise many types for a damaged checkpoint
        raise RecipeError(f"{_RESUME}: {where}: cannot read the checkpoint ({type(exc).__name__}: "
                          f"{one_line(exc)})") from None
    if metadata is None:
        raise RecipeError(f"{_RESUME}: {where}: not a training checkpoint (no state metadata)")
    check_fits(shapes(metadata), shapes(abstract_state), where)
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                            data=ocp.args.JsonRestore()))
    except Exception as exc:
        raise RecipeError(f"{_RESUME}: {where}: cannot restore ({type(exc).__name__}: {one_line(exc)})") from None
    return out["state"], out["data"]


def resolve_resume(spec: bool | str | None, default_dir: str) -> tuple[str, int | None] | None:
    """resume_from_checkpoint -> (checkpoints directory, step or None for the latest); None: start fresh.

    ``true`` resumes from ``default_dir`` when it exists (else a fresh start); a path must exist: a checkpoints
    directory, a run's output_dir (its ``checkpoints``), or one step's directory. Nothing is created.
    """
    if spec in (None, False):
        return None
    if spec is True:
        return (default_dir, None) if os.path.isdir(default_dir) else None
    path = os.path.abspath(str(spec))
    if not os.path.isdir(path):
        raise RecipeError(f"{_RESUME}: {spec}: no such directory")
    name = os.path.basename(path.rstrip("/"))
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None
