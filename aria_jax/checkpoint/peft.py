"""PEFT LoRA adapters in and out: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

Read (``load_adapter``): adapters that PEFT wrote for any of Aria's module namings, each tensor
``base_model.model.<module>.lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r):

- the original rhymes-ai/Aria trainer (custom-code names: ``language_model.model.layers.N...``,
  ``vision_tower.vision_model.encoder...``, ``multi_modal_projector.ffn...``); its routed experts are
  ``mlp.experts.fc1`` / ``fc2`` with the grouped pairs of its ``GroupedGemmLoraLayer``: lora_A (E, in, r), lora_B
  (E, r, out);
- transformers 5's ``AriaForConditionalGeneration`` (``model.language_model.layers.N...``, ``lm_head``), whose
  routed experts are the ``gate_up_proj`` / ``down_proj`` parameters of ``mlp.experts``, adapted through PEFT's
  ``target_parameters`` (``ParamWrapper``): lora_A (r*E, in) with row e*r + k, lora_B (out, r*E) with column
  k*E + e; with both targeted the wrappers nest (the first parameter innermost), so the inner one's keys carry a
  ``base_layer.`` infix: ``mlp.experts.base_layer.lora_A.weight`` is gate_up_proj, ``mlp.experts.lora_A.weight``
  down_proj.

Every pair becomes the model's layout (``aria_jax.model.lora``): A (in..., r), B (r, out...), with the layer
(and expert) axes stacked; layers without a pair get zeros. The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``); a module's own ``rank_pattern`` / ``alpha_pattern`` scale is folded into its B. The whole
``embed_tokens`` / ``lm_head`` weights PEFT saves beside the pairs when lm_head is targeted (``save_embedding_layers``)
replace the base model's, as PEFT loads them (``Adapter.weights``). ``Aria.from_pretrained(..., adapter=...)``
merges everything into the weights (``merge_adapter``). Anything else (DoRA, lora_bias, modules_to_save, unknown
modules, a rank other than adapter_config.json's, a missing partner) is an ``AdapterError`` naming file and key.

Write (``save_adapter``): the transformers 5 form above, which ``peft.PeftModel.from_pretrained`` loads on
transformers' ``AriaForConditionalGeneration``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aria_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from aria_jax.config import AriaConfig
from aria_jax.errors import InputError
from aria_jax.files import read_json, write_json_atomic
from aria_jax.model.lora import SITES, LoraSite, merge_pairs, original_name, pair_paths, transformers5_name
from aria_jax.model.schema import param_specs, tensor_specs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_PARAMS = {"fc1": "gate_up_proj", "fc2": "down_proj"}  # transformers 5 names, in registration order
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<wrap>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$")
# PEFT also saves the embeddings' own weights when lm_head (or embed_tokens) is targeted (save_embedding_layers):
# ``<module>.weight`` / ``<module>.base_layer.weight``, loaded over the base model's, as PEFT loads them.
_FULL = re.compile(r"^base_model\.model\.(?P<module>.+?)(?:\.base_layer)?\.weight$")
_EMBEDDINGS = {"model.language_model.embed_tokens": "language_model.model.embed_tokens",
               "language_model.model.embed_tokens": "language_model.model.embed_tokens",
               "lm_head": "language_model.lm_head", "language_model.lm_head": "language_model.lm_head"}
_UNSUPPORTED = (("lora_magnitude_vector", "DoRA (use_dora)"), ("lora_embedding_", "LoRA on embeddings"),
                ("lora_B.bias", "lora_bias"), ("modules_to_save", "modules_to_save"))


class AdapterError(InputError):
    """A PEFT adapter directory that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    lora: dict  # stacked pairs: {..., "name_a": (batch..., in..., r), "name_b": (batch..., r, out...)}, B unscaled
    scale: float  # the model adds x @ A @ B * scale
    r: int
    alpha: float
    dropout: float
    sites: tuple[LoraSite, ...]  # the sites with a pair
    base_model: str | None = None
    weights: dict = dataclasses.field(default_factory=dict)  # parameter path -> a whole weight saved with it


@dataclasses.dataclass(frozen=True)
class _Name:
    site: LoraSite | None  # None: the transformers 5 experts module (which parameter: from the key)
    layer: int | None
    style: str  # "linear", "grouped" (the original's (E, in, r) pairs) or "experts" (PEFT's ParamWrapper)


def _names(config: AriaConfig) -> dict[str, _Name]:
    """Every module name an adapter may give a site, in every naming."""
    out: dict[str, _Name] = {}
    for site in SITES:
        vision = site.module.startswith("vision_tower")
        count = config.vision.num_hidden_layers if vision else config.text.num_hidden_layers
        for layer in range(count) if site.layered else [None]:
            hub = site.name(layer)
            grouped = site.n_batch == 2
            style = "grouped" if grouped else "linear"
            for name in (hub, original_name(hub), transformers5_name(hub)):
                out[name] = _Name(site, layer, style)
            if grouped:
                out[transformers5_name(hub).rsplit(".", 1)[0]] = _Name(None, layer, "experts")
    return out


def _fail(where: str, message: str) -> AdapterError:
    return AdapterError(f"{where}: {message}")


def _read_config(path: str) -> dict:
    meta = read_json(path, AdapterError)
    if not isinstance(meta, dict):
        raise _fail(path, "not a JSON object")
    if meta.get("peft_type") != "LORA":
        raise _fail(path, f"peft_type {meta.get('peft_type')!r}: only LoRA adapters (\"LORA\") are supported")
    r, alpha = meta.get("r"), meta.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _fail(path, f"r {r!r} is not a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(path, f"lora_alpha {alpha!r} is not a number")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("fan_in_fan_out", "fan_in_fan_out")):
        if meta.get(key):
            raise _fail(path, f"{key}: {what} adapters are not supported")
    if meta.get("modules_to_save"):
        raise _fail(path, "modules_to_save: adapters that carry whole modules are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = meta.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, int | float) for v in pattern.values()):
            raise _fail(path, f"{key} is not a map of module patterns to numbers")
    targets = meta.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _fail(path, "target_parameters is not a list of parameter names")
    return meta


def _pattern(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _expert_param(module: str, depth: int, targets: list[str]) -> str | None:
    """Which parameter of transformers' ``mlp.experts`` a ParamWrapper ``depth`` wrappers deep adapts."""
    names = [p for p in EXPERT_PARAMS.values()
             if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in targets)]
    return names[len(names) - 1 - depth] if depth < len(names) else None


def _convert(site: LoraSite, style: str, a: np.ndarray, b: np.ndarray, shape: tuple[int, ...], where: str):
    """PEFT's (lora_A, lora_B) for one layer -> the model's (A (in..., r), B (r, out...)), with the expert axis
    leading for the routed experts; checks every shape. ``shape`` is the parameter's for one layer."""
    e = shape[0] if site.n_batch == 2 else 1
    body = shape[1:] if site.n_batch == 2 else shape
    ins, outs = body[: site.n_in], body[site.n_in :]
    n_in, n_out = math.prod(ins), math.prod(outs)
    if style == "experts":
        r = a.shape[0] // e if a.ndim == 2 else 0
        if r and a.shape == (r * e, n_in) and b.shape == (n_out, r * e):
            return (a.reshape(e, r, n_in).transpose(0, 2, 1), b.reshape(n_out, r, e).transpose(2, 1, 0)), r
        want = f"lora_A [{e}*r, {n_in}] and lora_B [{n_out}, {e}*r]"
    elif style == "grouped":
        r = a.shape[-1] if a.ndim == 3 else 0
        if r and a.shape == (e, n_in, r) and b.shape == (e, r, n_out):
            return (a, b), r
        want = f"lora_A [{e}, {n_in}, r] and lora_B [{e}, r, {n_out}]"
    else:
        r = a.shape[0] if a.ndim == 2 else 0
        if r and a.shape == (r, n_in) and b.shape == (n_out, r):
            return (a.T.reshape(*ins, r), b.T.reshape(r, *outs)), r
        want = f"lora_A [r, {n_in}] and lora_B [{n_out}, r]"
    raise _fail(where, f"lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the module (expected {want} "
                "with one rank r)")


def load_adapter(path: str | os.PathLike, config: AriaConfig) -> Adapter:
    """A PEFT LoRA adapter directory as stacked LoRA pairs for ``config``'s model (float32); AdapterError (one line
    naming the file and key) for anything that cannot be used exactly."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise _fail(directory, "not a directory (a PEFT adapter is a directory with adapter_config.json and "
                    "adapter_model.safetensors)")
    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for file in (config_path, weights_path):
        if not os.path.isfile(file):
            pickled = file == weights_path and os.path.isfile(os.path.join(directory, "adapter_model.bin"))
            hint = " (adapter_model.bin is pickled and not loaded: save it with safetensors)" if pickled else ""
            raise _fail(file, f"missing{hint}")
    meta = _read_config(config_path)
    r0, alpha0 = meta["r"], float(meta.get("lora_alpha", 8))
    rslora = bool(meta.get("use_rslora"))
    scale_of = lambda alpha, r: alpha / (math.sqrt(r) if rslora else r)  # noqa: E731
    try:
        file = SafetensorsFile(weights_path)
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None
    names, specs = _names(config), param_specs(config)
    pairs: dict[tuple[LoraSite, int | None], dict[str, tuple[str, np.ndarray]]] = {}
    styles: dict[tuple[LoraSite, int | None], str] = {}
    weights: dict[tuple[str, ...], np.ndarray] = {}
    for key in file.keys():
        where = f"{weights_path}: tensor '{key}'"
        match = _KEY.match(key)
        full = None if match else _FULL.match(key)
        if full and full["module"] in _EMBEDDINGS:
            path, value = _whole_weight(file, key, _EMBEDDINGS[full["module"]] + ".weight", config, where)
            if path in weights:
                raise _fail(where, "the embedding weight appears twice")
            weights[path] = value
            continue
        if match is None:
            what = next((w for marker, w in _UNSUPPORTED if marker in key), None)
            raise _fail(where, f"{what} is not supported" if what else
                        "not a LoRA weight (expected base_model.model.<module>.lora_A.weight / lora_B.weight)")
        module, depth = match["module"], match["wrap"].count("base_layer.")
        name = names.get(module)
        if name is None:
            raise _fail(where, f"module '{module}' is not one of this Aria model's linear layers or routed experts")
        site = name.site
        if name.style == "experts":
            param = _expert_param(module, depth, meta.get("target_parameters") or [])
            if param is None:
                raise _fail(where, f"{ADAPTER_CONFIG} target_parameters names no parameter of '{module}' for it")
            fc = next(k for k, v in EXPERT_PARAMS.items() if v == param)
            site = next(s for s in SITES if s.n_batch == 2 and s.module.endswith(fc))
        elif depth:
            raise _fail(where, "unexpected base_layer infix (only the routed experts' parameters nest)")
        value = file.read(key)
        if not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 included
            raise _fail(where, f"non-float dtype {value.dtype}")
        slot = pairs.setdefault((site, name.layer), {})
        if match["ab"] in slot:
            raise _fail(where, f"the same LoRA weight as '{slot[match['ab']][0]}'")
        slot[match["ab"]] = (key, value.astype(np.float32))
        styles[(site, name.layer)] = name.style
    if not pairs and not weights:
        raise _fail(weights_path, "no LoRA weights")

    converted: dict[LoraSite, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    for (site, layer), slot in pairs.items():
        if set(slot) != {"A", "B"}:
            have = next(iter(slot.values()))[0]
            raise _fail(f"{weights_path}: tensor '{have}'", f"has no lora_{'B' if 'A' in slot else 'A'} partner")
        spec = specs.get("/".join(site.path))
        if spec is None or (layer is not None and layer >= spec[0][0]):
            continue  # vision layers past vision_feature_layer: not run, so their LoRA changes nothing
        shape = spec[0][1:] if site.layered else spec[0]
        (key_a, a), (_, b) = slot["A"], slot["B"]
        where = f"{weights_path}: tensor '{key_a}'"
        (a2, b2), r = _convert(site, styles[(site, layer)], a, b, shape, where)
        module = key_a[len(PREFIX):].rsplit(".lora_A", 1)[0].replace(".base_layer", "")
        experts = styles[(site, layer)] == "experts"
        pattern_key = f"{module}.{EXPERT_PARAMS[site.module[-3:]]}" if experts else module
        want_r = _pattern(meta.get("rank_pattern") or {}, pattern_key, r0)
        if r != want_r:
            raise _fail(where, f"rank {r}, but {ADAPTER_CONFIG} says r={want_r}")
        ratio = scale_of(float(_pattern(meta.get("alpha_pattern") or {}, pattern_key, alpha0)), r) / scale_of(
            alpha0, r0)
        converted.setdefault(site, {})[layer] = (a2, b2 * np.float32(ratio))

    lora: dict = {}
    for site, layers in converted.items():
        rank = max(a.shape[-1] for a, _ in layers.values())
        a_path, b_path = pair_paths(site.path)
        if not site.layered:
            (a, b), = layers.values()
            lora[a_path], lora[b_path] = _pad(a, b, rank, site)
            continue
        count = specs["/".join(site.path)][0][0]
        a0, b0 = _pad(*next(iter(layers.values())), rank, site)
        stack_a, stack_b = np.zeros((count, *a0.shape), np.float32), np.zeros((count, *b0.shape), np.float32)
        for layer, (a, b) in layers.items():
            stack_a[layer], stack_b[layer] = _pad(a, b, rank, site)
        lora[a_path], lora[b_path] = stack_a, stack_b
    return Adapter(traverse_util.unflatten_dict(lora), scale_of(alpha0, r0), r0, alpha0,
                   float(meta.get("lora_dropout") or 0.0), tuple(s for s in SITES if s in converted),
                   meta.get("base_model_name_or_path"), weights)


def _whole_weight(file: SafetensorsFile, key: str, hub: str, config: AriaConfig, where: str):
    """(parameter path, value in the model's layout) of an embedding weight saved with the adapter."""
    shape, (target,) = tensor_specs(config)[hub]
    if tuple(file.shape(key)) != shape:
        raise _fail(where, f"shape {list(file.shape(key))}, the model's is {list(shape)}")
    value = file.read(key)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise _fail(where, f"non-float dtype {value.dtype}")
    return target.path, np.ascontiguousarray(target.transform(value.astype(np.float32)))


def _pad(a: np.ndarray, b: np.ndarray, rank: int, site: LoraSite) -> tuple[np.ndarray, np.ndarray]:
    """One layer's pair with zero rank columns of A and rows of B up to ``rank`` (they multiply each other: the
    product is unchanged)."""
    extra = rank - a.shape[-1]
    if not extra:
        return a, b
    b_axis = 1 if site.n_batch == 2 else 0  # after the expert axis
    pad_b = [(0, extra) if i == b_axis else (0, 0) for i in range(b.ndim)]
    return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)]), np.pad(b, pad_b)


def merge_adapter(params: dict, adapter: Adapter) -> dict:
    """Stacked params with the adapter folded in (``W + A @ B * scale``, layer by layer), and the whole weights it
    carries in place of the base model's (each in the dtype and sharding of the one it replaces)."""
    if adapter.weights:
        flat = dict(traverse_util.flatten_dict(params))
        for path, value in adapter.weights.items():
            old = flat[path]
            new = value.astype(old.dtype)
            flat[path] = jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new
        params = traverse_util.unflatten_dict(flat)
    return merge_pairs(params, adapter.lora, adapter.scale, adapter.sites)


def _layer_pairs(site: LoraSite, a: np.ndarray, b: np.ndarray, skip: Iterable[int]):
    if not site.layered:
        yield None, a, b
        return
    for i in range(a.shape[0]):
        if not (site.part == "llm" and i in skip):
            yield i, a[i], b[i]


def save_adapter(directory: str | os.PathLike, lora: dict, r: int, alpha: float, dropout: float = 0.0,
                 base_model: str | None = None, skip_layers: Iterable[int] = ()) -> str:
    """Stacked LoRA pairs (B unscaled; the model adds ``x @ A @ B * alpha / r``) as a PEFT adapter for transformers 5's
    ``AriaForConditionalGeneration``. Decoder layers in ``skip_layers`` (freeze_llm_layers) are left out, as the
    original trainer leaves them out. Pairs of another rank than ``r`` (from an adapter with a ``rank_pattern``) are
    written with their own ``rank_pattern`` / ``alpha_pattern`` entry at the same scale. PEFT's experts wrapper has
    no dropout, so ``lora_dropout`` is written as 0 when the experts are adapted (the weights are the same)."""
    directory = os.fspath(directory)
    flat = traverse_util.flatten_dict(lora)
    skip = set(skip_layers)
    tensors: list[tuple[str, np.ndarray]] = []
    modules, parameters = [], []
    ranks, alphas = {}, {}
    for site in SITES:
        a_path, b_path = pair_paths(site.path)
        if a_path not in flat:
            continue
        a, b = np.asarray(flat[a_path], np.float32), np.asarray(flat[b_path], np.float32)
        rank = a.shape[-1]
        for layer, a1, b1 in _layer_pairs(site, a, b, skip):
            name = transformers5_name(site.name(layer))
            if site.n_batch == 2:  # PEFT's ParamWrapper: (r*E, in) rows e*r+k and (out, r*E) columns k*E+e
                module, param = name.rsplit(".", 1)[0], EXPERT_PARAMS[name.rsplit(".", 1)[1]]
                nested = param == "gate_up_proj" and pair_paths(site.path[:-1] + ("down",))[0] in flat
                e = a1.shape[0]
                ta, tb = a1.transpose(0, 2, 1).reshape(e * rank, -1), b1.transpose(2, 1, 0).reshape(-1, rank * e)
                prefix = PREFIX + module + (".base_layer" if nested else "")
                parameters.append(f"{module}.{param}")
                pattern = parameters[-1]
            else:
                ta, tb = a1.reshape(-1, rank).T, b1.reshape(rank, -1).T
                prefix = PREFIX + name
                modules.append(name)
                pattern = name
            if rank != r:
                ranks[pattern], alphas[pattern] = rank, alpha * rank / r
            tensors += [(prefix + ".lora_A.weight", ta), (prefix + ".lora_B.weight", tb)]
    entries = [(k, np.dtype(np.float32), v.shape) for k, v in tensors]
    write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), entries,
                      (np.ascontiguousarray(v) for _, v in tensors))
    meta = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.0 if parameters else dropout, "bias": "none",
        "target_modules": sorted(set(modules)) or None, "target_parameters": sorted(set(parameters)) or None,
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": ranks, "alpha_pattern": alphas,
    }
    write_json_atomic(os.path.join(directory, ADAPTER_CONFIG), meta)
    return directory
