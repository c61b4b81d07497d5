"""Training output for people and tools: the log lines at ``log_level`` (``Log``), and the metrics: one JSON line
per logged step in ``output_dir/metrics.jsonl``, and the ``report_to`` integrations (TensorBoard, W&B)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable

from aria_jax.errors import InputError, one_line
from aria_jax.files import write_atomic

LEVELS = {"debug": 10, "info": 20, "passive": 20, "warning": 30, "error": 40, "critical": 50}


class Log:
    """Lines on stdout at ``level`` (transformers' log_level names; passive = info): ``log(message)`` is info,
    ``log.warning(message)`` prints ``warning: message``. Prints nothing when not ``enabled`` (processes but the
    first). Errors are not logged here: train.py prints them on stderr as one line."""

    def __init__(self, level: str = "passive", enabled: bool = True, write: Callable[[str], None] | None = None):
        self.level = LEVELS.get(level, 20)
        self.enabled = enabled
        self.write = write or (lambda line: print(line, flush=True))

    def __call__(self, message: str) -> None:
        if self.enabled and self.level <= LEVELS["info"]:
            self.write(message)

    def warning(self, message: str) -> None:
        if self.enabled and self.level <= LEVELS["warning"]:
            self.write(f"warning: {message}")

    @property
    def quiet(self) -> bool:
        """No progress bar either (log_level error or critical), as transformers' default ``disable_tqdm``."""
        return self.level > LEVELS["warning"]


def warn(log: Callable[[str], None], message: str) -> None:
    """``log.warning(message)`` for a ``Log``; ``log("warning: " + message)`` for any other callable."""
    warning = getattr(log, "warning", None)
    if warning is not None:
        warning(message)
    else:
        log(f"warning: {message}")


def reporters(report_to: list[str], log: Callable[[str], None] = print) -> tuple[bool, object | None]:
    """(TensorBoard on, the ``wandb`` module or None) for ``report_to``; one warning line for wandb when it is not
    installed, and for each integration not supported here. metrics.jsonl is written whatever they say."""
    names = set(report_to)
    if "none" in names and len(names) > 1:
        warn(log, f"report_to: 'none' with {', '.join(sorted(names - {'none'}))}: reporting to those")
    wandb, fallback = None, False
    if "wandb" in names or "all" in names:
        try:
            import wandb  # optional: not a dependency of aria-jax
        except ImportError:
            if "wandb" in names:
                fallback = True
                warn(log, "report_to: wandb is not installed (pip install wandb): metrics go to metrics.jsonl "
                          "and TensorBoard instead")
    for name in sorted(names - {"tensorboard", "wandb", "all", "none"}):
        fallback = True
        warn(log, f"report_to: {name} is not supported here: metrics go to metrics.jsonl and TensorBoard instead")
    return fallback or bool(names & {"tensorboard", "all"}), wandb


class TensorBoardEvents:
    """Scalars in a TensorBoard event file in ``directory``, written and fsynced in the caller's thread.

    Written by hand around tensorboardX's synchronous ``EventsWriter`` (its record format and protos) rather than its
    ``SummaryWriter``: that one writes from a background thread and flushes again at interpreter exit, so a full disk
    surfaced as a traceback from the thread or the exit hook, or as an OSError naming no file from ``close`` that hid
    the error that ended the run. Here a failed write or close is an OSError naming ``directory``.
    """

    def __init__(self, directory: str):
        # imported here: tensorboardX imports torch when installed (~190 MB of RSS and its OpenMP threads in
        # every process that merely imports the trainer; measured in bench/README.md, issue 19)
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self.directory = directory
        self._event, self._scalar = Event, scalar
        with self._naming_directory():
            os.makedirs(directory, exist_ok=True)
            self._writer = EventsWriter(os.path.join(directory, "events"))
            self._writer.flush()

    @contextlib.contextmanager
    def _naming_directory(self):
        try:
            yield
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.directory) from None

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """One event holding every scalar at ``step``, on disk when this returns."""
        event = self._event(wall_time=time.time(), step=step)
        for name, value in scalars.items():
            event.summary.value.extend(self._scalar(name, value).value)
        with self._naming_directory():
            self._writer.write_event(event)
            self._writer.flush()

    def close(self) -> None:
        with self._naming_directory():
            self._writer.close()


class MetricsLog:
    """metrics.jsonl + the ``report_to`` integrations in output_dir; on resume the JSONL is cut back to the restored
    step (lines that do not parse, e.g. one cut short by a full disk, are dropped).

    ``tensorboard``: events in ``tb_dir`` (default output_dir/tensorboard); ``wandb``: the wandb module, a run is
    started with ``wandb_init`` arguments. Keys ``eval_*`` go to TensorBoard / W&B as ``eval/*``, the others as
    ``train/*``. Disabled (writes nothing) on every process but the first. A failed write is an OSError naming the
    file, and leaves no partial line behind.
    """

    def __init__(self, output_dir: str, resume_step: int | None, enabled: bool = True, tensorboard: bool = True,
                 tb_dir: str | None = None, wandb=None, wandb_init: dict | None = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb_dir = tb_dir or os.path.join(output_dir, "tensorboard")
        self.enabled = enabled
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            with open(self.path, "rb") as f:
                kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= resume_step]
            write_atomic(self.path, b"".join(kept))
        if tensorboard:
            self.tb = TensorBoardEvents(self.tb_dir)
        if wandb is not None:
            try:
                self.wandb_run = wandb.init(**(wandb_init or {}))
            except Exception as exc:  # not logged in, no network, a bad WANDB_* variable: wandb's own error types
                self.close()
                raise InputError(f"config key 'report_to': wandb cannot start a run ({one_line(exc)})") from None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "ab") as f:
            end = f.tell()
            try:
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                _truncate(f, end)
                raise OSError(exc.errno, exc.strerror, self.path) from None
        scalars = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in record.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tb is not None:
            self.tb.add_scalars(scalars, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self, quietly: bool = False) -> None:
        """Close the integrations; ``quietly`` (a run already failing) drops their errors so the first one stands."""
        tb, self.tb = self.tb, None
        run, self.wandb_run = self.wandb_run, None
        try:
            if tb is not None:
                tb.close()
        except OSError:
            if not quietly:
                raise
        finally:
            if run is not None:
                with contextlib.suppress(Exception) if quietly else contextlib.nullcontext():
                    run.finish()


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError, RecursionError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate(f, size: int) -> None:
    with contextlib.suppress(OSError):
        f.truncate(size)
