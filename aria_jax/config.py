"""Aria configuration: frozen dataclasses that read every config.json dialect Aria has shipped in.

Dialects (aria-spec.md §1):
- transformers 5.x: ``text_config.rope_parameters = {"rope_type": "default", "rope_theta": ...}``;
- transformers 4.x: ``text_config.rope_theta`` (the hub's HF-format ``rhymes-ai/Aria``);
- the original custom-code repos: ``text_config.model_type == "aria_moe_lm"``, the expert width in
  ``moe_intermediate_size`` (``intermediate_size`` there is an unused 13568), vision ``aria_vision_model``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from aria_jax.errors import InputError
from aria_jax.files import read_json

TEXT_MODEL_TYPES = ("aria_text", "aria_moe_lm")
VISION_MODEL_TYPES = ("idefics3_vision", "aria_vision_model", "siglip_vision_model", "idefics2_vision")


class ConfigError(InputError):
    """A config.json value that is missing, malformed or contradicts another one."""


@dataclasses.dataclass(frozen=True)
class AriaTextConfig:
    vocab_size: int = 100352
    hidden_size: int = 2560
    intermediate_size: int = 1664  # per routed expert; the shared MLP is intermediate_size * moe_num_shared_experts
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 20
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    max_position_embeddings: int = 65536
    moe_num_experts: int = 64
    moe_topk: int = 6
    moe_num_shared_experts: int = 2
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    @property
    def shared_intermediate_size(self) -> int:
        return self.intermediate_size * self.moe_num_shared_experts

    def __post_init__(self):
        _check_positive(self, "text_config")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"text_config.num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"text_config.head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 < self.moe_topk <= self.moe_num_experts:
            raise ConfigError(
                f"text_config.moe_topk ({self.moe_topk}) must be in 1..moe_num_experts ({self.moe_num_experts})"
            )


@dataclasses.dataclass(frozen=True)
class AriaVisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def __post_init__(self):
        _check_positive(self, "vision_config")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) is not a multiple of "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )


@dataclasses.dataclass(frozen=True)
class AriaConfig:
    text: AriaTextConfig = dataclasses.field(default_factory=AriaTextConfig)
    vision: AriaVisionConfig = dataclasses.field(default_factory=AriaVisionConfig)
    # (num_patches, num_queries) pairs: a 980px image has 4900 patches and yields 256 tokens.
    projector_patch_to_query: tuple[tuple[int, int], ...] = ((1225, 128), (4900, 256))
    image_token_id: int = 9
    vision_feature_layer: int = -1
    dtype: str | None = None  # the checkpoint's stored dtype, if config.json says

    def __post_init__(self):
        if not self.projector_patch_to_query:
            raise ConfigError("projector_patch_to_query_dict is empty")
        n_layers = self.vision.num_hidden_layers
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ConfigError(
                f"vision_feature_layer ({self.vision_feature_layer}) out of range for {n_layers} vision layers"
            )

    @property
    def num_queries(self) -> int:
        """Rows of the projector's learned query table (the largest query count)."""
        return max(q for _, q in self.projector_patch_to_query)

    def queries_for_patches(self, num_patches: int) -> int:
        for patches, queries in self.projector_patch_to_query:
            if patches == num_patches:
                return queries
        raise ValueError(
            f"{num_patches} patches per image is not in projector_patch_to_query_dict "
            f"{dict(self.projector_patch_to_query)}; images must be padded to one of those sizes"
        )

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers whose output feeds the projector (hidden_states[vision_feature_layer])."""
        n = self.vision.num_hidden_layers
        return self.vision_feature_layer % (n + 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AriaConfig:
        """Read ``config.json`` from a directory (or the file itself) in any of Aria's dialects."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no config.json found")
        raw = read_json(file, ConfigError)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AriaConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        for key in ("text_config", "vision_config"):
            if not isinstance(raw.get(key), dict):
                raise ConfigError(f"missing or malformed key '{key}'")
        text = _text_from_dict(raw["text_config"])
        vision = _vision_from_dict(raw["vision_config"])
        p2q = raw.get("projector_patch_to_query_dict", {"1225": 128, "4900": 256})
        if not isinstance(p2q, dict):
            raise ConfigError("projector_patch_to_query_dict must be an object")
        try:
            pairs = tuple(sorted((int(k), _as_int(v, "")) for k, v in p2q.items()))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"projector_patch_to_query_dict has non-integer entries: {_short(p2q)}") from None
        if any(p <= 0 or q <= 0 for p, q in pairs):
            raise ConfigError(f"projector_patch_to_query_dict entries must be positive: {_short(p2q)}")
        image_token = _pick(raw, "image_token_index", "image_token_id", default=9, scope="")
        image_token = _as_int(image_token, "image_token_index")
        feature_layer = raw.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise ConfigError(f"vision_feature_layer must be one integer, got {feature_layer!r}")
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        return cls(
            text=text,
            vision=vision,
            projector_patch_to_query=pairs,
            image_token_id=image_token,
            vision_feature_layer=feature_layer,
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """transformers 5.x ``config.json`` content, readable by ``transformers.AriaConfig``."""
        t, v = self.text, self.vision
        eos = list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id
        return {
            "architectures": ["AriaForConditionalGeneration"],
            "model_type": "aria",
            "image_token_index": self.image_token_id,
            "pad_token_id": t.pad_token_id,
            "projector_patch_to_query_dict": {str(p): q for p, q in self.projector_patch_to_query},
            "vision_feature_layer": self.vision_feature_layer,
            "tie_word_embeddings": False,
            **({"dtype": self.dtype} if self.dtype else {}),
            "text_config": {
                "model_type": "aria_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "max_position_embeddings": t.max_position_embeddings,
                "moe_num_experts": t.moe_num_experts,
                "moe_topk": t.moe_topk,
                "moe_num_shared_experts": t.moe_num_shared_experts,
                "hidden_act": "silu",
                "pad_token_id": t.pad_token_id,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos,
                "tie_word_embeddings": False,
            },
            "vision_config": {
                "model_type": "idefics3_vision",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh",
            },
        }

    @classmethod
    def preset(cls, name: str) -> AriaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


def _check_positive(cfg, scope: str) -> None:
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name.endswith(("_id", "_ids")) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{scope}.{field.name} must be a positive number, got {value!r}")


def _pick(d: dict, *keys: str, default: Any = dataclasses.MISSING, scope: str) -> Any:
    """The value of the first key present; contradictory duplicates and missing required keys fail."""
    found = [(k, d[k]) for k in keys if d.get(k) is not None]
    prefix = f"{scope}." if scope else ""
    if len({json.dumps(v, sort_keys=True) for _, v in found}) > 1:
        shown = ", ".join(f"{prefix}{k}={v!r}" for k, v in found)
        raise ConfigError(f"contradictory values: {shown}")
    if found:
        return found[0][1]
    if default is dataclasses.MISSING:
        raise ConfigError(f"missing key '{prefix}{keys[0]}'")
    return default


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {_short(value)}")
    return value


def _as_positive_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{key} must be a finite positive number, got {_short(value)}")
    return float(value)


def _token_ids(value: Any, key: str) -> int | tuple[int, ...] | None:
    """A token id, a list of them (eos), or null."""
    ids = value if isinstance(value, list) else [value]
    if value is None:
        return None
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{key} must be a token id (an integer >= 0) or a list of them, got {_short(value)}")
    return tuple(ids) if isinstance(value, list) else value


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def _rope_theta(tc: dict) -> float:
    params = tc.get("rope_parameters")
    scaling = tc.get("rope_scaling")
    legacy = tc.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"text_config.rope_parameters must be an object, got {params!r}")
        if params.get("rope_type", "default") != "default":
            raise ConfigError(
                f"text_config.rope_parameters.rope_type '{params['rope_type']}' is not supported (Aria uses 'default')"
            )
        theta = _as_positive_float(params.get("rope_theta", legacy if legacy is not None else 10000.0),
                                   "text_config.rope_parameters.rope_theta")
        if legacy is not None and _as_positive_float(legacy, "text_config.rope_theta") != theta:
            raise ConfigError(
                f"contradictory values: text_config.rope_theta={legacy!r}, "
                f"text_config.rope_parameters.rope_theta={theta!r}"
            )
    else:
        theta = legacy if legacy is not None else 10000.0
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise ConfigError(f"text_config.rope_scaling {scaling!r} is not supported (Aria uses no rope scaling)")
    return _as_positive_float(theta, "text_config.rope_theta")


def _text_from_dict(tc: dict) -> AriaTextConfig:
    s = "text_config"
    model_type = tc.get("model_type", "aria_text")
    if model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"{s}.model_type '{model_type}' is not an Aria text model ({', '.join(TEXT_MODEL_TYPES)})")
    if model_type == "aria_moe_lm":
        # Original custom code: experts use moe_intermediate_size; intermediate_size is an unused leftover.
        expert_width = _pick(tc, "moe_intermediate_size", scope=s)
    else:
        expert_width = _pick(tc, "intermediate_size", "moe_intermediate_size", scope=s)
    for attention_bias_key in ("attention_bias", "mlp_bias"):
        if tc.get(attention_bias_key):
            raise ConfigError(f"{s}.{attention_bias_key}=true is not supported: Aria has no such biases")
    act = tc.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{s}.hidden_act '{act}' is not supported (Aria's shared experts use 'silu')")
    if tc.get("tie_word_embeddings"):
        raise ConfigError(f"{s}.tie_word_embeddings=true is not supported: Aria's lm_head is untied")
    hidden = _as_int(_pick(tc, "hidden_size", scope=s), f"{s}.hidden_size")
    heads = _as_int(_pick(tc, "num_attention_heads", scope=s), f"{s}.num_attention_heads")
    kv_heads = _as_int(_pick(tc, "num_key_value_heads", default=heads, scope=s), f"{s}.num_key_value_heads")
    head_dim = tc.get("head_dim")
    if head_dim is None:
        if heads <= 0:
            raise ConfigError(f"{s}.num_attention_heads must be a positive number, got {heads}")
        if hidden % heads:
            raise ConfigError(f"{s}.hidden_size ({hidden}) is not a multiple of {s}.num_attention_heads ({heads})")
        head_dim = hidden // heads
    return AriaTextConfig(
        vocab_size=_as_int(_pick(tc, "vocab_size", scope=s), f"{s}.vocab_size"),
        hidden_size=hidden,
        intermediate_size=_as_int(expert_width, f"{s}.intermediate_size"),
        num_hidden_layers=_as_int(_pick(tc, "num_hidden_layers", scope=s), f"{s}.num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_as_int(head_dim, f"{s}.head_dim"),
        rms_norm_eps=_as_positive_float(tc.get("rms_norm_eps", 1e-6), f"{s}.rms_norm_eps"),
        rope_theta=_rope_theta(tc),
        max_position_embeddings=_as_int(tc.get("max_position_embeddings", 2048), f"{s}.max_position_embeddings"),
        moe_num_experts=_as_int(_pick(tc, "moe_num_experts", scope=s), f"{s}.moe_num_experts"),
        moe_topk=_as_int(_pick(tc, "moe_topk", "num_experts_per_tok", scope=s), f"{s}.moe_topk"),
        moe_num_shared_experts=_as_int(tc.get("moe_num_shared_experts", 2), f"{s}.moe_num_shared_experts"),
        pad_token_id=_token_ids(tc.get("pad_token_id", 2), f"{s}.pad_token_id"),
        bos_token_id=_token_ids(tc.get("bos_token_id", 1), f"{s}.bos_token_id"),
        eos_token_id=_token_ids(tc.get("eos_token_id", 2), f"{s}.eos_token_id"),
    )


def _vision_from_dict(vc: dict) -> AriaVisionConfig:
    s = "vision_config"
    model_type = vc.get("model_type", "idefics3_vision")
    if model_type not in VISION_MODEL_TYPES:
        raise ConfigError(
            f"{s}.model_type '{model_type}' is not a supported vision tower ({', '.join(VISION_MODEL_TYPES)})"
        )
    act = vc.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ConfigError(f"{s}.hidden_act '{act}' is not supported (Aria's vision tower uses 'gelu_pytorch_tanh')")
    defaults = AriaVisionConfig()
    # Note: the real checkpoint's "attention_heads": 16 is a stray key; num_attention_heads is what counts.
    values = {}
    for field in dataclasses.fields(AriaVisionConfig):
        value = vc.get(field.name, getattr(defaults, field.name) if field.name != "image_size" else None)
        if field.name == "image_size" and value is None:
            raise ConfigError(f"missing key '{s}.image_size'")
        if field.name == "layer_norm_eps":
            values[field.name] = _as_positive_float(value, f"{s}.layer_norm_eps")
        else:
            values[field.name] = _as_int(value, f"{s}.{field.name}")
    return AriaVisionConfig(**values)


PRESETS: dict[str, AriaConfig] = {
    # rhymes-ai/Aria (aria-spec.md §1.4): 25.3B parameters, 3.9B active.
    "aria": AriaConfig(
        text=AriaTextConfig(),
        vision=AriaVisionConfig(),
        dtype="bfloat16",
    ),
    # A small model with every structural feature (GQA, top-2 of 4 experts, two query counts) that takes real
    # 490/980 px images cheaply (70 px patches): for tests and the offline demo.
    "tiny": AriaConfig(
        text=AriaTextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            max_position_embeddings=512,
            moe_num_experts=4,
            moe_topk=2,
            moe_num_shared_experts=1,
        ),
        vision=AriaVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=980,
            patch_size=70,  # real 490/980 px images, cheaply
        ),
        projector_patch_to_query=((49, 4), (196, 8)),
        dtype="float32",
    ),
}


def resolve_dtype(dtype, cfg: AriaConfig | None = None) -> jnp.dtype:
    """ "bfloat16" / "float32" / a numpy or jnp dtype / None (the checkpoint's own dtype, else float32)."""
    if dtype is None:
        dtype = (cfg.dtype if cfg is not None else None) or "float32"
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dtype!r}")
    return resolved
