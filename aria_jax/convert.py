"""``aria-jax convert``: an HF Aria checkpoint (any key layout, or a hub id) -> a converted Orbax directory.

Everything that can be checked from file headers (layout, names, shapes, dtypes) is checked before a byte
is written. Tensors are then streamed in file order, one at a time, transformed and cast on the host and
written straight into the Orbax checkpoint. All output goes to a temporary directory beside DST that is
renamed at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from aria_jax.checkpoint import ParamWriter
from aria_jax.config import AriaConfig
from aria_jax.param_specs import declared_params
from aria_jax.safetensors_io import DTYPES, CheckpointError, SafetensorsFile, index_tensors, open_checkpoint
from aria_jax.weights import Item, plan_tensors

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json")
TOKENIZER_FILES = ("*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]
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


def resolve_source(src: str, revision: str | None = None, allow_pickle: bool = False) -> str:
    """A local directory as is; a hub id downloaded (only the files needed) with huggingface_hub."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src) or src.count("/") != 1 or src.startswith((".", "/")):
        raise FileNotFoundError(f"{src}: not a model directory (and not a hub id like 'rhymes-ai/Aria')")
    from huggingface_hub import snapshot_download  # honours HF_HUB_OFFLINE: then only the local cache is used

    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        return snapshot_download(src, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo or revision, HTTP errors: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{src}: cannot fetch from the hub ({type(e).__name__}: {first})") from None


@contextlib.contextmanager
def staged_directory(dst: str, overwrite: bool) -> Iterator[str]:
    """A temporary directory beside ``dst``, renamed to ``dst`` on success and removed on any failure."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    created = []  # parent directories made here, removed again on failure
    probe = parent
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    if os.path.lexists(dst):
        old = os.path.join(parent, f".{os.path.basename(dst)}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(tmp, dst)


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar in bytes (with bytes/s) on process 0 only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled or jax.process_index() != 0,
        dynamic_ncols=True,
    )


def _file_copy(item: Item, writer: ParamWriter) -> tuple[str, int, int] | None:
    """(file, offset, bytes) when the item's one parameter holds its safetensors bytes unchanged: copied file to
    file (experts and embeddings, most of Aria's bytes, in the hub and transformers5 layouts)."""
    if not isinstance(item.file, SafetensorsFile) or len(item.targets) != 1 or not item.targets[0].is_identity:
        return None
    target = item.targets[0]
    if not writer.can_copy(target.path, target.layer, item.file.dtype(item.key)):
        return None
    return (item.file.path, *item.file.byte_range(item.key))


def write_params(items: list[Item], writer: ParamWriter, progress: bool = True) -> int:
    """Stream every item's tensor through its transforms into ``writer``; returns the bytes read.

    Tensors stored unchanged are copied file to file by the writer's threads (never read into memory). For the
    others three stages overlap: a thread reads the next tensor (file I/O releases the GIL) while this one
    transforms the current tensor and the writer's threads write (or copy) the previous one. Host memory holds
    those three at most.
    """
    total = sum(item.nbytes for item in items)
    try:
        with progress_bar(total, "convert", progress) as bar, ThreadPoolExecutor(1, "aria-read") as reader:
            copies = [_file_copy(item, writer) for item in items]
            load = lambda i: None if copies[i] else items[i].file.read(items[i].key)  # noqa: E731
            ahead = reader.submit(load, 0) if items else None
            for i, item in enumerate(items):
                raw = ahead.result()
                ahead = reader.submit(load, i + 1) if i + 1 < len(items) else None
                if copies[i]:
                    writer.copy_file(item.targets[0].path, item.targets[0].layer, *copies[i])
                for target in item.targets if raw is not None else ():
                    writer.write(target.path, target.layer, target.transform(raw))
                del raw
                bar.update(item.nbytes)
    except BaseException:
        writer.abandon()
        raise
    writer.close()
    return total


def convert(
    src: str,
    dst: str,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    mesh: str | None = None,
    verify: bool = False,
    progress: bool = True,
) -> dict:
    """Convert ``src`` (an HF directory in any key layout, or a hub id) into ``dst``; returns a summary dict."""
    from aria_jax.api import resolve_dtype

    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)}: already exists; pass --overwrite to replace it")
    path = resolve_source(src, revision, allow_pickle)
    cfg = AriaConfig.from_pretrained(path)
    target_dtype = resolve_dtype(dtype, cfg)
    if mesh is not None:
        from aria_jax.sharding import param_shardings

        param_shardings(cfg, mesh)  # fail now, not after writing, if the mesh cannot shard this model
    tensors = open_source(path, allow_pickle)
    layout, items = plan_tensors(tensors, cfg, path)  # every name, shape and dtype checked before writing
    summary = {"source": path, "layout": layout, "dtype": target_dtype.name, "tensors": len(items)}
    with staged_directory(dst, overwrite) as tmp:
        out_cfg = dataclasses.replace(cfg, dtype=target_dtype.name)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(out_cfg.to_dict(), f, indent=2)
        summary["copied"] = copy_tokenizer_files(path, tmp)
        # The parameter layout from the config's table, not from tracing the model (a second in a fresh process).
        writer = ParamWriter(tmp, *declared_params(cfg, target_dtype), target_dtype)
        summary["bytes"] = write_params(items, writer, progress)
        if verify:
            from aria_jax.verify import verify_conversion

            summary["verify"] = verify_conversion(tensors, layout, cfg, tmp, target_dtype, mesh)
    summary["destination"] = os.path.abspath(dst)
    return summary
