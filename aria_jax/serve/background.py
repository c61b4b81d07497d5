"""An app served by uvicorn in a background thread (tests, benchmarks): on a free port of 127.0.0.1 by default."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` for the block; yields its base URL (``http://host:port``)."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="aria-jax-http", daemon=True)
    thread.start()
    try:
        end = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
