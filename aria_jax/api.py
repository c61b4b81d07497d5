"""``Aria``: the user-facing model object (load, forward) over the pure Flax module and its params pytree."""

from __future__ import annotations

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.config import AriaConfig
from aria_jax.model import AriaModel, check_image_token_count
from aria_jax.moe import MOE_BACKENDS
from aria_jax.weights import load_params

HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]


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


def resolve_path(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> str:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (HF_HUB_OFFLINE honoured)."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: not a model directory (and not a hub id like 'rhymes-ai/Aria')")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, allow_patterns=HUB_FILES)


def example_inputs(cfg: AriaConfig) -> dict[str, jax.Array]:
    """The smallest image + text batch that touches every parameter (for init and shape inference)."""
    patches, queries = cfg.projector_patch_to_query[0]
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"projector_patch_to_query_dict key {patches} is not a square number of patches")
    pixels = side * cfg.vision.patch_size
    return {
        "input_ids": jnp.full((1, queries), cfg.image_token_id, jnp.int32),
        "pixel_values": jnp.zeros((1, cfg.vision.num_channels, pixels, pixels), jnp.float32),
    }


def _load(path: str, config: AriaConfig, shapes: dict, dtype: jnp.dtype, mesh) -> dict:
    """Params from a converted (Orbax) or HF directory, on one device or placed on ``mesh``."""
    from aria_jax.checkpoint import is_converted, restore_params
    from aria_jax.sharding import param_shardings

    shardings = param_shardings(config, mesh) if mesh is not None else None
    if is_converted(path):
        return restore_params(path, shapes, shardings)
    return load_params(path, config, shapes, dtype, shardings)[0]


class Aria:
    """Aria for inference: ``Aria.from_pretrained(path)``, then ``forward``; ``params`` is a plain pytree."""

    def __init__(self, config: AriaConfig, params: dict, dtype=None, moe_backend: str = "ragged", processor=None):
        if moe_backend not in MOE_BACKENDS:
            raise ValueError(f"unknown moe_backend '{moe_backend}'; choose one of {', '.join(MOE_BACKENDS)}")
        self.config = config
        self.params = params
        self.dtype = resolve_dtype(dtype, config)
        self.module = AriaModel(config, moe_backend=moe_backend, dtype=self.dtype)
        self.processor = processor

    @staticmethod
    def param_shapes(config: AriaConfig, dtype=jnp.float32, logical: bool = False) -> dict:
        """Abstract params (ShapeDtypeStructs, or logical axis names with ``logical=True``); allocates nothing."""
        module = AriaModel(config, dtype=jnp.dtype(dtype))
        boxed = jax.eval_shape(module.init, jax.random.key(0), **example_inputs(config))["params"]
        if logical:
            return nn.get_partition_spec(boxed)
        return nn.unbox(boxed)

    @classmethod
    def from_config(cls, config: AriaConfig, seed: int = 0, dtype=None, moe_backend: str = "ragged") -> Aria:
        """A randomly initialised model (normal(0.02) weights, unit norms), for tests, demos and benchmarks."""
        dtype = resolve_dtype(dtype, config)
        module = AriaModel(config, dtype=dtype)
        params = jax.jit(lambda key: nn.unbox(module.init(key, **example_inputs(config)))["params"])(
            jax.random.key(seed)
        )
        return cls(config, params, dtype, moe_backend)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype=None,
        mesh=None,
        moe_backend: str = "ragged",
        revision: str | None = None,
    ) -> Aria:
        """Load an HF-format safetensors directory in any of Aria's key layouts, a converted directory, or a hub id.

        ``dtype`` None keeps the checkpoint's dtype (as transformers' ``dtype="auto"``). ``mesh`` (a
        ``jax.sharding.Mesh`` or a spec like ``"data=2,expert=4,tensor=1"``) places every parameter with
        ``aria_jax.sharding.param_shardings``; each device receives only its own slice.
        """
        path = resolve_path(path_or_hub_id, revision)
        config = AriaConfig.from_pretrained(path)
        dtype = resolve_dtype(dtype, config)
        params = _load(path, config, cls.param_shapes(config, dtype), dtype, mesh)
        return cls(config, params, dtype, moe_backend)

    @functools.cached_property
    def _forward(self):
        def run(params, input_ids, attention_mask, pixel_values, pixel_mask):
            logits, _ = self.module.apply({"params": params}, input_ids, attention_mask, pixel_values, pixel_mask)
            return logits

        return jax.jit(run)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_mask=None) -> jax.Array:
        """Logits (B, T, V) for a batch in transformers' conventions (left padding, NCHW pixels)."""
        input_ids = self._check_ids(input_ids)
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values)
            self._check_pixels(input_ids, pixel_values, pixel_mask)
            if pixel_mask is not None:
                pixel_mask = np.asarray(pixel_mask, dtype=bool)
        return self._forward(self.params, input_ids, attention_mask, pixel_values, pixel_mask)

    def _check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a (batch, seq) integer array, got shape {ids.shape} {ids.dtype}")
        vocab = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids.max() if ids.max() >= vocab else ids.min()
            raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab})")
        return ids.astype(np.int32)

    def _check_pixels(self, input_ids: np.ndarray, pixel_values: np.ndarray, pixel_mask) -> None:
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.vision.num_channels:
            raise ValueError(f"pixel_values must be (N, {cfg.vision.num_channels}, S, S), got {pixel_values.shape}")
        n, _, h, w = pixel_values.shape
        p = cfg.vision.patch_size
        if h != w or h % p or h > cfg.vision.image_size:
            raise ValueError(f"pixel_values of {h}x{w} pixels: images must be square multiples of {p} pixels")
        if pixel_mask is not None and np.shape(pixel_mask) != (n, h, w):
            raise ValueError(f"pixel_mask shape {np.shape(pixel_mask)} != {(n, h, w)}")
        if input_ids.shape[1] != 1:
            check_image_token_count(input_ids, n, cfg.queries_for_patches((h // p) ** 2), cfg.image_token_id)
