"""A small safetensors reader on numpy memory maps: bfloat16 included, one tensor at a time, strict checks.

The ``safetensors`` package's numpy backend cannot return bfloat16, and its errors do not always name the file;
this reader validates the header against the file size and names the file and tensor in every error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from aria_jax.errors import InputError
from aria_jax.files import read_json

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Floating dtypes -> (unsigned view, bits that are all set exactly in NaN and infinity). float8_e4m3fn has no
# infinity; its NaN is S.1111.111.
_NONFINITE_BITS: dict[np.dtype, tuple[np.dtype, int]] = {
    DTYPES["F64"]: (np.dtype(np.uint64), 0x7FF0_0000_0000_0000),
    DTYPES["F32"]: (np.dtype(np.uint32), 0x7F80_0000),
    DTYPES["F16"]: (np.dtype(np.uint16), 0x7C00),
    DTYPES["BF16"]: (np.dtype(np.uint16), 0x7F80),
    DTYPES["F8_E4M3"]: (np.dtype(np.uint8), 0x7F),
    DTYPES["F8_E5M2"]: (np.dtype(np.uint8), 0x7C),
}
_SCAN_ELEMENTS = 1 << 20  # per block: the masks' temporaries stay in cache (~10 GB/s on one core)


def count_nonfinite(array: np.ndarray) -> int:
    """How many NaN or infinite values ``array`` holds (0 for integer dtypes), in cache-sized blocks."""
    view = _NONFINITE_BITS.get(array.dtype)
    if view is None or array.size == 0:
        return 0
    bits_dtype, mask = view
    bits = np.ascontiguousarray(array).reshape(-1).view(bits_dtype)
    mask = bits_dtype.type(mask)
    return sum(
        int(np.count_nonzero((bits[i : i + _SCAN_ELEMENTS] & mask) == mask))
        for i in range(0, bits.size, _SCAN_ELEMENTS)
    )


class CheckpointError(InputError):
    """A checkpoint file or tensor that cannot be used; the message names the file and tensor."""


class SafetensorsFile:
    """Lazy view of one ``.safetensors`` file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)`` (a memmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (length {header_len})")
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw)
        except RecursionError:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (JSON nested too deeply)") from None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, integers of over 4300 digits
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not an object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ is not a map of strings)")
        self.metadata = metadata
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self._entries[key] = self._entry(key, info, size - self._data_start)
        self._check_tiling(size - self._data_start)

    def _entry(self, key: str, info, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """One header entry, checked: a known dtype, a shape of integers >= 0, two integer offsets that hold exactly
        the shape's bytes inside the data section."""
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in DTYPES
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(map(is_int, shape))
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
        if not ok:
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor '{key}'")
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(shape), offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{self.path}: tensor '{key}' has {end - begin} bytes for shape {shape}")
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{key}' ends at byte {end} of {data_size} data bytes"
            )
        return dtype, shape, begin, end

    def _check_tiling(self, data_size: int) -> None:
        """The tensors' byte ranges must tile the data section exactly, in order (as the format and the
        ``safetensors`` library require): no overlap, no gap, nothing after the last one."""
        at, previous = 0, None
        for key, (_, _, begin, end) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if begin < at:
                raise CheckpointError(f"{self.path}: tensors '{previous}' and '{key}' overlap (bytes {begin}-{at})")
            if begin > at:
                after = f"after tensor '{previous}'" if previous else "before the first tensor"
                raise CheckpointError(f"{self.path}: {begin - at} unused bytes {after} (a corrupt header)")
            at, previous = end, key
        if at != data_size:
            raise CheckpointError(f"{self.path}: {data_size - at} bytes after the last tensor (a corrupt header)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def byte_range(self, key: str) -> tuple[int, int]:
        """(absolute file offset, byte count) of the tensor's data."""
        _, _, begin, end = self._entries[key]
        return self._data_start + begin, end - begin

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy until it is used)."""
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def count_nonfinite(self, key: str, block_bytes: int = 16 << 20) -> int:
        """NaN / infinite values of a tensor, read in blocks through one reused buffer (nothing kept in memory)."""
        dtype, _, begin, end = self._entries[key]
        if dtype not in _NONFINITE_BITS:
            return 0
        buffer = np.empty(block_bytes - block_bytes % dtype.itemsize, np.uint8)
        found = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            for start in range(begin, end, buffer.size):
                block = buffer[: min(buffer.size, end - start)]
                self._fill(f, block, key)
                found += count_nonfinite(block.view(dtype))
        return found

    def _fill(self, f, block: np.ndarray, key: str) -> None:
        view = memoryview(block)
        done = 0
        while done < block.size:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.path}: truncated file while reading tensor '{key}'")
            done += n

    def read(self, key: str) -> np.ndarray:
        """The tensor as an owned array, read with one sequential ``readinto`` (faster than faulting a memmap)."""
        dtype, shape, begin, _ = self._entries[key]
        out = np.empty(shape, dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            self._fill(f, out.reshape(-1).view(np.uint8), key)
        return out


def open_checkpoint(directory: str | os.PathLike) -> dict[str, SafetensorsFile]:
    """Map every tensor name of an HF safetensors directory (single file or sharded with an index) to its file."""
    directory = os.fspath(directory)
    index_file = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        index = read_json(index_file, CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: not a valid safetensors index (no weight_map)")
        files: dict[str, SafetensorsFile] = {}
        tensors: dict[str, SafetensorsFile] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
                raise CheckpointError(f"{index_file}: tensor '{key}' maps to {name!r}, not a file in this directory")
            path = os.path.join(directory, name)
            if name not in files:
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard listed in {index_file} is missing")
                files[name] = SafetensorsFile(path)
            if key not in files[name]._entries:
                raise CheckpointError(f"{path}: tensor '{key}' listed in the index is not in this shard")
            tensors[key] = files[name]
        return tensors
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")) if os.path.isdir(directory) else []
    if not names:
        pickles = (
            [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
            if os.path.isdir(directory)
            else []
        )
        hint = f" (found {pickles[0]}: pickled checkpoints are not loaded; convert to safetensors)" if pickles else ""
        raise CheckpointError(f"{directory}: no .safetensors files{hint}")
    return index_tensors(SafetensorsFile(os.path.join(directory, name)) for name in names)


def index_tensors(files) -> dict:
    """Tensor name -> the file (any reader with ``keys()`` and ``path``) holding it; a name in two files fails."""
    tensors: dict = {}
    for file in files:
        for key in file.keys():
            if key in tensors:
                raise CheckpointError(f"{file.path}: tensor '{key}' also appears in {tensors[key].path}")
            tensors[key] = file
    return tensors


DTYPE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def safetensors_header(entries: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """The 8-byte length + JSON header of a file holding ``entries`` (name, dtype, shape) back to back."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike, entries: list[tuple[str, np.dtype, tuple[int, ...]]], arrays: Iterator[np.ndarray]
) -> None:
    """Write a safetensors file whose header is known up front, one tensor at a time from ``arrays``."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(safetensors_header(entries))
        for (name, dtype, shape), array in zip(entries, arrays, strict=True):
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise CheckpointError(
                    f"{path}: tensor '{name}' is {array.dtype}{list(array.shape)}, header says "
                    f"{np.dtype(dtype)}{list(shape)}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


