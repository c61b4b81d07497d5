"""``aria-jax convert``: an HF Aria checkpoint (any key layout, or a hub id) -> a converted Orbax directory.

Everything that can be checked from file headers (layout, names, shapes, dtypes) is checked before a byte
is written. Tensors are then streamed in file order, one at a time, scanned for NaN / infinity, transformed and
cast on the host and written straight into the Orbax checkpoint. All output goes to a temporary directory beside
DST that is renamed at the end (``files.staged_directory``), so a failure leaves nothing behind, and DST may never
overlap SRC.

With a quantization (``--quantize int8|int4``, aria_jax.quant) every weight it covers is quantized on the host one
layer of one tensor at a time (``hf_keys.quantized_targets``) and stored as its ``_q``/``_scale`` pair (int4 packed
two per byte); the directory records the format in ``quantization.json`` (``converted.QUANT_FILE``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from tqdm.auto import tqdm

from aria_jax.checkpoint.converted import QUANT_FILE, ParamWriter
from aria_jax.checkpoint.hf_keys import Item, plan_tensors, quantized_targets
from aria_jax.checkpoint.safetensors_io import (
    DTYPES,
    CheckpointError,
    SafetensorsFile,
    count_nonfinite,
    index_tensors,
    open_checkpoint,
)
from aria_jax.config import AriaConfig, resolve_dtype
from aria_jax.files import HUB_PATTERNS, copy_tokenizer_files, refuse_overlap, resolve_model, staged_directory
from aria_jax.model.schema import declared_params
from aria_jax.parallel.sharding import param_shardings
from aria_jax.quant import QuantSpec, parse, quantized_weight

PICKLES = (".bin", ".pt", ".pth")


class PickleFile:
    """A pickled torch state dict, loaded with ``torch.load(weights_only=True, mmap=True)``; reader interface."""

    def __init__(self, path: str):
        import torch

        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"{path}: cannot load pickled checkpoint ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self._state = state
        self._order = {k: i for i, k in enumerate(state)}

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return _np_dtype(self._state[key])

    def nbytes(self, key: str) -> int:
        t = self._state[key]
        return t.numel() * t.element_size()

    def order(self, key: str) -> int:
        return self._order[key]

    def read(self, key: str) -> np.ndarray:
        return self.get(key)

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._state[key].contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(DTYPES["BF16"])
        return t.numpy()


def _np_dtype(tensor) -> np.dtype:
    import torch

    if tensor.dtype == torch.bfloat16:
        return DTYPES["BF16"]
    return np.dtype(str(tensor.dtype).removeprefix("torch."))


def open_source(directory: str, allow_pickle: bool = False) -> dict:
    """Tensor name -> reader: safetensors (single or sharded), else pickled ``.bin`` files with ``allow_pickle``."""
    names = os.listdir(directory)
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return open_checkpoint(directory)
    pickles = sorted(n for n in names if n.endswith(PICKLES))
    if not pickles:
        return open_checkpoint(directory)  # raises "no .safetensors files"
    first = os.path.join(directory, pickles[0])
    if not allow_pickle:
        raise CheckpointError(
            f"{first}: pickled checkpoint; pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    return index_tensors(PickleFile(os.path.join(directory, name)) for name in pickles)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar in bytes (with bytes/s) on process 0 only."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled or jax.process_index() != 0,
        dynamic_ncols=True,
    )


def _file_copy(item: Item, writer: ParamWriter, quant: QuantSpec | None = None) -> tuple[str, int, int] | None:
    """(file, offset, bytes) when the item's one parameter holds its safetensors bytes unchanged: copied file to
    file (experts and embeddings, most of Aria's bytes, in the hub and transformers5 layouts). Never for a weight
    ``quant`` quantizes."""
    if not isinstance(item.file, SafetensorsFile) or len(item.targets) != 1 or not item.targets[0].is_identity:
        return None
    target = item.targets[0]
    if quantized_weight("/".join(target.path), quant) is not None:
        return None
    if not writer.can_copy(target.path, target.layer, item.file.dtype(item.key)):
        return None
    return (item.file.path, *item.file.byte_range(item.key))


def _targets(item: Item, quant: QuantSpec | None) -> list:
    """The item's targets, each weight ``quant`` covers replaced by its ``_q``/``_scale`` pair (int4 packed)."""
    if quant is None:
        return item.targets
    return [t for target in item.targets for t in quantized_targets(target, quant, True)]


def _write_item(writer: ParamWriter, item: Item, raw: np.ndarray, quant: QuantSpec | None) -> None:
    for target in _targets(item, quant):
        writer.write(target.path, target.layer, target.transform(raw))


def write_params(items: list[Item], writer: ParamWriter, progress: bool = True, allow_nonfinite: bool = False,
                 quant: QuantSpec | None = None) -> int:
    """Stream every item's tensor through its transforms into ``writer``; returns the bytes read.

    With ``quant`` the weights it covers are quantized on the host as they stream (one layer slice at a time). The
    quantizing targets are made per item and dropped after it, so no quantized value outlives its write.

    Tensors stored unchanged are copied file to file by the writer's threads (never held in memory). For the
    others three stages overlap: a thread reads the next tensor (file I/O releases the GIL) while this one
    transforms the current tensor and the writer's threads write (or copy) the previous one. Host memory holds
    those three at most.

    The reading thread also counts each tensor's NaN and infinite values (for copied tensors in blocks, ~10 GB/s)
    before it is written: a tensor with any fails (``CheckpointError`` naming it) unless ``allow_nonfinite``, which
    warns once per tensor instead.
    """
    total = sum(item.nbytes for item in items)

    def load(i: int) -> tuple[np.ndarray | None, int]:
        item = items[i]
        if copies[i]:
            return None, item.file.count_nonfinite(item.key)
        raw = item.file.read(item.key)
        return raw, count_nonfinite(raw)

    try:
        with progress_bar(total, "convert", progress) as bar, ThreadPoolExecutor(1, "aria-read") as reader:
            copies = [_file_copy(item, writer, quant) for item in items]
            ahead = reader.submit(load, 0) if items else None
            for i, item in enumerate(items):
                raw, nonfinite = ahead.result()
                ahead = reader.submit(load, i + 1) if i + 1 < len(items) else None
                if nonfinite:
                    _nonfinite(item, nonfinite, allow_nonfinite)
                if copies[i]:
                    writer.copy_file(item.targets[0].path, item.targets[0].layer, *copies[i])
                if raw is not None:
                    _write_item(writer, item, raw, quant)
                del raw
                bar.update(item.nbytes)
    except BaseException:
        writer.abandon()
        raise
    writer.close()
    return total


def _nonfinite(item: Item, count: int, allowed: bool) -> None:
    where = f"{item.file.path}: tensor '{item.key}' has {count:,} NaN or infinite value(s)"
    if not allowed:
        raise CheckpointError(f"{where}; pass --allow-nonfinite to convert it anyway")
    print(f"aria-jax convert: warning: {where} (converted as they are: --allow-nonfinite)", file=sys.stderr)


def record_quantization(directory: str, quant: QuantSpec | None) -> None:
    """Write ``quant`` as the directory's ``quantization.json``, or remove one copied from a source (a float
    directory must not claim a format)."""
    file = os.path.join(directory, QUANT_FILE)
    if quant is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(file)
        return
    with open(file, "w", encoding="utf-8") as f:
        json.dump(quant.to_json(), f, indent=2)


def convert(
    src: str,
    dst: str,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    mesh: str | None = None,
    check: Callable[..., dict] | None = None,
    progress: bool = True,
    allow_nonfinite: bool = False,
    quantize: str | QuantSpec | None = None,
) -> dict:
    """Convert ``src`` (an HF directory in any key layout, or a hub id) into ``dst``; returns a summary dict.

    ``dst`` may not be ``src``, contain it or lie inside it (refused before anything is read or written).
    ``quantize``: store the weights aria_jax.quant covers as int8 / int4 (``"int8"``, ``"int4"`` or a QuantSpec).
    """
    quant = parse(quantize)  # a bad value fails before anything is read
    if os.path.isdir(src):
        refuse_overlap(src, dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)}: already exists; pass --overwrite to replace it")
    path = resolve_model(src, revision, HUB_PATTERNS + (("*.bin",) if allow_pickle else ()))
    cfg = AriaConfig.from_pretrained(path)
    target_dtype = resolve_dtype(dtype, cfg)
    if mesh is not None:

        param_shardings(cfg, mesh, quant=quant)  # fail now, not after writing, if the mesh cannot shard this model
    tensors = open_source(path, allow_pickle)
    layout, items = plan_tensors(tensors, cfg, path)  # every name, shape and dtype checked before writing
    summary = {"source": path, "layout": layout, "dtype": target_dtype.name, "tensors": len(items),
               "quantization": quant}
    with staged_directory(dst, overwrite, sources=[path]) as tmp:
        out_cfg = dataclasses.replace(cfg, dtype=target_dtype.name)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(out_cfg.to_dict(), f, indent=2)
        summary["copied"] = [name for name in copy_tokenizer_files(path, tmp) if name != QUANT_FILE]
        record_quantization(tmp, quant)  # before the check: a verify reads the format from the staged directory
        # The parameter layout from the config's table, not from tracing the model (a second in a fresh process).
        writer = ParamWriter(tmp, *declared_params(cfg, target_dtype, quant, packed=True))
        summary["bytes"] = write_params(items, writer, progress, allow_nonfinite, quant)
        if check is not None:  # e.g. --verify: on the staged output, so a failure leaves nothing behind
            summary["check"] = check(tensors, layout, cfg, tmp, target_dtype, mesh)
    summary["destination"] = os.path.abspath(dst)
    return summary
