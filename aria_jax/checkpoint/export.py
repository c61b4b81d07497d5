"""Params -> HF safetensors shards + index, in the hub or transformers5 dialect: ``aria-jax export`` of a converted
directory, and the export at the end of a fine-tuning run (``write_hf``, the one HF writer).

Each HF tensor is rebuilt from its parameter slices with the inverse transforms of ``schema.tensor_specs`` (the
same table the loader uses), read one tensor at a time and written straight into its shard. Tensors the model does
not use (the vision ``post_layernorm``, vision layers past ``vision_feature_layer``) come from a base checkpoint
when there is one, else LayerNorm's initial values and zeros, so transformers finds every parameter it declares.

A quantized converted directory (``aria-jax convert --quantize``) is exported dequantized: each weight's ``_q`` and
``_scale`` are read (one layer at a time) and multiplied back to floats (``aria_jax.quant.dequantize``), with one
warning line, since the values are the rounded ones and not the original float weights.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorstore as ts

from aria_jax.checkpoint.convert import progress_bar, record_quantization
from aria_jax.checkpoint.converted import PARAMS_DIR, check_stored, is_converted, stored_quantization
from aria_jax.checkpoint.hf_keys import from_hub_name
from aria_jax.checkpoint.safetensors_io import CheckpointError, write_safetensors
from aria_jax.config import AriaConfig, resolve_dtype
from aria_jax.errors import one_line
from aria_jax.files import copy_tokenizer_files, parse_size, refuse_overlap, staged_directory, write_json_atomic
from aria_jax.model.schema import Target, declared_params, param_specs, tensor_specs
from aria_jax.quant import QuantSpec, dequantize, quantized_weight

EXPORT_LAYOUTS = ("hub", "transformers5")
Entry = tuple[str, np.dtype, tuple[int, ...]]


def hf_config(cfg: AriaConfig, layout: str, dtype: np.dtype | None = None) -> dict:
    """config.json content: transformers 5 (``rope_parameters``) or the 4.x dialect of the hub (``rope_theta``)."""
    out = cfg.to_dict()
    if dtype is not None:
        out["dtype"] = np.dtype(dtype).name
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


Read = Callable[[tuple[str, ...], int | None], np.ndarray]  # (param path, layer or None) -> that parameter (slice)
Fill = Callable[[str, tuple[int, ...]], np.ndarray | None]  # (hub key, shape) -> a tensor no parameter fills, or None


def tree_reader(params: dict) -> Read:
    """``Read`` over an in-memory params tree (stacked layout)."""
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    return lambda path, layer: np.asarray(flat[path] if layer is None else flat[path][layer])


def dequantized_reader(read: Read, cfg: AriaConfig, quant: QuantSpec) -> Read:
    """``Read`` of the float parameters over ``read`` of a quantized tree (stored or in memory): each weight ``quant``
    covers is its ``_q`` and ``_scale`` (of the same layer) dequantized to float32, with the logical shape of
    ``schema.param_specs``; every other parameter is read as it is."""
    specs = param_specs(cfg)

    def read_float(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        name = "/".join(path)
        rule = quantized_weight(name, quant)
        if rule is None:
            return read(path, layer)
        lead, n_in = rule
        shape = specs[name][0]
        if layer is not None:  # one layer of a stacked weight: one leading axis fewer
            shape, lead = shape[1:], lead - 1
        *parents, last = path
        q = np.asarray(read((*parents, last + "_q"), layer))
        scale = np.asarray(read((*parents, last + "_scale"), layer))
        return dequantize(q, scale, shape, lead, n_in)

    return read_float


def dequantized_warning(src: str, quant: QuantSpec) -> str:
    """The one warning line of exporting a quantized directory."""
    what = quant.format if quant.format == "int8" else f"{quant.format}, group {quant.group}"
    return f"{src}: weights are dequantized from {what} (rounded values; not the original float weights)"


def rebuild(read: Read, targets: list[Target], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One HF tensor from its parameters: inverse transforms, pieces stacked along axis 0, disk shape."""
    pieces = [np.asarray(t.inverse(read(t.path, t.layer))) for t in targets]
    whole = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return np.ascontiguousarray(whole.reshape(shape), dtype)


def _unfilled(key: str, shape: tuple[int, ...], dtype: np.dtype, fill: Fill | None) -> np.ndarray:
    """A tensor no parameter fills (the unused vision post_layernorm, vision layers past vision_feature_layer): from
    ``fill`` (e.g. the base checkpoint of a fine-tuning run), else LayerNorm's initial ones for its weight, zeros."""
    value = fill(key, shape) if fill is not None else None
    if value is None:
        value = np.ones(shape) if key == "vision_tower.post_layernorm.weight" else np.zeros(shape)
    return np.ascontiguousarray(value, dtype)


def write_hf(directory: str, cfg: AriaConfig, read: Read, dtype: np.dtype, layout: str = "transformers5",
             max_bytes: int = 5 * 10**9, fill: Fill | None = None, progress: bool = True, desc: str = "export") -> dict:
    """Every tensor of an HF Aria checkpoint in ``layout`` into ``directory``: safetensors shards of at most
    ``max_bytes`` (one tensor at a time from ``read``), ``model.safetensors.index.json`` and ``config.json``. The
    one HF writer: ``aria-jax export`` reads a converted directory, training its params in memory."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown export layout '{layout}'; choose one of {', '.join(EXPORT_LAYOUTS)}")
    dtype = np.dtype(dtype)
    dv = cfg.vision.hidden_size
    table = {**tensor_specs(cfg), **{f"vision_tower.post_layernorm.{p}": ((dv,), []) for p in ("weight", "bias")}}
    entries = [(name, dtype, shape) for name, (shape, _) in table.items()]
    shards = plan_shards(entries, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(math.prod(s) * dtype.itemsize for _, _, s in entries)
    weight_map = {}

    def arrays(shard: list[Entry], bar) -> Iterator[np.ndarray]:
        for name, _, shape in shard:
            targets = table[name][1]
            array = rebuild(read, targets, shape, dtype) if targets else _unfilled(name, shape, dtype, fill)
            bar.update(array.nbytes)
            yield array

    with progress_bar(total, desc, progress) as bar:
        for file, shard in zip(names, shards, strict=True):
            renamed = [(from_hub_name(n, layout), d, s) for n, d, s in shard]
            write_safetensors(os.path.join(directory, file), renamed, arrays(shard, bar))
            weight_map.update({n: file for n, _, _ in renamed})
    write_json_atomic(os.path.join(directory, "model.safetensors.index.json"),
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(os.path.join(directory, "config.json"), hf_config(cfg, layout, dtype))
    return {"tensors": len(entries), "shards": len(shards), "layout": layout}


def export(
    src: str,
    dst: str,
    layout: str = "transformers5",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    dtype: str | None = None,
) -> dict:
    """Write the converted directory ``src`` as an HF checkpoint in ``layout``; returns a summary dict.

    ``dtype`` (``"float32"``, ``"bfloat16"``): the tensors' dtype; None keeps the stored float dtype. A quantized
    directory is written dequantized, with one warning line on stderr."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"unknown export layout '{layout}'; choose one of {', '.join(EXPORT_LAYOUTS)}")
    max_bytes = parse_size(max_shard_size, "--max-shard-size")
    if not os.path.isdir(src) or not is_converted(src):
        raise CheckpointError(f"{src}: not a directory written by `aria-jax convert` (no {PARAMS_DIR}/_METADATA)")
    refuse_overlap(src, dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)}: already exists; pass --overwrite to replace it")
    out_dtype = None if dtype is None else np.dtype(resolve_dtype(dtype))
    cfg = AriaConfig.from_pretrained(src)
    quant = stored_quantization(src)
    # names, shapes and every chunk file (a missing chunk would read as zeros) checked before anything is written
    stored = check_stored(src, declared_params(cfg, np.float32, quant, packed=True)[0])
    dtypes = {array.dtype for name, array in stored.items() if not name.endswith(("_q", "_scale"))}
    if len(dtypes) != 1:
        raise CheckpointError(f"{src}: parameters in several dtypes ({sorted(map(str, dtypes))})")
    out_dtype = out_dtype or dtypes.pop()
    read = ParamReader(src).read
    if quant is not None:
        read = dequantized_reader(read, cfg, quant)
        print(f"aria-jax export: warning: {dequantized_warning(src, quant)}", file=sys.stderr)
    with staged_directory(dst, overwrite, sources=[src]) as tmp:
        summary = write_hf(tmp, cfg, read, out_dtype, layout, max_bytes, progress=progress)
        copy_tokenizer_files(src, tmp)
        record_quantization(tmp, None)  # the exported weights are floats
    return {**summary, "dtype": out_dtype.name, "quantization": quant, "destination": os.path.abspath(dst)}
