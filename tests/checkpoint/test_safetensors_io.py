"""The safetensors reader against the `safetensors` library itself: the same files accepted with the same tensors,
the same files refused (overlapping or gapped offsets included), and nothing but CheckpointError on any bytes."""

import json
import os
import struct
import tempfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import time_limit
from hypothesis import given
from hypothesis import strategies as st

from aria_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, count_nonfinite

TENSORS = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([1, -2, 3], np.int32),
    "c": np.arange(4, dtype=np.float16),
    "d": np.zeros((0, 3), np.float32),
    "e": np.array([7], np.uint8),
}
VALID = safetensors.numpy.save(TENSORS)
_DIR = tempfile.mkdtemp(prefix="aria-jax-safetensors-")


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def ours(data: bytes) -> dict[str, np.ndarray]:
    """Our reader on ``data`` (through a file), every tensor read."""
    path = os.path.join(_DIR, "f.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    reader = SafetensorsFile(path)
    return {k: reader.read(k) for k in reader.keys()}


def library(data: bytes) -> dict[str, np.ndarray] | None:
    """The library's reading (its torch backend: every dtype, bfloat16 and float8 included), as numpy."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception:  # SafetensorError and friends: the library refuses the file
        return None
    out = {}
    for name, t in tensors.items():
        like = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
        if t.dtype in like:
            bits = {1: torch.uint8, 2: torch.int16}[t.element_size()]
            out[name] = t.view(bits).numpy().view(getattr(ml_dtypes, like[t.dtype]))
        else:
            out[name] = t.numpy()
    return out


def check_agrees(data: bytes) -> None:
    """Ours raises only CheckpointError; it accepts exactly what the library accepts, with equal tensors."""
    with time_limit(10):
        try:
            got = ours(data)
        except CheckpointError:
            got = None
    ref = library(data)
    assert (got is None) == (ref is None), ("ours accepts" if ref is None else "ours refuses", data[:200])
    if got is not None:
        assert got.keys() == ref.keys()
        for k in got:  # bitwise: NaN payloads included
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
            assert got[k].tobytes() == ref[k].tobytes()


def _offsets(edit):
    header, body = _split(VALID)
    edit(header)
    return _join(header, body)


def _shift(name, delta):
    return lambda h: h[name].update(data_offsets=[o + delta for o in h[name]["data_offsets"]])


LAYOUT_FAULTS = {
    "overlap": (lambda: _offsets(_shift("b", -4)), r"tensors '.*' and '.*' overlap"),
    "gap": (lambda: _offsets(_shift("e", 1)) + b"\0", r"1 unused bytes after tensor"),  # e moves one byte on
    "trailing_bytes": (lambda: VALID + b"\0" * 8, r"8 bytes after the last tensor"),
    "first_not_at_zero": (lambda: _join(_split(VALID)[0] | {"a": {"dtype": "F32", "shape": [1], "data_offsets":
                                                                   [4, 8]}}, _split(VALID)[1]), "unused bytes before"),
    "negative_offset": (lambda: _offsets(lambda h: h["a"].update(data_offsets=[-24, 0])), "corrupt header entry"),
    "float_offsets": (lambda: _offsets(lambda h: h["b"].update(data_offsets=[24.0, 36.0])), "corrupt header entry"),
    "huge_offsets": (lambda: _offsets(lambda h: h["b"].update(data_offsets=[24, 10**30])), "has .* bytes for shape"),
    "bool_shape": (lambda: _offsets(lambda h: h["e"].update(shape=[True])), "corrupt header entry"),
    "metadata_not_strings": (lambda: _offsets(lambda h: h.update(__metadata__={"format": 1})), "__metadata__"),
}


@pytest.mark.parametrize("fault", sorted(LAYOUT_FAULTS))
def test_offsets_must_tile_the_data_section_as_the_library_requires(fault):
    """Before: overlapping and gapped byte ranges were read without complaint."""
    make, message = LAYOUT_FAULTS[fault]
    data = make()
    assert library(data) is None  # the format's own reader refuses it
    with pytest.raises(CheckpointError, match=message):
        ours(data)


def test_valid_file_reads_like_the_library():
    check_agrees(VALID)
    check_agrees(safetensors.numpy.save({}))


def test_offsets_written_as_1e999_are_one_error(tmp_path):
    """Before: OverflowError (int(inf))."""
    header, body = _split(VALID)
    raw = json.dumps(header).replace('"data_offsets": [0, 24]', '"data_offsets": [0, 1e999]').encode()
    with pytest.raises(CheckpointError, match="corrupt header entry for tensor 'a'"):
        ours(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize("dtype, bits", [("float32", None), ("float16", None), ("bfloat16", None), ("float64", None),
                                         ("int32", "int")])
def test_count_nonfinite_on_every_float_dtype(dtype, bits):
    x = np.linspace(-3, 3, 3000).astype(np.dtype(dtype) if dtype != "bfloat16" else np.dtype("bfloat16"))
    if bits == "int":
        assert count_nonfinite(x) == 0
        return
    x[[5, 77, 2999]] = [np.nan, np.inf, -np.inf]
    assert count_nonfinite(x) == 3 == int((~np.isfinite(x.astype(np.float64))).sum())


# ---- fuzz: random and mutated files ----------------------------------------------------------------------------

@given(st.binary(max_size=400))
def test_random_bytes_only_raise_checkpoint_error(data):
    check_agrees(data)


@given(st.binary(min_size=8, max_size=8), st.binary(max_size=300))
def test_random_headers_with_a_plausible_length(length, rest):
    n = struct.unpack("<Q", length)[0] % (len(rest) + 1)
    check_agrees(struct.pack("<Q", n) + rest)


@given(st.data())
def test_mutated_valid_files(data):
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and raw:
            del raw[at]
        else:
            del raw[at:]
    check_agrees(bytes(raw))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@given(st.data())
def test_mutated_header_entries(data):
    header, body = _split(VALID)
    name = data.draw(st.sampled_from(sorted(TENSORS)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = data.draw(JSON_VALUES | st.sampled_from(["F32", "BF16", "I64", "F8_E4M3", "bogus"]) |
                      st.lists(st.integers(-3, 40), max_size=3))
    if field is None:
        header[name] = value
    else:
        header[name][field] = value
    check_agrees(_join(header, body))


@given(st.dictionaries(st.sampled_from(sorted(TENSORS)), st.integers(-12, 12), min_size=1), st.integers(-8, 8))
def test_shifted_offsets(shifts, extra):
    """Byte ranges moved (overlaps, gaps, ranges past the end) and the data section grown or cut."""
    header, body = _split(VALID)
    for name, delta in shifts.items():
        _shift(name, delta)(header)
    body = body + b"\x01" * extra if extra >= 0 else body[:extra]
    check_agrees(_join(header, body))
