"""The project's error type for bad input, the base of every module's own (ConfigError, CheckpointError, ...).

A bad file, key or value raises a subclass of ``InputError`` whose message is one line naming it; every command
line prints that line and exits with status 2. Anything else that escapes is a bug in aria-jax.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, key or value that cannot be used. The message is one line naming it."""


class ImageError(InputError):
    """An image file that cannot be read: missing, empty, truncated, not an image, or too large (a decompression
    bomb)."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (the class name when it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` for an OSError (``[Errno 30] Read-only file system: 'x'`` -> ``x: Read-only file system``)."""
    reason = exc.strerror or one_line(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason
