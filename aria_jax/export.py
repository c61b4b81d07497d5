"""``aria-jax export``: a converted directory -> HF safetensors shards + index, in the hub or transformers5 dialect.

Each HF tensor is rebuilt from its parameter slices with the inverse transforms of ``weights.tensor_specs``
(the same table the loader uses), read from the Orbax checkpoint one tensor at a time and written straight
into its shard. Tensors the model does not use (the zero ``post_layernorm`` and any vision layers past
``vision_feature_layer``) are written as zeros so transformers finds every parameter it declares.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorstore as ts

from aria_jax.checkpoint import PARAMS_DIR, check_stored, is_converted
from aria_jax.config import AriaConfig
from aria_jax.convert import copy_tokenizer_files, progress_bar
from aria_jax.errors import one_line
from aria_jax.files import refuse_overlap, staged_directory
from aria_jax.param_specs import declared_params
from aria_jax.safetensors_io import CheckpointError, write_safetensors
from aria_jax.weights import Target, from_hub_name, tensor_specs

EXPORT_LAYOUTS = ("hub", "transformers5")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TIB": 2**40})

Entry = tuple[str, np.dtype, tuple[int, ...]]


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (GB/MB/KB are powers of 10, GiB/MiB/KiB of 2, as transformers reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size '{text}': expected a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def hf_config(cfg: AriaConfig, layout: str) -> dict:
    """config.json content: transformers 5 (``rope_parameters``) or the 4.x dialect of the hub (``rope_theta``)."""
    out = cfg.to_dict()
    if layout == "hub":
        text = out["text_config"]
        text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
        text["moe_intermediate_size"] = text["intermediate_size"]
        if "dtype" in out:
            out["torch_dtype"] = out.pop("dtype")
    return out


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive entries grouped into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[2], dtype=np.int64)) * np.dtype(entry[1]).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class ParamReader:
    """Reads parameters (or one layer of a stacked one) from a converted directory's zarr arrays."""

    def __init__(self, directory: str):
        self.root = os.path.join(directory, PARAMS_DIR)
        self._arrays: dict[tuple[str, ...], ts.TensorStore] = {}

    def read(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
        name = ".".join(path)
        try:
            if path not in self._arrays:
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(self.root, name)}}
                self._arrays[path] = ts.open(spec, open=True, read=True).result()
            array = self._arrays[path]
            return (array if layer is None else array[layer]).read().result()
        except ValueError as e:  # tensorstore's error for unreadable or damaged chunks
            raise CheckpointError(f"{self.root}: parameter '{name}': cannot read ({one_line(e)})") from None


def rebuild(reader: ParamReader, targets: list[Target], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One HF tensor from its parameters: inverse transforms, pieces stacked along axis 0, disk shape."""
    if not targets:
        return np.zeros(shape, dtype)
    pieces = [np.asarray(t.inverse(reader.read(t.path, t.layer))) for t in targets]
    whole = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return np.ascontiguousarray(whole.reshape(shape), dtype)


def export(
    src: str,
    dst: str,
    layout: str = "transformers5",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the converted directory ``src`` as an HF checkpoint in ``layout``; returns a summary dict."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown export layout '{layout}'; choose one of {', '.join(EXPORT_LAYOUTS)}")
    max_bytes = parse_size(max_shard_size)
    if not os.path.isdir(src) or not is_converted(src):
        raise CheckpointError(f"{src}: not a directory written by `aria-jax convert` (no {PARAMS_DIR}/_METADATA)")
    refuse_overlap(src, dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)}: already exists; pass --overwrite to replace it")
    cfg = AriaConfig.from_pretrained(src)
    # names, shapes and every chunk file (a missing chunk would read as zeros) checked before anything is written
    stored = check_stored(src, declared_params(cfg, np.float32)[0])
    dtypes = {array.dtype for array in stored.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{src}: parameters in several dtypes ({sorted(map(str, dtypes))})")
    dtype = dtypes.pop()
    specs = tensor_specs(cfg)
    dv = cfg.vision.hidden_size
    extra = {f"vision_tower.post_layernorm.{p}": ((dv,), []) for p in ("weight", "bias")}
    table = {**specs, **extra}
    entries = [(name, dtype, shape) for name, (shape, _) in table.items()]
    shards = plan_shards(entries, max_bytes)
    reader = ParamReader(src)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(int(np.prod(s, dtype=np.int64)) * dtype.itemsize for _, _, s in entries)
    weight_map = {}

    def arrays(shard: list[Entry], bar) -> Iterator[np.ndarray]:
        for name, _, shape in shard:
            array = rebuild(reader, table[name][1], shape, dtype)
            bar.update(array.nbytes)
            yield array

    with staged_directory(dst, overwrite, sources=[src]) as tmp:
        with progress_bar(total, "export", progress) as bar:
            for file, shard in zip(names, shards, strict=True):
                renamed = [(from_hub_name(n, layout), d, s) for n, d, s in shard]
                write_safetensors(os.path.join(tmp, file), renamed, arrays(shard, bar))
                weight_map.update({n: file for n, _, _ in renamed})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _dump(os.path.join(tmp, "model.safetensors.index.json"), index)
        _dump(os.path.join(tmp, "config.json"), hf_config(cfg, layout))
        copy_tokenizer_files(src, tmp)
    return {"tensors": len(entries), "shards": len(shards), "layout": layout, "destination": os.path.abspath(dst)}


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
