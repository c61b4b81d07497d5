"""``Aria``: the user-facing model object (load, forward) over the pure Flax module and its params pytree."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aria_jax.checkpoint.load import load_inference_params, resolve_quantization
from aria_jax.checkpoint.peft import load_adapter
from aria_jax.config import AriaConfig, resolve_dtype
from aria_jax.errors import InputError
from aria_jax.files import read_json, resolve_model
from aria_jax.inference.budget import check_prompt_budget
from aria_jax.inference.generation import Decoder, GenerationStats, StopRule, stop_string_checker
from aria_jax.inference.processor import AriaProcessor
from aria_jax.inference.sampling import SamplingConfig
from aria_jax.kernels.experts import MOE_BACKENDS
from aria_jax.model.aria import AriaModel, check_image_token_count, example_inputs
from aria_jax.model.quantize import quantize_params
from aria_jax.model.schema import declared_params
from aria_jax.parallel import distributed
from aria_jax.parallel import layout as param_layout
from aria_jax.parallel.sharding import make_mesh
from aria_jax.quant import QuantSpec, parse
from aria_jax.runtime import Runtime, detect

LAYOUTS = ("auto", "stacked", "per_layer", "unrolled")
# keyword arguments of generate(text=...) that go to the processor
PROCESSOR_OPTIONS = ("max_image_size", "min_image_size", "split_image", "split_mode", "split_ratio",
                     "add_special_tokens")


def resolve_layout(layout: str, mesh, runtime: Runtime) -> str:
    """``auto``: the platform's inference layout (``runtime.layout``, or ``runtime.quant_layout`` for quantized
    weights) on one device, ``stacked`` on a mesh."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if layout in ("unrolled", "per_layer") and mesh is not None and mesh.size > 1:
        raise ValueError(f"layout '{layout}' runs on one device; use layout 'stacked' with a mesh")
    if layout == "auto":
        if mesh is not None and mesh.size > 1:
            return "stacked"
        return runtime.quant_layout if runtime.quant is not None else runtime.layout
    return layout


class Aria:
    """Aria for inference: ``Aria.from_pretrained(path)``, then ``forward``, ``generate`` or ``chat``.

    ``module`` (the Flax ``AriaModel``) and ``params`` (a plain pytree) are one pair in the model's parameter
    ``layout`` (aria_jax.parallel.layout: ``stacked`` runs the decoder layers with ``nn.scan``; ``unrolled`` keeps one
    array per layer and per expert, which decodes several times faster on CPU); ``stacked_params()`` gives the
    canonical stacked tree (a conversion). ``runtime`` holds the platform's kernel choices (aria_jax.runtime):
    ``runtime.detect()`` unless given; ``moe_backend`` and ``layout`` override the expert kernel and the layout.
    """

    def __init__(
        self,
        config: AriaConfig,
        params: dict,
        dtype=None,
        moe_backend: str = "auto",
        processor=None,
        generation_config: dict | None = None,
        mesh=None,
        layout: str = "auto",
        runtime: Runtime | None = None,
    ):
        if moe_backend not in MOE_BACKENDS:
            raise ValueError(f"unknown moe_backend '{moe_backend}'; choose one of {', '.join(MOE_BACKENDS)}")
        self.config = config
        self.runtime = runtime or detect()
        self.layout = resolve_layout(layout, mesh, self.runtime)
        self.dtype = resolve_dtype(dtype, config)
        self.mesh = mesh  # a jax.sharding.Mesh the params are placed on; its "expert" axis runs expert-parallel
        self.params = param_layout.to_layout(params, self.layout)  # converted once, here
        self.module = AriaModel(config, moe_backend=moe_backend, dtype=self.dtype, mesh=mesh, layout=self.layout,
                                runtime=self.runtime)
        self.processor = processor
        self.generation_config = generation_config or {}
        self.last_stats: GenerationStats | None = None

    def stacked_params(self) -> dict:
        """The canonical (stacked) parameter tree: ``params`` itself, or a converted copy for other layouts."""
        return param_layout.to_stacked(self.params)

    @staticmethod
    def param_shapes(config: AriaConfig, dtype=jnp.float32, logical: bool = False, quantize: str | None = None,
                     packed: bool = True) -> dict:
        """Abstract params (ShapeDtypeStructs, or logical axis names with ``logical=True``) from the parameter schema
        (``aria_jax.model.schema``; ``quantize``: int8/int4 weights as aria_jax.quant stores them); allocates and
        traces nothing."""
        shapes, axes = declared_params(config, jnp.dtype(dtype), parse(quantize), packed)
        return axes if logical else shapes

    @classmethod
    def from_config(
        cls, config: AriaConfig, seed: int = 0, dtype=None, moe_backend: str = "auto", layout: str = "auto",
        runtime: Runtime | None = None, quantize: str | QuantSpec | None = None,
    ) -> Aria:
        """A randomly initialised model (normal(0.02) weights, unit norms), for tests, demos and benchmarks;
        ``quantize``: those weights quantized (int8/int4, aria_jax.quant)."""
        dtype = resolve_dtype(dtype, config)
        module = AriaModel(config, dtype=dtype)
        params = jax.jit(lambda key: nn.unbox(module.init(key, **example_inputs(config)))["params"])(
            jax.random.key(seed)
        )
        runtime, quant = runtime or detect(), parse(quantize)
        if quant is not None:
            runtime = runtime.replace(quant=quant)
            params = quantize_params(params, quant, runtime.int4_packed)
        return cls(config, params, dtype, moe_backend, layout=layout, runtime=runtime)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        dtype=None,
        mesh=None,
        moe_backend: str = "auto",
        revision: str | None = None,
        layout: str = "auto",
        runtime: Runtime | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        quantize: str | QuantSpec | None = None,
    ) -> Aria:
        """Load an HF-format safetensors directory in any of Aria's key layouts, a converted directory, or a hub id.

        ``dtype`` None keeps the checkpoint's dtype (as transformers' ``dtype="auto"``). ``mesh`` (a
        ``jax.sharding.Mesh`` or a spec like ``"data=2,expert=4,tensor=1"``) places every parameter with
        ``aria_jax.parallel.sharding.param_shardings``; each device receives only its own slice.
        ``tokenizer_path`` (a directory or hub id, ``revision`` honoured) supplies the tokenizer and its chat
        template when they are not in the model directory or should be others, as the original's
        ``AriaProcessor.from_pretrained(model, tokenizer_path=...)``; it is read before the weights. ``adapter``: a PEFT
        LoRA adapter directory (aria_jax.checkpoint.peft), checked before the weights are read, merged into them.
        ``quantize`` (``"int8"``/``"int4"``, aria_jax.quant): weight-only quantization, applied on the host while the
        weights are read, so the float model is never held on a device; a directory converted with ``--quantize``
        loads in its stored format without it.
        """
        path = resolve_model(path_or_hub_id, revision)
        config = AriaConfig.from_pretrained(path)
        dtype = resolve_dtype(dtype, config)
        processor = load_processor(path, tokenizer_path, revision)

        mesh = make_mesh(mesh)
        quant = resolve_quantization(path, parse(quantize))
        runtime = (runtime or detect()).replace(quant=quant)
        # an adapter is merged, so every layout, expert kernel and mesh runs it at no cost per token
        lora = None if adapter is None else load_adapter(adapter, config)
        params = load_inference_params(path, config, dtype, mesh, quant, runtime.int4_packed, lora)
        return cls(config, params, dtype, moe_backend, processor, read_generation_config(path), mesh,
                   layout, runtime)

    @functools.cached_property
    def _forward(self):
        def run(params, input_ids, attention_mask, pixel_values, pixel_mask):
            return self.module.apply({"params": params}, input_ids, attention_mask, pixel_values, pixel_mask).logits

        if distributed.spans_processes(self.mesh):  # every process gets the whole logits
            return jax.jit(run, out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        return jax.jit(run)

    def _to_mesh(self, *arrays):
        """Host inputs onto a multi-host mesh, replicated (each process fills its own devices); else as they are."""
        if not distributed.spans_processes(self.mesh):
            return arrays
        return tuple(None if a is None else distributed.replicate(self.mesh, a) for a in arrays)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_mask=None) -> jax.Array:
        """Logits (B, T, V) for a batch in transformers' conventions (left padding, NCHW pixels).

        Multi-host (a mesh spanning processes): every process calls this with the same numpy inputs, or with
        global ``jax.Array`` s; the logits come back fully replicated, readable on every process.
        """
        input_ids, attention_mask, pixel_values, pixel_mask = _host_inputs(
            input_ids, attention_mask, pixel_values, pixel_mask
        )
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
        inputs = self._to_mesh(input_ids, attention_mask, pixel_values, pixel_mask)
        return self._forward(self.params, *inputs)

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

    # -- generation ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _decoder(self) -> Decoder:
        return Decoder(self.module)

    def _stop_rule(self, max_new_tokens: int, min_new_tokens: int, eos_token_id, prompt_len: int) -> StopRule:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({max_new_tokens}), got {min_new_tokens}")
        limit = self.config.text.max_position_embeddings
        if prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length {limit}"
            )
        gen = self.generation_config
        if eos_token_id is None:
            eos_token_id = gen.get("eos_token_id", self.config.text.eos_token_id)
        eos = tuple(int(e) for e in np.atleast_1d(eos_token_id)) if eos_token_id is not None else ()
        pad = gen.get("pad_token_id", self.config.text.pad_token_id)
        pad = int(pad if pad is not None else (eos[0] if eos else 0))
        return StopRule(eos_ids=eos, pad_id=pad, max_new=max_new_tokens, min_new=min_new_tokens)

    def _plan(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        pixel_mask=None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id=None,
        stop_strings=None,
        kv_cache: str = "float",
    ) -> dict:
        """Validated arguments for ``Decoder.iterate``; every bad value fails here, before anything is traced."""
        if kv_cache not in ("float", "int8"):
            raise ValueError(f"kv_cache must be 'float' or 'int8', got {kv_cache!r}")
        input_ids, attention_mask, pixel_values, pixel_mask = _host_inputs(
            input_ids, attention_mask, pixel_values, pixel_mask
        )
        ids = self._check_ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if pixel_values is not None:
            pixel_values = np.asarray(pixel_values)
            self._check_pixels(ids, pixel_values, pixel_mask)
            pixel_values = pixel_values.astype(np.float32)
            if pixel_mask is not None:
                pixel_mask = np.asarray(pixel_mask, dtype=bool)
        if isinstance(max_new_tokens, int) and max_new_tokens > 0:  # frames that outgrow the context: name the count
            check_prompt_budget(self.config, ids, pixel_values, max_new_tokens)
        stop_check = None
        if stop_strings:
            if self.processor is None:
                raise ValueError("stop_strings need a tokenizer, and this model directory has no tokenizer files")
            stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
            stop_check = stop_string_checker(lambda t: self.processor.decode(t, skip_special_tokens=False), stops)
        return dict(
            params=self.params, input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            sampling=SamplingConfig(bool(do_sample), float(temperature), top_k, float(top_p)),
            rule=self._stop_rule(max_new_tokens, min_new_tokens, eos_token_id, ids.shape[1]),
            seed=int(seed), stop_check=stop_check, kv_cache=kv_cache,
        )

    def _processed(self, text, images, arrays: tuple, options: dict) -> tuple:
        """``arrays`` as given, or ``text`` and ``images`` through the processor (its options taken out of
        ``options``): (input_ids, attention_mask, pixel_values, pixel_mask)."""
        processor_options = {k: options.pop(k) for k in PROCESSOR_OPTIONS if k in options}
        if text is None:
            if processor_options or images is not None:
                names = ", ".join(sorted(processor_options) + (["images"] if images is not None else []))
                raise InputError(f"{names}: processor options, for generate(text=..., images=...); with input_ids, "
                                 "run model.processor(...) first")
            if arrays[0] is None:
                raise InputError("generate needs input_ids (or text=, a prompt)")
            return arrays
        if any(a is not None for a in arrays):
            raise InputError("generate takes text= (with images=) or input_ids (with the other arrays), not both")
        if self.processor is None:
            raise InputError("text= needs a tokenizer, and this model has none (from_pretrained(..., tokenizer_path=))")
        batch = self.processor(text=text, images=images, **processor_options)
        return batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("pixel_mask")

    def generate(
        self, input_ids=None, attention_mask=None, pixel_values=None, pixel_mask=None, *, text=None, images=None,
        **options,
    ) -> np.ndarray:
        """New tokens (B, <= max_new_tokens); rows that stopped early are padded with the pad id.

        Options: max_new_tokens=32, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
        seed=0, eos_token_id=None (the checkpoint's eos ids, as transformers), stop_strings=None, kv_cache="float"
        ("int8": keys and values stored as int8 with per-vector scales, a quarter of the float32 bytes). The last
        call's timing (prefill ms, decode tokens/s) is in ``last_stats``. Multi-host: as ``forward`` (same inputs on
        every process, or global arrays); every process gets the same numpy tokens.

        Instead of arrays, ``text=`` (a prompt or a list, one ``<|img|>`` per image) and ``images=`` go through
        ``self.processor`` first, with its options among ``options``: max_image_size, min_image_size, split_image,
        split_mode ("original": the original Aria crops), split_ratio, add_special_tokens.
        """
        arrays = self._processed(text, images, (input_ids, attention_mask, pixel_values, pixel_mask), options)
        plan = self._plan(*arrays, **options)
        out, self.last_stats = self._decoder.run(**plan)
        return out

    def generate_stream(
        self, input_ids=None, attention_mask=None, pixel_values=None, pixel_mask=None, *, text=None, images=None,
        **options,
    ) -> Iterator[np.ndarray]:
        """``generate``, yielding each step's (B,) tokens as they come; the full result is in ``last_tokens``."""
        arrays = self._processed(text, images, (input_ids, attention_mask, pixel_values, pixel_mask), options)
        plan = self._plan(*arrays, **options)
        self.last_tokens, self.last_stats = yield from self._decoder.iterate(**plan, stream=True)

    # -- chat ----------------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict],
        images=None,
        max_new_tokens: int = 256,
        stream: bool = False,
        max_image_size: int | None = None,
        split_image: bool | None = None,
        split_mode: str = "hf",
        min_image_size: int | None = None,
        split_ratio=None,
        videos=None,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        timestamps: bool = True,
        **options,
    ):
        """Reply to a conversation: the chat template, the processor, ``generate``, and the decoded new text.

        ``messages`` are transformers-style dicts (``{"role": "user", "content": [{"type": "image"},
        {"type": "text", "text": "..."}]}``); ``images`` are PIL images or file paths, one per image item.
        ``max_image_size``, ``split_image``, ``split_mode`` ("original": the original Aria crops, splitting unless
        ``split_image=False``), ``min_image_size`` and ``split_ratio`` go to the processor.
        ``videos``: one per ``{"type": "video"}`` item (an item may name its file instead: ``"path"``), each a file
        path (``num_frames`` frames sampled at segment centres, or ``fps`` frames per second, at most
        ``max_frames``), an ``aria_jax.inference.video.Video`` or a list of PIL frames; each expands into its frames
        as the original does (``[MM:SS]``, the frame, a newline; ``timestamps=False`` or bare frames: the frames then
        one newline), at ``max_image_size`` 490 unless given (aria_jax.inference.video).
        Generation stops at ``<|im_end|>`` (and the eos ids) unless ``stop_strings`` says otherwise.
        Returns the reply as a string, or with ``stream=True`` an iterator of text pieces.
        """
        if self.processor is None:
            raise InputError("chat needs a tokenizer and chat template, and this model directory has none "
                             "(from_pretrained(..., tokenizer_path=) gives one)")
        batch = self.processor.chat_inputs(
            messages, images, videos, timestamps=timestamps, num_frames=num_frames, fps=fps, max_frames=max_frames,
            max_image_size=max_image_size, split_image=split_image, split_mode=split_mode,
            min_image_size=min_image_size, split_ratio=split_ratio,
        )
        options.setdefault("stop_strings", ["<|im_end|>"])
        args = (batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("pixel_mask"))
        if not stream:
            return self._reply_text(self.generate(*args, max_new_tokens=max_new_tokens, **options)[0])
        return self._stream_text(self.generate_stream(*args, max_new_tokens=max_new_tokens, **options))

    def _reply_text(self, tokens: np.ndarray) -> str:
        text = self.processor.decode([int(t) for t in tokens], skip_special_tokens=True)
        return text.split("<|im_end|>")[0]

    def _stream_text(self, steps: Iterator[np.ndarray]) -> Iterator[str]:
        """Text pieces as tokens arrive: each piece is the growth of the decoded reply (UTF-8 safe)."""
        tokens: list[int] = []
        shown = text = ""
        for step in steps:
            tokens.append(int(step[0]))
            text = self._reply_text(np.asarray(tokens))
            if text.endswith("\ufffd"):  # maybe an incomplete multi-byte character: wait for the next token
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        if len(text) > len(shown):
            yield text[len(shown):]


def _host_inputs(*arrays) -> tuple:
    """Global (multi-host) ``jax.Array`` inputs gathered to numpy on every process; other inputs as they are."""
    return tuple(distributed.to_host(a) if isinstance(a, jax.Array) and not a.is_fully_addressable else a
                 for a in arrays)


def read_generation_config(path: str) -> dict:
    """eos / pad / bos ids from generation_config.json, if the directory has one."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    raw = read_json(file)
    if not isinstance(raw, dict):
        raise InputError(f"{file}: expected a JSON object")
    ids = {k: raw[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if raw.get(k) is not None}
    for key, value in ids.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise InputError(f"{file}: {key} must be a token id or a list of them, got {value!r}")
    return ids


def load_processor(path: str, tokenizer_path: str | os.PathLike | None = None, revision: str | None = None):
    """The directory's AriaProcessor (with the tokenizer of ``tokenizer_path`` when given), or None when there are
    no tokenizer files."""
    if tokenizer_path is not None:
        return AriaProcessor.from_pretrained(path, tokenizer_path=tokenizer_path, revision=revision)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    return AriaProcessor.from_pretrained(path)
