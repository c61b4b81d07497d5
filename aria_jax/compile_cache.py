"""JAX's persistent compilation cache for the command lines (``aria-jax``, ``train.py``): a second run on the same
model, shapes and JAX loads its compiled programs (prefill, decode, the training step) from disk instead of
compiling them again.

The cache lives in ``$XDG_CACHE_HOME/aria-jax/xla`` (``~/.cache/aria-jax/xla``); a ``JAX_COMPILATION_CACHE_DIR``
the user set is used instead. ``--no-compile-cache`` or ``ARIA_JAX_NO_COMPILE_CACHE=1`` turns it off. Entries are
keyed by the program, the JAX/XLA version, the devices and the compiler flags, so one directory serves every JAX
install and platform. A directory that cannot be created or written leaves the cache off; it never fails a run.
"""

from __future__ import annotations

import importlib.util
import os

import jax

FLAG = "--no-compile-cache"
OFF_ENV = "ARIA_JAX_NO_COMPILE_CACHE"
# Every compiled program is written, however quickly it compiled (JAX's default is 1 s): on CPU the prefill and decode
# steps of a small model compile in well under a second, and with the small eager ops cached too a second start
# compiles nothing (the tiny model's generate: 28 entries, 0.5 MB). The size limit below bounds the directory.
MIN_COMPILE_SECS = 0.0
MAX_BYTES = 4 << 30  # least recently used entries go beyond this (JAX's own default is no limit)


def default_dir() -> str:
    """``$XDG_CACHE_HOME/aria-jax/xla``, or ``~/.cache/aria-jax/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aria-jax", "xla")


def switched_off(flag: bool = False) -> bool:
    """True when ``--no-compile-cache`` was given or ``ARIA_JAX_NO_COMPILE_CACHE`` is set to anything but 0/false."""
    return flag or os.environ.get(OFF_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def strip_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--no-compile-cache`` (anywhere in it), and whether it was there."""
    rest = [a for a in argv if a != FLAG]
    return rest, len(rest) != len(argv)


def enable(off: bool = False) -> str | None:
    """Turn JAX's persistent compilation cache on (before anything compiles); returns its directory, or None when
    it is off (``off``, the environment variable, or a directory that cannot be written)."""
    if switched_off(off):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir or default_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:  # a read-only home, a file in the way: run without the cache rather than fail in the compiler
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    settings = [("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)]
    if importlib.util.find_spec("filelock") is not None:  # JAX's eviction needs it (huggingface_hub brings it)
        settings.append(("jax_compilation_cache_max_size", MAX_BYTES))
    for name, value in settings:
        if name.upper() not in os.environ:  # the user's JAX_... setting wins
            jax.config.update(name, value)
    return directory
