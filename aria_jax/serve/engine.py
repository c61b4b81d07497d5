"""Continuous batching: one background thread admits waiting requests into free rows of the slot pool between decode
programs and advances every running row by up to ``decode_steps`` tokens per program; a finished or cancelled
request frees its row at once.

A request is prepared (tokenized, images processed) by the caller; the engine only runs the model. Its events go to
the request's ``sink`` (called on the engine thread): ``("token", piece)`` for each new piece of text, then
``("done", None)`` or ``("error", message)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from aria_jax.errors import InputError
from aria_jax.inference.api import Aria
from aria_jax.inference.generation import bucket
from aria_jax.serve.metrics import Metrics
from aria_jax.serve.pool import RowSampling, SlotPool
from aria_jax.serve.sequence import Generated

log = logging.getLogger("aria_jax.serve")


# Waiting text prompts of at most this many tokens (their bucket) prefill together, padded to a power of two (>= 32)
# in batches of powers of two: few programs (3 widths x 3 batch sizes at --max-batch 8), all compiled by ``warm_up``.
# Measured on the 4-layer mid model: one 64-token prompt 24.4 ms, eight together 16.3 ms each; longer prompts keep
# their own buckets (padding them to a shared width would cost more than batching saves).
GROUP_MAX_BUCKET = 128
GROUP_WIDTHS = (32, 64, 128)
MAX_DECODE_STEPS = 64  # the most decode steps one program runs (--decode-steps)


class QueueFull(Exception):
    """Every row is busy and ``max_queue`` requests already wait."""


@dataclasses.dataclass
class Request:
    """One prepared request: (1, t) prompt ids and mask, pixel arrays or None, sampling and stop rules."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    pixel_mask: np.ndarray | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    sink: Callable[[str, object], None] = lambda kind, value: None
    # filled in by the engine
    generated: Generated | None = None
    cancelled: bool = False
    row: int = -1
    submitted: float = 0.0
    first_token_s: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def cancel(self) -> None:
        """Stop generating (a client went away): the row is freed before the next step."""
        self.cancelled = True


class Engine:
    """The slot pool of ``model`` (``max_batch`` rows x ``max_seq_len`` slots) and the thread that drives it."""

    def __init__(self, model: Aria, max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 64,
                 kv_cache: str = "float", decode_steps: int = 4, prefill_batch: int = 8):
        if model.processor is None:
            raise InputError("the model has no tokenizer (tokenizer.json); a server needs one")
        limit = model.config.text.max_position_embeddings
        max_seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
        if not 32 <= max_seq_len <= limit:
            raise InputError(f"--max-seq-len must be in 32..{limit} (the model's context), got {max_seq_len}")
        if max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {max_batch}")
        if not 1 <= decode_steps <= MAX_DECODE_STEPS:
            raise InputError(f"--decode-steps must be in 1..{MAX_DECODE_STEPS}, got {decode_steps}")
        if prefill_batch < 1:
            raise InputError(f"prefill_batch must be >= 1, got {prefill_batch}")
        if max_queue < 0:
            raise InputError(f"--max-queue must be >= 0, got {max_queue}")
        self.model, self.max_batch, self.max_seq_len, self.max_queue = model, max_batch, max_seq_len, max_queue
        rule = model._stop_rule(1, 0, None, 0)
        self.eos_ids, self.pad_id = rule.eos_ids, rule.pad_id
        self.decode_steps, self.prefill_batch = decode_steps, prefill_batch
        self.pool = SlotPool(model.module, model.params, max_batch, max_seq_len, kv_int8=kv_cache == "int8",
                             max_steps=decode_steps, eos_ids=self.eos_ids)
        self.metrics = Metrics()
        self._rows: list[Request | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the caller's side ---------------------------------------------------------------------------------
    def room(self, prompt_len: int) -> int:
        """The most new tokens a prompt of ``prompt_len`` tokens can have (its bucket and they fill a row)."""
        return self.max_seq_len - bucket(prompt_len)

    def submit(self, request: Request) -> Request:
        """Queue a prepared request (``room`` checked by the caller); raises QueueFull when the queue is full."""
        if request.max_tokens < 1 or request.max_tokens > self.room(request.input_ids.shape[1]):
            raise InputError(f"max_tokens {request.max_tokens} does not fit the row of {self.max_seq_len} slots")
        request.submitted = time.perf_counter()
        request.generated = Generated(self.model.processor.decode, self.eos_ids, request.max_tokens, request.stop)
        with self._lock:
            if len(self._waiting) - self.free_rows >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for one of {self.max_batch} rows")
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def free_rows(self) -> int:
        return self.max_batch - self.running

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="aria-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def warm_up(self, groups: bool = False) -> None:
        """Compile the decode steps (a lone row's and the pool's, and the moves between them) and the prefill of the
        smallest bucket (call before ``start``); with ``groups`` also every batched prefill of short prompts
        (``GROUP_WIDTHS`` x batches of 2, 4, ... rows), so that no request waits for the compiler but one whose
        prompt bucket is new."""
        ids = np.full((1, 1), self.pad_id, np.int32)
        self.submit(Request(ids, np.ones_like(ids), None, None, min(8, self.max_seq_len - bucket(1))))
        self._admit_waiting()
        self._step()  # alone: the one-row pool
        if self.max_batch > 1:
            self.submit(Request(ids, np.ones_like(ids), None, None, 2))
        self._drain()  # together (the pool), then the first alone again
        sizes = []
        if groups:
            most = min(self.max_batch, self.prefill_batch)
            sizes += [(n, w) for w in GROUP_WIDTHS if w + 2 <= self.max_seq_len
                      for n in (2 ** i for i in range(1, most.bit_length())) if n <= most]
        for n, width in sizes:
            ids = np.full((1, width), self.pad_id, np.int32)
            for _ in range(n):
                self.submit(Request(ids, np.ones_like(ids), None, None, 2))
            self._drain()
        self.metrics.reset()

    def _drain(self) -> None:
        """Run (on the caller's thread) until no request runs or waits."""
        while self.running or self._waiting:
            self._admit_waiting()
            if self.running:
                self._step()

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.running:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._admit_waiting()
                if self.running:
                    self._step()
            except Exception as e:  # a bug: fail the running requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error: {e}")
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, "error", "the server is shutting down")

    def _admit_waiting(self) -> None:
        while True:
            with self._lock:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                free = [i for i, r in enumerate(self._rows) if r is None]
                if not free or not self._waiting:
                    return
                group = self._next_group(len(free))
                rows = free[:len(group)]
                for request, row in zip(group, rows, strict=True):
                    request.row, self._rows[row] = row, request
            start = time.perf_counter()
            try:
                tokens = self._prefill(group, rows)
            except Exception as e:
                log.exception("prefill failed")
                for row in rows:
                    self._finish(row, "error", f"internal error: {e}")
                if self.pool.lost():
                    self._fail_all(f"internal error: {e}")
                continue
            self.metrics.prefill(time.perf_counter() - start)
            for request, row, token in zip(group, rows, tokens, strict=True):
                request.first_token_s = time.perf_counter() - request.submitted
                self.metrics.first_token(request.first_token_s, request.prompt_tokens)
                self._emit(row, token)

    def _next_group(self, free: int) -> list[Request]:
        """The waiting requests prefilled together next (taken off the queue; the lock held): the first one, and
        with it, if it is a short text prompt, the short text prompts right behind it while they fit ``free`` rows
        and ``prefill_batch``, cut to a power of two."""
        group = [self._waiting[0]]
        if _groups(group[0]):
            for request in itertools.islice(self._waiting, 1, None):
                if not _groups(request) or len(group) + 1 > min(free, self.prefill_batch):
                    break
                group.append(request)
        group = group[:1 << (len(group).bit_length() - 1)]
        for _ in group:
            self._waiting.popleft()
        return group

    def _prefill(self, group: list[Request], rows: list[int]) -> list[int]:
        """``group``'s prompts left-padded to one width (one prompt: its bucket; several: ``GROUP_WIDTHS``),
        prefilled into ``rows``: their first tokens."""
        longest = max(r.input_ids.shape[1] for r in group)
        width = bucket(longest) if len(group) == 1 else next(w for w in GROUP_WIDTHS if w >= longest)
        pad = lambda x, value: np.pad(x.astype(np.int32), ((0, 0), (width - x.shape[1], 0)), constant_values=value)
        ids = np.concatenate([pad(r.input_ids, self.pad_id) for r in group])
        mask = np.concatenate([pad(r.attention_mask, 0) for r in group])
        one = group[0]  # a request with images is alone in its group
        return self.pool.admit(rows, ids, mask, one.pixel_values, one.pixel_mask, self._sampling(group))

    def _sampling(self, requests: list[Request | None]) -> RowSampling:
        temperature = np.array([r.temperature if r else 0.0 for r in requests], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in requests], np.float32)
        keys = np.stack([_key_data(r.seed if r else 0) for r in requests])
        return RowSampling(temperature, top_p, keys)

    def _step(self) -> None:
        with self._lock:
            for row, request in enumerate(self._rows):
                if request is not None and request.cancelled:
                    self._release(row, "cancelled")
            rows = list(self._rows)
            count = self._steps_now(rows)
        if not any(rows):
            return
        active = np.array([r is not None for r in rows])
        steps = np.array([len(r.generated.tokens) if r else 0 for r in rows], np.int32)
        limit = np.array([r.max_tokens if r else 0 for r in rows], np.int32)
        start = time.perf_counter()
        tokens = self.pool.step(active, steps, limit, self._sampling(rows), count)
        self.metrics.step(int(active.sum()), time.perf_counter() - start, count)
        for j in range(count):
            for row, request in enumerate(rows):
                if request is not None and self._rows[row] is request:
                    self._emit(row, int(tokens[j, row]))

    def _steps_now(self, rows: list[Request | None]) -> int:
        """Decode steps for the next program (the lock held): one while a request waits for a free row, else up
        to ``decode_steps`` (fewer host round trips), but no more than the running row nearest its budget needs,
        so that a row ending by length frees its slot at the end of the program. A request that arrives meanwhile
        waits at most ``decode_steps`` steps."""
        if self._waiting and self.free_rows:
            return 1
        room = min((r.max_tokens - len(r.generated.tokens) for r in rows if r is not None), default=1)
        return max(1, min(self.decode_steps, room))

    def _fail_all(self, message: str) -> None:
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, "error", message)
        self.pool.reset()

    def _emit(self, row: int, token: int) -> None:
        request = self._rows[row]
        if request.cancelled:
            self._release(row, "cancelled")
            return
        piece = request.generated.add(token)
        self.metrics.tokens(1)
        if piece:
            request.sink("token", piece)
        if request.generated.finish_reason is not None:
            self._finish(row, "done", None)

    def _finish(self, row: int, kind: str, value) -> None:
        request = self._release(row, kind)
        request.sink(kind, value)

    def _release(self, row: int, why: str) -> Request:
        request, self._rows[row] = self._rows[row], None
        self.metrics.finished(why)
        return request


def _groups(request: Request) -> bool:
    """Whether ``request`` may be prefilled with others: text only, and short (``GROUP_MAX_BUCKET``)."""
    short = bucket(request.input_ids.shape[1]) <= GROUP_MAX_BUCKET
    return short and request.pixel_values is None and not request.cancelled


@functools.lru_cache(maxsize=1024)
def _key_data(seed: int) -> np.ndarray:
    """``jax.random.key(seed)``'s data, as ``Aria.generate(seed=...)`` makes its key."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
