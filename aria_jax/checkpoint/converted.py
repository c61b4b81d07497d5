"""Converted checkpoints: the params pytree as an Orbax PyTree checkpoint, written one tensor (or layer) at a time.

A converted directory holds ``config.json`` (``AriaConfig.to_dict()``), the tokenizer files and ``params/``,
a standard Orbax checkpoint (zarr arrays, no OCDBT) that ``ocp.PyTreeCheckpointer().restore`` reads with any
target sharding. Orbax saves whole ``jax.Array``s; to stream, ``ParamWriter`` writes the same zarr arrays
itself (each array's ``.zarray`` as tensorstore writes it, then the raw chunk files, layer slice by layer slice),
and then Orbax's metadata files. Chunks are one layer, one expert, one head and at most 4096 vocabulary rows, so
a device restoring its shard reads only that shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aria_jax.checkpoint.safetensors_io import DTYPES, CheckpointError
from aria_jax.errors import one_line
from aria_jax.files import read_json
from aria_jax.model.schema import contiguous
from aria_jax.quant import QuantSpec

PARAMS_DIR = "params"
QUANT_FILE = "quantization.json"  # a quantized converted directory's format (aria_jax.quant.QuantSpec.to_json)
_ONE_PER_CHUNK = ("layers", "expert", "q_heads", "kv_heads", "vision_heads")
_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"

Path = tuple[str, ...]


def stored_quantization(directory: str | os.PathLike) -> QuantSpec | None:
    """The quantization a converted directory's weights are stored in (its ``quantization.json``), or None."""
    file = os.path.join(directory, QUANT_FILE)
    if not os.path.isfile(file):
        return None
    data = read_json(file, CheckpointError)
    try:
        return QuantSpec.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a quantization record ({one_line(e)})") from None


def is_converted(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` was written by ``aria-jax convert`` (has an Orbax ``params/`` checkpoint)."""
    return os.path.isfile(os.path.join(directory, PARAMS_DIR, "_METADATA"))


def chunk_shape(shape: tuple[int, ...], logical: tuple[str | None, ...]) -> tuple[int, ...]:
    """Zarr chunks that split along every axis a mesh may shard, so each shard is read on its own."""
    chunks = []
    for size, axis in zip(shape, logical, strict=True):
        if axis in _ONE_PER_CHUNK:
            chunks.append(1)
        elif axis == "vocab":
            chunks.append(math.gcd(size, 4096))
        else:
            chunks.append(size)
    return tuple(chunks)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == jnp.bfloat16 else np.dtype(dtype).str


def zarr_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype) -> dict:
    """A zarr v2 ``.zarray`` for raw C-order chunks, as tensorstore writes it (uncompressed, "." separated keys)."""
    return {"chunks": list(chunks), "compressor": None, "dimension_separator": ".", "dtype": _zarr_dtype(dtype),
            "fill_value": None, "filters": None, "order": "C", "shape": list(shape), "zarr_format": 2}


def _leaves(tree: dict) -> dict[Path, object]:
    is_leaf = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def chunk_pieces(value: np.ndarray, chunks: tuple[int, ...], prefix: tuple[int, ...] = ()):
    """(zarr v2 chunk key, the value's block for it) for every chunk of ``value``; ``prefix`` indexes leading axes
    of one-element chunks (a layer slice of a stacked parameter)."""
    grid = [range(0, size, step) for size, step in zip(value.shape, chunks, strict=True)]
    for starts in itertools.product(*grid):
        block = value[tuple(slice(a, a + c) for a, c in zip(starts, chunks, strict=True))]
        index = prefix + tuple(a // c for a, c in zip(starts, chunks, strict=True))
        yield ".".join(map(str, index)) or "0", block


def _write_chunk(path: str, block: np.ndarray, dtype: np.dtype) -> None:
    data = contiguous(block, dtype)
    with open(path, "wb") as f:
        f.write(data.reshape(-1).view(np.uint8))


def contiguous_chunks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    """Whether every chunk is one contiguous byte range of the C-order value: chunks of one element along the
    leading axes, then at most one split axis, then whole axes (chunk j then holds bytes [j, j + 1) x chunk size)."""
    axis = 0
    while axis < len(shape) and chunks[axis] == 1:
        axis += 1
    return all(c == n for c, n in zip(chunks[axis + 1:], shape[axis + 1:], strict=True))


def _kernel_copy(copy, fin: int, fout: int, offset: int, size: int) -> int:
    """Bytes copied by ``copy(fin, fout, count, offset)`` (copy_file_range or sendfile) until done or end of file."""
    done = 0
    with contextlib.suppress(OSError):  # not supported here (kernel, filesystems, platform): the caller goes on
        while done < size:
            n = copy(fin, fout, size - done, offset + done)
            if n == 0:
                break
            done += n
    return done


def _copy_chunk(src: str, offset: int, size: int, path: str) -> None:
    """``size`` bytes of ``src`` from ``offset`` into a new file ``path``, in the kernel where it can:
    ``copy_file_range`` (one filesystem; reflinks where it has them), else ``sendfile`` (across filesystems,
    e.g. a disk to tmpfs), else read and write."""
    with open(src, "rb", buffering=0) as fin, open(path, "wb", buffering=0) as fout:
        i, o = fin.fileno(), fout.fileno()
        done = 0
        if hasattr(os, "copy_file_range"):  # Linux
            done = _kernel_copy(lambda i, o, n, at: os.copy_file_range(i, o, n, at), i, o, offset, size)
        if done < size and hasattr(os, "sendfile"):
            done += _kernel_copy(lambda i, o, n, at: os.sendfile(o, i, at, n), i, o, offset + done, size - done)
        if done < size:
            fin.seek(offset + done)
            while done < size:
                block = fin.read(min(size - done, 64 << 20))
                if not block:
                    break
                fout.write(block)
                done += len(block)
        if done < size:
            raise CheckpointError(f"{src}: truncated file: {size - done} bytes missing at offset {offset + done}")


def _is_quantized_leaf(path: Path) -> bool:
    """A quantized weight's ``_q`` values or ``_scale``s (aria_jax.quant): stored in their own dtypes."""
    return path[-1].endswith(("_q", "_scale"))


class ParamWriter:
    """Writes params into ``directory/params`` as an Orbax checkpoint, one tensor or one layer slice per call.

    Each zarr array gets its ``.zarray``; the chunk files, raw C-order bytes as zarr v2 stores them
    uncompressed, are written by two threads. ``write`` waits for the previous value's chunks before it
    queues the next, so host memory holds the value being written and the one being prepared, never the tree.
    """

    def __init__(self, directory: str, param_shapes: dict, logical: dict, dtype: jnp.dtype | None = None):
        """``param_shapes`` and ``logical``: the trees of ``schema.declared_params`` (or
        ``sharding.abstract_params``). Each parameter is stored in its leaf's dtype (a quantized model's ``_q``
        int8/uint8 values and float32 ``_scale``s beside the float weights), or in ``dtype`` when it is given."""
        self.root = os.path.join(directory, PARAMS_DIR)
        os.makedirs(self.root, exist_ok=True)
        leaves = _leaves(param_shapes)
        self.shapes = {p: s.shape for p, s in leaves.items()}
        self.dtypes = {p: np.dtype(s.dtype if dtype is None or _is_quantized_leaf(p) else dtype)
                       for p, s in leaves.items()}
        self.chunks = {p: chunk_shape(self.shapes[p], tuple(spec)) for p, spec in _leaves(logical).items()}
        self._created: set[Path] = set()
        self._written: dict[Path, set[int | None]] = {}
        self._pool = ThreadPoolExecutor(2, "aria-write")
        self._pending: list[Future] = []

    def _array(self, path: Path) -> str:
        """The zarr array's directory, created (with its ``.zarray``) on first use."""
        directory = os.path.join(self.root, ".".join(path))
        if path not in self._created:
            os.makedirs(directory, exist_ok=True)
            meta = zarr_metadata(self.shapes[path], self.chunks[path], self.dtypes[path])
            _dump(os.path.join(directory, ".zarray"), meta)
            self._created.add(path)
        return directory

    def write(self, path: Path, layer: int | None, value: np.ndarray) -> None:
        """Write a whole parameter (``layer`` None) or one slice of a stacked one."""
        if path not in self.shapes:
            raise CheckpointError(f"{self.root}: no parameter {'.'.join(path)} in this model")
        expected = self.shapes[path] if layer is None else self.shapes[path][1:]
        if value.shape != expected:
            raise CheckpointError(f"parameter {'.'.join(path)}: value of shape {value.shape}, expected {expected}")
        directory = self._array(path)
        chunks, prefix = (self.chunks[path], ()) if layer is None else (self.chunks[path][1:], (layer,))
        self.wait()
        self._pending = [
            self._pool.submit(_write_chunk, os.path.join(directory, key), block, self.dtypes[path])
            for key, block in chunk_pieces(np.asarray(value), chunks, prefix)
        ]
        self._written.setdefault(path, set()).add(layer)

    def can_copy(self, path: Path, layer: int | None, dtype: np.dtype) -> bool:
        """Whether ``copy_file`` can write this parameter (or layer slice) straight from a source file's bytes."""
        if path not in self.shapes or np.dtype(dtype) != self.dtypes[path]:
            return False
        shape, chunks = self.shapes[path], self.chunks[path]
        if layer is not None:
            shape, chunks = shape[1:], chunks[1:]
        return contiguous_chunks(shape, chunks)

    def copy_file(self, path: Path, layer: int | None, src: str, offset: int, size: int) -> None:
        """Like ``write`` for a value whose bytes are ``size`` bytes of file ``src`` at ``offset`` (C order, the
        parameter's dtype; see ``can_copy``): each chunk file is copied file to file, no bytes pass through Python."""
        shape, chunks = self.shapes[path], self.chunks[path]
        prefix: tuple[int, ...] = ()
        if layer is not None:
            shape, chunks, prefix = shape[1:], chunks[1:], (layer,)
        itemsize = self.dtypes[path].itemsize
        if size != math.prod(shape) * itemsize:
            raise CheckpointError(f"parameter {'.'.join(path)}: {size} source bytes, expected shape {shape}")
        directory = self._array(path)
        chunk_bytes = math.prod(chunks) * itemsize
        grid = [range(n // c) for n, c in zip(shape, chunks, strict=True)]
        self.wait()
        self._pending = [
            self._pool.submit(_copy_chunk, src, offset + j * chunk_bytes, chunk_bytes,
                              os.path.join(directory, ".".join(map(str, prefix + index)) or "0"))
            for j, index in enumerate(itertools.product(*grid))
        ]
        self._written.setdefault(path, set()).add(layer)

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def abandon(self) -> None:
        """After a failure: let queued chunk writes finish (so nothing writes into a removed directory), quietly."""
        for future in self._pending:
            future.exception()
        self._pending = []
        self._pool.shutdown()

    def close(self) -> None:
        """Finish pending writes, check every parameter was written in full, write Orbax's metadata."""
        self.wait()
        self._pool.shutdown()
        for path, shape in self.shapes.items():
            done = self._written.get(path, set())
            if None not in done and len(done) != shape[0]:
                raise CheckpointError(f"{self.root}: parameter {'.'.join(path)} was not written in full")
        self._write_metadata()

    def _write_metadata(self) -> None:
        tree, arrays = {}, []
        for path, chunks in self.chunks.items():
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(chunks)},
            }
            arrays.append(
                {
                    "array_metadata": {
                        "param_name": ".".join(path),
                        "write_shape": list(chunks),
                        "chunk_shape": list(chunks),
                        "ext_metadata": None,
                    }
                }
            )
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": False,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        os.makedirs(os.path.join(self.root, "array_metadatas"), exist_ok=True)
        _dump(os.path.join(self.root, "array_metadatas", "process_0"), {"array_metadatas": arrays})
        now = time.time_ns()
        _dump(
            os.path.join(self.root, "_CHECKPOINT_METADATA"),
            {
                "item_handlers": _HANDLER,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": now,
                "commit_timestamp_nsecs": now,
                "custom_metadata": {},
            },
        )
        _dump(os.path.join(self.root, "_METADATA"), meta)  # last: its presence marks a finished checkpoint


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One zarr array of a converted directory, as its ``.zarray`` describes it."""

    name: str  # "language_model.layers.mlp.gate_up": the params path joined by "."
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    compressed: bool

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize

    def chunk_keys(self) -> Iterator[str]:
        """Every chunk's file name (zarr v2, "." separated; "0" for a 0-d array)."""
        grid = [range(-(-n // c)) for n, c in zip(self.shape, self.chunks, strict=True)]
        for index in itertools.product(*grid):
            yield ".".join(map(str, index)) or "0"


def _tree_names(root: str) -> list[str]:
    """Parameter names from Orbax's ``_METADATA`` (its tree of key paths), checked to be well formed."""
    file = os.path.join(root, "_METADATA")
    meta = read_json(file, CheckpointError)
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{file}: not an Orbax checkpoint's metadata (no tree_metadata)")
    names = []
    for entry in tree.values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not keys or not all(
            isinstance(k, dict) and isinstance(k.get("key"), str) and k["key"] and "." not in k["key"] for k in keys
        ):
            raise CheckpointError(f"{file}: malformed entry in tree_metadata ({str(entry)[:80]})")
        names.append(".".join(k["key"] for k in keys))
    return names


def _stored_array(root: str, name: str) -> StoredArray:
    file = os.path.join(root, name, ".zarray")
    meta = read_json(file, CheckpointError)
    is_size = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    ok = isinstance(meta, dict) and meta.get("zarr_format") == 2 and meta.get("order", "C") == "C"
    shape, chunks = (meta.get("shape"), meta.get("chunks")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(is_size(n, 0) for n in shape)
    ok = ok and isinstance(chunks, list) and len(chunks) == len(shape) and all(is_size(c, 1) for c in chunks)
    ok = ok and meta.get("dimension_separator", ".") == "." and meta.get("filters") is None
    if not ok:
        raise CheckpointError(f"{file}: not a zarr v2 array description this reader understands")
    try:
        dtype = np.dtype(jnp.dtype(meta["dtype"])) if isinstance(meta.get("dtype"), str) else None
    except (TypeError, ValueError):
        dtype = None
    if dtype not in DTYPES.values():
        raise CheckpointError(f"{file}: unknown dtype {meta.get('dtype')!r}")
    return StoredArray(name, tuple(shape), tuple(chunks), dtype, meta.get("compressor") is not None)


def stored_arrays(directory: str | os.PathLike) -> dict[str, StoredArray]:
    """Every array of a converted directory's params checkpoint, read from its metadata files (no array data).

    Read here rather than through Orbax, whose errors on a damaged file are AttributeErrors and tensorstore
    messages: every problem is a ``CheckpointError`` naming the file.
    """
    root = os.path.join(os.fspath(directory), PARAMS_DIR)
    return {name: _stored_array(root, name) for name in _tree_names(root)}


def check_chunks(directory: str | os.PathLike, arrays: Iterable[StoredArray]) -> None:
    """Every chunk file of ``arrays`` exists and (uncompressed) holds exactly one chunk's bytes; tensorstore would
    read a missing chunk as zeros and a short one as an error deep in a restore."""
    root = os.path.join(os.fspath(directory), PARAMS_DIR)
    for array in arrays:
        folder = os.path.join(root, array.name)
        try:
            sizes = {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
        except OSError as e:
            raise CheckpointError(f"{folder}: cannot read ({e.strerror})") from None
        for key in array.chunk_keys():
            if key not in sizes:
                raise CheckpointError(f"{root}: parameter '{array.name}': chunk file {key} is missing")
            if not array.compressed and sizes[key] != array.chunk_bytes:
                raise CheckpointError(
                    f"{root}: parameter '{array.name}': chunk file {key} has {sizes[key]} bytes, "
                    f"expected {array.chunk_bytes} (truncated or corrupt)"
                )


def check_stored(directory: str | os.PathLike, param_shapes: dict) -> dict[str, StoredArray]:
    """The directory's arrays, checked to be exactly ``param_shapes`` (names and shapes) with every chunk whole."""
    root = os.path.join(os.fspath(directory), PARAMS_DIR)
    stored = stored_arrays(directory)
    expected = {".".join(p): s.shape for p, s in _leaves(param_shapes).items()}
    for name, shape in expected.items():
        if name not in stored:
            raise CheckpointError(f"{root}: missing parameter '{name}'")
        if stored[name].shape != shape:
            raise CheckpointError(
                f"{root}: parameter '{name}' has shape {list(stored[name].shape)}, config.json implies {list(shape)}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{root}: unexpected parameter '{extra[0]}' (not part of this Aria config)")
    check_chunks(directory, stored.values())
    return stored


def stored_params(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of every array in a converted directory's Orbax checkpoint."""
    return {name: (a.shape, a.dtype) for name, a in stored_arrays(directory).items()}


def restore_params(directory: str | os.PathLike, param_shapes: dict, shardings: dict | None = None) -> dict:
    """Restore the params of a converted directory as ``param_shapes`` (its dtype) placed on ``shardings``.

    Without ``shardings`` everything lands on the first device. Each device reads only its own shard. The metadata
    and every chunk file are checked first (``stored_arrays``, ``check_chunks``): a damaged directory is one
    ``CheckpointError`` naming the file or parameter.
    """
    directory = os.fspath(directory)
    root = os.path.join(directory, PARAMS_DIR)
    check_stored(directory, param_shapes)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, param_shapes)
    restore_args = jax.tree.map(
        lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape, dtype=s.dtype), param_shapes, shardings
    )
    try:
        return ocp.PyTreeCheckpointer().restore(root, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # Orbax / tensorstore raise many types for files damaged past what was checked above
        raise CheckpointError(f"{root}: cannot restore ({type(e).__name__}: {one_line(e)})") from None
