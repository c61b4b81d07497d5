"""``aria-jax serve``: an OpenAI-compatible chat server with continuous batching over a fixed pool of KV-cache rows.

protocol (requests in, responses out) -> app (HTTP: FastAPI) -> engine (one background thread: admits requests into
free rows, steps every running row) -> pool (the compiled programs: a one-row prefill into a row, one decode step for
the whole pool) with sampling (per-row temperature / top-p / seed) and sequence (a request's tokens, text and stop
rules); media turns image parts into images; metrics renders Prometheus text.
"""
