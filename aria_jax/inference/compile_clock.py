"""Seconds spent tracing, lowering and compiling, from JAX's monitoring events (``GenerationStats.compile_s``).

jax.monitoring has no way to remove a listener, so one listener is registered once and adds every compile event's
duration to a running total; a clock is the difference between two reads (events of other threads compiling at the
same time count too: a server's figures are per process, not per request).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import jax

EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_total = [0.0]
_lock = threading.Lock()
_registered = [False]


def _listen(event: str, duration: float, **_) -> None:
    if event in EVENTS:
        with _lock:
            _total[0] += duration


def compile_seconds() -> float:
    """Compile seconds in this process since the first call of this function."""
    with _lock:
        if not _registered[0]:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _registered[0] = True
        return _total[0]


def compile_clock() -> Callable[[], float]:
    """Starts a clock; calling the result gives the compile seconds since."""
    start = compile_seconds()
    return lambda: compile_seconds() - start
