"""Files the user gave us and files we write: JSON that cannot crash us, atomic writes, staged output directories
that never touch their sources, and model directories or hub ids resolved with one-line errors.

Why by hand: the guarantees here (refuse an output that overlaps its source, replace a directory only once the new
one is complete, recover from a process killed mid-swap, never follow a symlink out of the output) are not what
``tempfile`` or ``shutil`` offer; they are small, and every command that writes shares them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from aria_jax.errors import InputError, one_line

HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken")


class ModelNotFoundError(InputError, FileNotFoundError):
    """A model path that is neither a directory nor a hub id that can be fetched."""


# ---------------------------------------------------------------------------------------------------- JSON


def parse_json(raw: bytes | str, where: str, error: type[Exception] = InputError) -> Any:
    """``json.loads`` whose every failure (syntax, encoding, nesting depth, huge integers) is ``error`` naming
    ``where``."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise error(f"{where}: not valid JSON ({one_line(e)})") from None


def read_json(path: str | os.PathLike, error: type[Exception] = InputError) -> Any:
    """A JSON file's content; unreadable or malformed files raise ``error`` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or one_line(e)})") from None
    return parse_json(raw, path, error)


# ---------------------------------------------------------------------------------------------------- writing


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, flushed to disk, then renamed over it."""
    path = os.path.abspath(os.fspath(path))
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600 files; keep what `open(path, "w")` would give
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(path: str) -> int:
    """The permission bits of the file ``path`` replaces, or for a new file 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent))


def check_writable_file(path: str | os.PathLike, error: type[Exception] = InputError) -> None:
    """Fail now, naming ``path``, if a file cannot be written there later: its directory missing or not a directory,
    the path a directory, or the directory not writable (read-only file system, permissions)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise error(f"{path}: is a directory")
    if not os.path.isdir(directory):
        raise error(f"{path}: directory {directory} does not exist")
    try:  # os.access ignores read-only mounts for some file systems; creating a file does not
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".probe", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise error(f"{path}: cannot write ({e.strerror or one_line(e)})") from None


# ---------------------------------------------------------------------------------------------------- sizes

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str, error: type[Exception] = InputError, unit_required: bool = False) -> int:
    """``"5GB"`` -> 5_000_000_000: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB of 2 (as transformers and
    accelerator data sheets read them), any case; bytes without a unit unless ``unit_required``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0 or (unit_required and not match.group(2)):
        raise error(f"{flag} '{text}': expected a positive size like 5GB, 500MB or 16GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


# ---------------------------------------------------------------------------------------------------- staging

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# ".NAME.partial-HOST-PID" / ".NAME.old-HOST-PID" (and the older ".NAME.partial-PID" without a host)
_STAGING = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)")


def staging_path(dst: str, kind: str) -> str:
    """``.NAME.partial-HOST-PID`` (the output being written) or ``.NAME.old-HOST-PID`` (the output it replaces)
    beside ``dst``. The host keeps processes on other machines sharing the file system apart."""
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{kind}-{_HOST}-{os.getpid()}")


def is_within(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or below it (both already resolved)."""
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def refuse_overlap(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``dst`` may not be ``src``, contain it or lie inside it, nor contain the working directory (symlinks and
    relative paths resolved): replacing it would destroy the input, or the directory the user stands in."""
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if d == s:
        raise InputError(f"{dst}: is the source {src}; choose another output directory")
    if is_within(s, d):
        raise InputError(f"{dst}: contains the source {src}; choose another output directory")
    if is_within(d, s):
        raise InputError(f"{dst}: lies inside the source {src}; choose an output directory outside it")
    if os.path.lexists(dst) and is_within(os.path.realpath(os.getcwd()), d):
        raise InputError(f"{dst}: contains the working directory; choose another output directory")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_path(path: str) -> None:
    """Remove a file, a symlink (never its target) or a directory tree (links inside are removed, not followed)."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(dst: str) -> list[str]:
    """Remove what killed runs left beside ``dst`` (staging directories of dead processes on this host); a run
    killed between moving the old ``dst`` aside and moving the new one in gets the old ``dst`` back. Returns notes."""
    parent, name = os.path.dirname(dst), os.path.basename(dst)
    notes = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return notes
    for entry in entries:
        match = _STAGING.fullmatch(entry)
        if not match or match["name"] != name or match["host"] not in (None, _HOST) or _alive(int(match["pid"])):
            continue
        path = os.path.join(parent, entry)
        if match["kind"] == "old" and not os.path.lexists(dst):
            os.rename(path, dst)
            notes.append(f"{dst}: restored from {entry} (a run replacing it was killed)")
        else:
            remove_path(path)
            notes.append(f"{dst}: removed {entry} (left by a killed run, process {match['pid']})")
    return notes


def _created_parents(directory: str) -> list[str]:
    """The missing directories on the way to ``directory``, deepest first."""
    missing = []
    while not os.path.isdir(directory):
        if os.path.lexists(directory):
            raise InputError(f"{directory}: exists and is not a directory")
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, overwrite: bool, sources: Iterable[str] = ()) -> Iterator[str]:
    """A temporary directory beside ``dst`` to write into; renamed to ``dst`` once the block completes, removed on
    any failure.

    Before anything is touched: ``dst`` may not overlap a source (``refuse_overlap``), and must not exist unless
    ``overwrite``. With ``overwrite`` the existing ``dst`` is moved aside only after the new output is complete,
    and removed as the very last step (a symlink ``dst`` is unlinked, never followed). Leftovers of killed runs are
    cleaned first (``clean_stale``). An OSError while writing becomes one line naming ``dst``.
    """
    dst = os.path.abspath(os.fspath(dst))
    for src in sources:
        refuse_overlap(src, dst)
    parent = os.path.dirname(dst)
    missing = _created_parents(parent)
    for note in clean_stale(dst):
        print(f"aria-jax: {note}", file=sys.stderr)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
    tmp = staging_path(dst, "partial")
    try:
        os.makedirs(parent, exist_ok=True)
        remove_path(tmp)
        os.mkdir(tmp)
    except OSError as e:
        _remove_created(missing)
        raise InputError(f"{dst}: cannot create ({e.strerror or one_line(e)})") from None
    try:
        yield tmp
    except BaseException as e:
        remove_path(tmp)
        _remove_created(missing)
        if isinstance(e, OSError) and (e.filename is None or is_within(os.path.abspath(str(e.filename)), tmp)):
            raise InputError(f"{dst}: cannot write ({e.strerror or one_line(e)})") from None
        raise
    old = staging_path(dst, "old") if os.path.lexists(dst) else None
    try:
        if old is not None:
            os.rename(dst, old)  # a symlink is moved as the link itself
        try:
            os.rename(tmp, dst)
        except OSError:
            if old is not None:
                os.rename(old, dst)  # the previous output back in place
            raise
    except OSError as e:
        remove_path(tmp)
        raise InputError(f"{dst}: cannot move the new output into place ({e.strerror or one_line(e)})") from None
    if old is not None:
        remove_path(old)


def _remove_created(directories: list[str]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


# ---------------------------------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_model(path_or_hub_id: str | os.PathLike, revision: str | None = None,
                  patterns: Iterable[str] = HUB_PATTERNS) -> str:
    """A local directory as it is; a hub id like ``rhymes-ai/Aria`` downloaded (only files matching ``patterns``)
    with huggingface_hub, which honours ``HF_HUB_OFFLINE`` (then only the local cache is used).

    Anything else, and every hub failure (no such repository or revision, gated, offline and not cached, HTTP
    errors), raises ``ModelNotFoundError`` with one line naming the path or id.
    """
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or not _HUB_ID.fullmatch(path) or ".." in path:
        raise ModelNotFoundError(f"{path}: not a model directory (and not a hub id like 'rhymes-ai/Aria')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, allow_patterns=list(patterns))
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, gated, not found): one line each
        raise ModelNotFoundError(f"{path}: cannot fetch from the hub ({_hub_reason(e, revision)})") from None


_HUB_REASONS = {  # by class name (the classes moved between huggingface_hub versions); the most specific first
    "GatedRepoError": "a gated repository: accept its terms on huggingface.co and log in (`hf auth login`)",
    "RepositoryNotFoundError": "no such repository, or a private one you are not logged in for",
    "RevisionNotFoundError": "no revision {revision!r} in this repository",
    "LocalEntryNotFoundError": "not in the local cache, and the hub cannot be reached (offline or HF_HUB_OFFLINE=1)",
    "OfflineModeIsEnabled": "not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading",
}


def _hub_reason(exc: Exception, revision: str | None) -> str:
    names = [cls.__name__ for cls in type(exc).__mro__]
    for name, reason in _HUB_REASONS.items():
        if name in names:
            return f"{type(exc).__name__}: {reason.format(revision=revision)}"
    return f"{type(exc).__name__}: {one_line(exc)}"


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json", "quantization.json")


TOKENIZER_FILES = ("*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer, processor, chat-template and generation files (everything but weights and config)."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        if any(fnmatch.fnmatch(name, p) for p in WEIGHT_FILES):
            continue
        if any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
