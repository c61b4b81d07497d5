"""The server's counters and their Prometheus text exposition (format 0.0.4), written by hand: no dependency."""

from __future__ import annotations

import collections
import threading
import time

PREFIX = "aria_jax_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this many past seconds


class Metrics:
    """Thread-safe counters the engine feeds; ``render`` writes them with the engine's gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.generated = 0
            self.prompt = 0
            self.steps = 0
            self.step_seconds = 0.0
            self.prefill_seconds = 0.0
            self.outcomes: collections.Counter = collections.Counter()
            self.ttft_counts = [0] * len(TTFT_BUCKETS)
            self.ttft_sum = 0.0
            self.ttft_count = 0
            self._recent: collections.deque[tuple[float, int]] = collections.deque()
            self.recent_ttft: collections.deque[float] = collections.deque(maxlen=4096)  # seconds, newest last

    def tokens(self, n: int) -> None:
        with self._lock:
            self.generated += n
            now = time.monotonic()
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def step(self, rows: int, seconds: float, count: int = 1) -> None:
        """``count`` decode steps of ``rows`` running rows in one program of ``seconds``."""
        with self._lock:
            self.steps += count
            self.step_seconds += seconds

    def prefill(self, seconds: float) -> None:
        """One admission (prefill and first token) of ``seconds``."""
        with self._lock:
            self.prefill_seconds += seconds

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt += prompt_tokens
            self.ttft_sum += seconds
            self.recent_ttft.append(seconds)
            self.ttft_count += 1
            for i, edge in enumerate(TTFT_BUCKETS):
                if seconds <= edge:
                    self.ttft_counts[i] += 1

    def finished(self, outcome: str) -> None:
        """``done`` (a whole reply), ``cancelled`` (its client went away) or ``error``."""
        with self._lock:
            self.outcomes[outcome] += 1

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """Prometheus text: the counters, the time-to-first-token histogram and ``gauges`` (name -> (value, help))."""
        rate = self.tokens_per_second()
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}"])
            lines.extend(f"{PREFIX}{name}{labels} {_number(value)}" for labels, value in samples)

        with self._lock:
            metric("generated_tokens_total", "counter", "tokens generated", [("", self.generated)])
            metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", self.prompt)])
            metric("decode_steps_total", "counter", "decode steps over the pool", [("", self.steps)])
            metric("decode_step_seconds_total", "counter", "time in decode steps", [("", self.step_seconds)])
            metric("prefill_seconds_total", "counter", "time in prefills", [("", self.prefill_seconds)])
            metric("requests_total", "counter", "requests that left a row, by outcome",
                   [(f'{{outcome="{k}"}}', self.outcomes[k]) for k in ("done", "cancelled", "error")])
            cumulative = [(f'{{le="{edge}"}}', count) for edge, count in zip(TTFT_BUCKETS, self.ttft_counts,
                                                                             strict=True)]
            lines.extend([f"# HELP {PREFIX}time_to_first_token_seconds from submission to the first token",
                          f"# TYPE {PREFIX}time_to_first_token_seconds histogram"])
            lines.extend(f"{PREFIX}time_to_first_token_seconds_bucket{labels} {value}" for labels, value in cumulative)
            lines.append(f'{PREFIX}time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
            lines.append(f"{PREFIX}time_to_first_token_seconds_sum {_number(self.ttft_sum)}")
            lines.append(f"{PREFIX}time_to_first_token_seconds_count {self.ttft_count}")
        metric("tokens_per_second", "gauge", f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
               [("", rate)])
        for name, (value, help_) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
