"""Training metrics: one JSON line per logged step in ``output_dir/metrics.jsonl`` and TensorBoard events."""

from __future__ import annotations

import contextlib
import json
import os

from aria_jax.files import write_atomic


class MetricsLog:
    """metrics.jsonl + TensorBoard events in output_dir; on resume the JSONL is cut back to the restored step (lines
    that do not parse, e.g. one cut short by a full disk, are dropped).

    Disabled (writes nothing) on every process but the first. A failed write is an OSError naming the file, and
    leaves no partial line behind.
    """

    def __init__(self, output_dir: str, resume_step: int | None, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            with open(self.path, "rb") as f:
                kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= resume_step]
            write_atomic(self.path, b"".join(kept))
        try:
            # imported here: tensorboardX imports torch when installed (~190 MB of RSS and its OpenMP threads in
            # every process that merely imports the trainer; measured in bench/README.md, issue 19)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:
            self.tb = None

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
        if self.tb is not None:
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, int | float):
                        self.tb.add_scalar(f"train/{k}", v, record["step"])
                self.tb.flush()
            except OSError as exc:
                tensorboard = os.path.join(os.path.dirname(self.path), "tensorboard")
                raise OSError(exc.errno, exc.strerror, tensorboard) from None

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            tb.close()


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError, RecursionError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _truncate(f, size: int) -> None:
    with contextlib.suppress(OSError):
        f.truncate(size)
