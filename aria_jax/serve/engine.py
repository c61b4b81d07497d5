"""Continuous batching: one background thread admits waiting requests into free rows of the slot pool between decode
steps and advances every running row by one token per step; a finished or cancelled request frees its row at once.

A request is prepared (tokenized, images processed) by the caller; the engine only runs the model. Its events go to
the request's ``sink`` (called on the engine thread): ``("token", piece)`` for each new piece of text, then
``("done", None)`` or ``("error", message)``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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
                 kv_cache: str = "float"):
        if model.processor is None:
            raise InputError("the model has no tokenizer (tokenizer.json); a server needs one")
        limit = model.config.text.max_position_embeddings
        max_seq_len = min(limit, 4096) if max_seq_len is None else max_seq_len
        if not 32 <= max_seq_len <= limit:
            raise InputError(f"--max-seq-len must be in 32..{limit} (the model's context), got {max_seq_len}")
        if max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise InputError(f"--max-queue must be >= 0, got {max_queue}")
        self.model, self.max_batch, self.max_seq_len, self.max_queue = model, max_batch, max_seq_len, max_queue
        rule = model._stop_rule(1, 0, None, 0)
        self.eos_ids, self.pad_id = rule.eos_ids, rule.pad_id
        self.pool = SlotPool(model.module, model.params, max_batch, max_seq_len, kv_int8=kv_cache == "int8")
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

    def warm_up(self) -> None:
        """Compile the decode step and the prefill of the smallest bucket (call before ``start``)."""
        ids = np.full((1, 1), self.pad_id, np.int32)
        done = threading.Event()
        self.submit(Request(ids, np.ones_like(ids), None, None, 2, sink=lambda k, v: k != "token" and done.set()))
        self._admit_waiting()
        while self.running:
            self._step()
        self.metrics.reset()

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
                free = [i for i, r in enumerate(self._rows) if r is None]
                if not free or not self._waiting:
                    return
                request = self._waiting.popleft()
                if request.cancelled:
                    continue
                row = request.row = free[0]
                self._rows[row] = request
            try:
                token = self._prefill(request, row)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(row, "error", f"internal error: {e}")
                if self.pool.lost():
                    self._fail_all(f"internal error: {e}")
                continue
            request.first_token_s = time.perf_counter() - request.submitted
            self.metrics.first_token(request.first_token_s, request.prompt_tokens)
            self._emit(row, token)

    def _prefill(self, request: Request, row: int) -> int:
        t = request.input_ids.shape[1]
        pad = bucket(t) - t
        ids = np.concatenate([np.full((1, pad), self.pad_id, np.int32), request.input_ids.astype(np.int32)], axis=1)
        mask = np.concatenate([np.zeros((1, pad), np.int32), request.attention_mask.astype(np.int32)], axis=1)
        return self.pool.admit(row, ids, mask, request.pixel_values, request.pixel_mask,
                               self._sampling([request], one=True))

    def _sampling(self, requests: list[Request | None], one: bool = False) -> RowSampling:
        temperature = np.array([r.temperature if r else 0.0 for r in requests], np.float32)
        top_p = np.array([r.top_p if r else 1.0 for r in requests], np.float32)
        keys = np.stack([_key_data(r.seed if r else 0) for r in requests])
        if one:
            return RowSampling(temperature[0], top_p[0], keys[0])
        return RowSampling(temperature, top_p, keys)

    def _step(self) -> None:
        with self._lock:
            for row, request in enumerate(self._rows):
                if request is not None and request.cancelled:
                    self._release(row, "cancelled")
            rows = list(self._rows)
        if not any(rows):
            return
        active = np.array([r is not None for r in rows])
        steps = np.array([len(r.generated.tokens) if r else 0 for r in rows], np.int32)
        start = time.perf_counter()
        tokens = self.pool.step(active, steps, self._sampling(rows))
        self.metrics.step(int(active.sum()), time.perf_counter() - start)
        for row, request in enumerate(rows):
            if request is not None and self._rows[row] is request:
                self._emit(row, int(tokens[row]))

    def _fail_all(self, message: str) -> None:
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, "error", message)
        self.pool.state = self.pool.empty()

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


@functools.lru_cache(maxsize=1024)
def _key_data(seed: int) -> np.ndarray:
    """``jax.random.key(seed)``'s data, as ``Aria.generate(seed=...)`` makes its key."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))
