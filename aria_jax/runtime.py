"""The platform's choices in one place: which kernels, parameter layout and compiler options a model or a training
run uses.

``detect()`` reads the platform (the only call of ``jax.default_backend()`` in aria_jax) and decides once:

- ``experts``: the routed experts' kernel for many rows: ``blocked`` (CPU: each expert's rows in chunks, few wasted
  FLOPs; ``ragged_dot`` lowers to an E-times dense matmul there), ``megablox`` (TPU: Pallas megablox ``gmm``),
  ``tokamax`` (GPU with the optional tokamax: ``tokamax.ragged_dot``) or ``pallas`` (GPU without it: this project's
  Pallas grouped matmul); ``ragged`` (``jax.lax.ragged_dot``, which XLA:GPU pads to a dense dot) is the portable one.
  A few rows (decode: tokens x top-k <= experts) always use ``gather``, which reads only the chosen experts.
- ``layout``: the parameter layout for inference: ``unrolled`` (one array per layer and per expert) on one CPU
  device, where XLA copies every slice of a stacked weight before reading it; ``stacked`` elsewhere.
- ``scan_layers``: training's decoder layers as one ``nn.scan`` over stacked parameters (GPU/TPU: bounded compile
  time) or one parameter tree per layer (CPU: the per-layer slices of a scan are copies there).
- ``matvec_split``: a single row times a weight runs as this many partial matvecs (CPU: 2, one per core; XLA:CPU
  runs one matvec on one core), 1 elsewhere.
- ``pallas_interpret``: run the Pallas expert kernels (``pallas``, ``megablox``) in Pallas' interpreter (CPU: True,
  where they have no compiled lowering; tests and ``--runtime experts=pallas`` run them there).
- ``decode_options``: XLA compiler options for the decode loop (CPU: Eigen dots, about twice as fast as YNNPACK for
  the few-row matmuls of a decode step), none elsewhere.
- ``quant``: the weight-only quantization the model holds (aria_jax.quant: ``int8``/``int4``), None for float
  weights; not a platform choice: ``Aria.from_pretrained(quantize=...)`` and ``quantize_base`` set it.
- ``int4_packed``: int4 weights held two per byte (GPU/TPU) or one per byte (CPU: XLA:CPU unpacks nibbles several
  times slower than it reads int8 bytes; on disk int4 is packed everywhere).
- ``quant_fused_rows``: up to this many rows, a quantized matmul takes the multiply-reduce forms XLA:CPU fuses with
  the int8 read (CPU: 16; 0 elsewhere, where XLA fuses the dequantization into its dot): aria_jax.kernels.quantized.
- ``quant_layout``: the inference layout for quantized weights: ``per_layer`` on one CPU device (the routed
  experts stay (E, ...) stacks, so a decode step's (token, slot) pairs index the int8 bytes of their experts inside
  one fused matvec each; per-expert arrays run through loops from which XLA hoists a float dequantization of every
  expert), ``stacked`` elsewhere.
- ``image_chunk_bytes``: the activation budget of one chunk of images in the vision tower and projector
  (``model/aria.py``: ``image_chunk_size``); many images or video frames run through them in chunks this big, so
  their peak memory does not grow with the image count. 512 MiB everywhere.
- ``attention``: the attention kernel of prefill without a KV cache, training, the vision tower and the projector
  (aria_jax.kernels.attention): ``cudnn`` (GPU: cuDNN flash attention; float32 runs ``xla``), ``xla`` (TPU:
  ``jax.nn.dot_product_attention``'s XLA form), ``flash`` (CPU: blockwise with an online softmax and a
  recomputing backward, aria_jax.kernels.flash_attention; as fast as ``einsum`` at 64 tokens, 2-6x faster from 512,
  and O(T) memory) or ``einsum`` (the default: transformers' eager steps). With ``flash``, prefill chunks over the KV
  cache run it too, reading only the filled slots; decode steps over the cache run the einsum form.

``Aria`` and training take a ``Runtime`` (``detect()`` unless the user gives one or overrides fields with
``Runtime.replace``), say which in their stats and logs (``describe``), and pass it down: model and kernel code read
its fields and never look at the platform themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp

from aria_jax.quant import Holding, QuantSpec

EXPERT_KERNELS = ("blocked", "ragged", "gather", "dense", "pallas", "megablox", "tokamax")
INFERENCE_LAYOUTS = ("stacked", "per_layer", "unrolled")
ATTENTION_KERNELS = ("einsum", "flash", "xla", "cudnn")
# XLA:CPU's switch from YNNPACK to its Eigen dots, faster for few-row matmuls (bench/HISTORY.md, session 7); single-row
# matvecs run the same; prefill and training keep YNNPACK, faster for many rows.
DEFAULT_IMAGE_CHUNK_BYTES = 512 << 20  # the vision tower's activations per chunk of images (Runtime.image_chunk_bytes)
CPU_DECODE_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The choices ``detect`` makes for a platform; the defaults are the portable ones (no CPU-only forms)."""

    platform: str = "any"
    experts: str = "ragged"
    layout: str = "stacked"
    scan_layers: bool = True
    matvec_split: int = 1
    decode_options: tuple[tuple[str, str], ...] = ()
    image_chunk_bytes: int = DEFAULT_IMAGE_CHUNK_BYTES
    quant: QuantSpec | None = None
    int4_packed: bool = True
    quant_fused_rows: int = 0
    quant_layout: str = "stacked"
    attention: str = "einsum"
    pallas_interpret: bool = False

    def __post_init__(self):
        if self.experts not in EXPERT_KERNELS:
            raise ValueError(f"unknown experts kernel '{self.experts}'; choose one of {', '.join(EXPERT_KERNELS)}")
        for layout in (self.layout, self.quant_layout):
            if layout not in INFERENCE_LAYOUTS:
                raise ValueError(f"unknown layout '{layout}'; choose one of {', '.join(INFERENCE_LAYOUTS)}")
        if isinstance(self.matvec_split, bool) or not isinstance(self.matvec_split, int) or self.matvec_split < 1:
            raise ValueError(f"matvec_split must be an integer >= 1, got {self.matvec_split!r}")
        if self.attention not in ATTENTION_KERNELS:
            known = ", ".join(ATTENTION_KERNELS)
            raise ValueError(f"unknown attention kernel '{self.attention}'; choose one of {known}")
        chunk = self.image_chunk_bytes
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"image_chunk_bytes must be an integer >= 1, got {chunk!r}")

    def replace(self, **changes) -> Runtime:
        return dataclasses.replace(self, **changes)

    def holding(self, lm_head: bool = False) -> Holding | None:
        """How a layer holds its quantized weights (None: float); ``lm_head``: for the output projection, which
        ``QuantSpec.lm_head`` may keep in float."""
        if self.quant is None or (lm_head and not self.quant.lm_head):
            return None
        return Holding(self.quant, self.int4_packed, self.quant_fused_rows)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.decode_options) or "none"
        return (f"{self.platform}: experts {self.experts} (gather for a few rows), layout {self.layout}, "
                f"scan_layers {str(self.scan_layers).lower()}, matvec split {self.matvec_split}, "
                f"decode compiler options {options}, image chunks of {self.image_chunk_bytes >> 20} MiB, "
                f"weights {self.quant.format if self.quant else 'float'}, attention {self.attention}")


def with_overrides(spec: str | None, base: Runtime | None = None) -> Runtime:
    """``base`` (default ``detect()``) with the fields a user named in ``spec``: ``"experts=ragged,layout=stacked,
    matvec_split=1,decode_options=none"`` (the CLI's ``--runtime``). ValueError naming a bad key or value."""
    runtime = base or detect()
    if not spec:
        return runtime
    changes: dict = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value:
            raise ValueError(f"runtime override '{item.strip()}' is not KEY=VALUE")
        if key in ("experts", "layout", "quant_layout", "attention"):
            changes[key] = value
        elif key in ("matvec_split", "image_chunk_bytes"):
            if not value.isdigit():
                raise ValueError(f"runtime {key} must be an integer >= 1, got '{value}'")
            changes[key] = int(value)
        elif key == "decode_options":
            if value != "none":
                raise ValueError(f"runtime decode_options can only be turned off ('none'), got '{value}'")
            changes[key] = ()
        else:
            raise ValueError(f"unknown runtime key '{key}'; known: experts, layout, quant_layout, attention, "
                             "matvec_split, decode_options, image_chunk_bytes")
    return runtime.replace(**changes)


def platform() -> str:
    """``cpu``, ``gpu`` or ``tpu``: the platform JAX runs on (the one place aria_jax asks)."""
    return jax.default_backend()


@functools.cache
def detect() -> Runtime:
    """The choices for the platform JAX runs on (see the module docstring)."""
    name = platform()
    if name == "cpu":
        return Runtime(name, experts="blocked", layout="unrolled", scan_layers=False, matvec_split=2,
                       decode_options=_accepted(CPU_DECODE_OPTIONS), int4_packed=False, quant_fused_rows=16,
                       quant_layout="per_layer", pallas_interpret=True, attention="flash")
    if name == "tpu":
        return Runtime(name, experts="megablox", attention="xla")
    if name == "gpu":
        return Runtime(name, experts="tokamax" if importlib.util.find_spec("tokamax") else "pallas", attention="cudnn")
    return Runtime(name)


def _accepted(options: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``options`` when this XLA compiles with them (they are experimental), else none."""
    try:
        jax.jit(lambda x: x @ x, compiler_options=dict(options)).lower(jnp.ones((2, 2))).compile()
    except Exception:  # an XLA without these options: keep its defaults
        return ()
    return options
