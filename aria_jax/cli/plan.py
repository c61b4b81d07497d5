"""``aria-jax plan``: per-device memory of inference and training on a device mesh, without allocating anything.

The mesh is built from virtual CPU devices; the parameters, optimizer state, batch and KV cache are
``jax.ShapeDtypeStruct``s carrying their target ``NamedSharding``s, and the real step functions are lowered and
compiled (``jax.jit(f).lower(*abstract).compile()``). Each step is reported twice, per device:

- **analytic**, from shapes and shardings (formulas below);
- **compiled**, XLA's ``memory_analysis()``: argument, output, aliased (donated) and temporary bytes; peak is
  taken as ``arguments + outputs - aliased + temporaries``. These are the CPU backend's numbers: the sharding,
  the buffer sizes and the live ranges are real, but the CPU compiler may fuse and upcast (bf16 -> f32)
  differently from a GPU or TPU one, so treat them as an estimate of the same order as the analytic one.

The inference step is ``Decoder._prefill_impl`` (B x L prompt tokens, text only, into a KV cache of L +
max_new_tokens slots; long prompts prefill in chunks, ``generation.prefill_chunk_tokens``) and one
``Decoder._step_impl`` decode step with the cache donated. ``--frames N`` makes it a video prompt: N frames at
490 px per row (``N x Q`` image tokens, Q = 128 with Aria's projector mapping) plus ``--seq`` text tokens, the
pixels (B*N, 3, 490, 490) float32 an argument, the vision tower and projector run in chunks of frames
(``Runtime.image_chunk_bytes``). ``--quantize int8|int4`` holds the language model's linear layers as weight-only
quantized ``_q``/``_scale`` pairs (``aria_jax.quant``; ``cli/plan_weights.py``), int4 two per byte as on GPU/TPU, and
compiles the model that reads them; it plans inference only (the default ``--mode`` then). The training step is
forward + backward with ``AriaModel(remat=True)`` (each decoder layer recomputed), next-token cross-entropy and an
optax AdamW update; params are float32 master weights cast to ``--dtype`` for compute, and the Adam moments are
sharded like the params.

Analytic formulas (per device; ``b`` = batch rows per device = B / data, ``c`` = compute dtype bytes, heads and
vocabulary divided by the ``tensor`` axis, expert weights by the ``expert`` axis):

- parameters: sum over arrays of ``size * itemsize / (product of the mesh axes the array is split over)``; with
  ``--quantize`` a quantized weight is its values (int8: 1 byte, int4: 1/2) + float32 scales (per output channel,
  int4 per group of 128 inputs), the rest in the compute dtype, plus one layer's quantized weights dequantized to it
  (``K*N*c`` per weight: a bound on the transient copy a dot on quantized weights may make);
- Adam state: two float32 moments per parameter, sharded like it; gradients: one float32 per parameter;
  compute copy: the params cast to ``--dtype`` (none for float32);
- KV cache: ``2 * layers * b * slots * kv_heads * head_dim * c``;
- activations, a rough bound on what is live at the peak, per layer working set ``W(T, S)`` for T query
  tokens against S keys: attention scores + probabilities ``b*H*T*S*(4+4+c)``, q/k/v/attention output
  ``4*b*T*H*hd*c``, routed experts ``b*T*k*(2*D + 3*F)*c``, shared experts ``3*b*T*F_shared*c``, and
  ``4*b*T*D*c`` of residual/norm temporaries;
  inference: ``max(W(min(L, chunk), slots) + b*V*4 (last-token logits), W(1, slots))``, chunk: the prefill's
  (``generation.prefill_chunk_tokens``);
  with frames: ``+ b*L*D*c`` prompt embeddings ``+ b*N*Q*D*c`` image features ``+ b*N*3*S*S*4`` pixels
  ``+ vision_chunk_bytes(C)`` the tower's activations on one chunk of C frames (``model/aria.py``);
  training (remat): ``layers * b*L*D*c`` saved layer inputs + ``2 * W(L, L)`` (recomputed forward and its
  backward) + ``b*L*V*(c + 4 + 4)`` (logits, float32 log-softmax and its gradient).

Exit status: 0 when every planned step fits ``--hbm``, 1 when one does not, 2 on bad input.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax._src import xla_bridge
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aria_jax import runtime
from aria_jax.cli.checkpoints import fmt_count
from aria_jax.cli.plan_frames import FRAME_SIZE, Frames, frame_bytes
from aria_jax.cli.plan_weights import (
    abstract_tree,
    cpu_int4_extra,
    dequantized_bytes,
    key_path,
    params_bytes,
    parse_quantize,
    weights_label,
)
from aria_jax.cli.plan_xla import memory_stats
from aria_jax.config import PRESETS, AriaConfig
from aria_jax.errors import InputError
from aria_jax.files import check_writable_file, parse_size, resolve_model, write_json_atomic
from aria_jax.inference.budget import check_context_budget
from aria_jax.inference.generation import Decoder, StopRule, prefill_chunk_tokens
from aria_jax.inference.sampling import SamplingConfig
from aria_jax.model.aria import AriaModel
from aria_jax.model.schema import parameter_counts
from aria_jax.parallel.sharding import make_mesh, parse_mesh_spec
from aria_jax.quant import QuantSpec

CHILD_ENV = "ARIA_JAX_PLAN_CHILD"
GIB = 2**30


class PlanError(InputError):
    """Bad input to the planner (exit status 2)."""


def ensure_cpu_devices(n: int) -> bool:
    """Ask for ``n`` virtual CPU devices; False when the JAX backend is already up with too few (or not CPU)."""
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    return runtime.platform() == "cpu" and jax.device_count() >= n


def load_config(model: str) -> AriaConfig:
    if model in PRESETS:
        return AriaConfig.preset(model)
    return AriaConfig.from_pretrained(resolve_model(model))


# -- shapes, shardings and the analytic estimate ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """Per-device work sizes for the activation formulas."""

    rows: int  # batch rows per device
    c: int  # compute dtype bytes
    heads: int  # query heads per device
    vocab: int  # vocabulary entries per device


def _layer_working_set(cfg: AriaConfig, s: Shape, t: int, keys: int) -> int:
    tc = cfg.text
    scores = s.rows * s.heads * t * keys * (4 + 4 + s.c)
    qkvo = 4 * s.rows * t * s.heads * tc.head_dim * s.c
    routed = s.rows * t * tc.moe_topk * (2 * tc.hidden_size + 3 * tc.intermediate_size) * s.c
    shared = 3 * s.rows * t * tc.shared_intermediate_size * s.c
    residual = 4 * s.rows * t * tc.hidden_size * s.c
    return scores + qkvo + routed + shared + residual


def kv_cache_bytes(cfg: AriaConfig, s: Shape, slots: int, kv_heads: int) -> int:
    return 2 * cfg.text.num_hidden_layers * s.rows * slots * kv_heads * cfg.text.head_dim * s.c


def inference_activations(cfg: AriaConfig, s: Shape, seq: int, slots: int) -> int:
    chunk = prefill_chunk_tokens(s.rows, s.heads, slots)
    prefill = _layer_working_set(cfg, s, min(seq, chunk), slots) + s.rows * s.vocab * 4
    return max(prefill, _layer_working_set(cfg, s, 1, slots))


def training_activations(cfg: AriaConfig, s: Shape, seq: int) -> int:
    saved = cfg.text.num_hidden_layers * s.rows * seq * cfg.text.hidden_size * s.c
    return saved + 2 * _layer_working_set(cfg, s, seq, seq) + s.rows * seq * s.vocab * (s.c + 4 + 4)


# -- the compiled steps ----------------------------------------------------------------------------------------


def _batch_spec(mesh: Mesh, batch: int) -> P:
    data = mesh.shape.get("data", 1)
    if batch % data:
        raise PlanError(f"--batch {batch} does not divide over mesh axis 'data' of size {data}")
    return P("data" if data > 1 else None)


def _sds(shape: tuple[int, ...], dtype, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _state_shardings(state: dict, mesh: Mesh, batch: int, kv_spec: P) -> dict:
    """Decoder state: the cache as ``kv_spec``, per-row arrays split like the batch, scalars replicated."""
    rows = _batch_spec(mesh, batch)

    def one(path, x):
        if key_path(path).startswith("cache"):
            return NamedSharding(mesh, kv_spec)
        return NamedSharding(mesh, P(*rows) if x.ndim and x.shape[0] == batch else P())

    return jax.tree_util.tree_map_with_path(one, state)


def accelerator_runtime(quant: QuantSpec | None) -> runtime.Runtime:
    """This platform's runtime holding ``quant`` weights as a GPU/TPU does: int4 two per byte, XLA's dot forms."""
    base = runtime.detect()
    return base if quant is None else base.replace(quant=quant, int4_packed=True, quant_fused_rows=0)


def compile_inference(cfg: AriaConfig, mesh: Mesh, params: dict, dtype, batch: int, seq: int, max_new: int,
                      frames: Frames | None = None, quant: QuantSpec | None = None) -> dict:
    eos = cfg.text.eos_token_id
    rule = StopRule(tuple(eos) if isinstance(eos, tuple) else (() if eos is None else (eos,)),
                    cfg.text.pad_token_id or 0, max_new)
    decoder = Decoder(AriaModel(cfg, dtype=dtype, mesh=mesh, runtime=accelerator_runtime(quant)))
    slots, sampling = seq + max_new, SamplingConfig()
    rows = _batch_spec(mesh, batch)
    tensor = mesh.shape.get("tensor", 1)
    kv_spec = P(None, *rows, "tensor" if tensor > 1 else None, None, None)  # (L, B, kv_heads, ., .)

    def prefill(params, input_ids, attention_mask, *pixels):
        return decoder._prefill_impl(params, input_ids, attention_mask, *(pixels or (None, None)),
                                     jax.random.key(0), cache_len=slots, sampling=sampling, rule=rule)

    ids = _sds((batch, seq), jnp.int32, mesh, P(*rows, None))
    pixels = ()
    if frames:
        images, side = batch * frames.count, frames.size
        pixels = (_sds((images, cfg.vision.num_channels, side, side), jnp.float32, mesh, P()),
                  _sds((images, side, side), jnp.bool_, mesh, P()))
    state = jax.eval_shape(prefill, params, ids, ids, *pixels)
    state_sh = _state_shardings(state, mesh, batch, kv_spec)
    out = {}
    start = time.perf_counter()
    compiled = jax.jit(prefill, out_shardings=state_sh, keep_unused=True).lower(params, ids, ids, *pixels).compile()
    out["prefill"] = memory_stats(compiled)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    step = jax.jit(functools.partial(decoder._step_impl, sampling=sampling, rule=rule),
                   out_shardings=state_sh, donate_argnums=(1,), keep_unused=True)
    out["decode"] = memory_stats(step.lower(params, abstract_state).compile())
    out["seconds"] = time.perf_counter() - start
    return out


def compile_training(cfg: AriaConfig, mesh: Mesh, params: dict, dtype, batch: int, seq: int) -> dict:
    """forward + backward (remat) + AdamW on float32 ``params``, computing in ``dtype``."""

    module = AriaModel(cfg, dtype=dtype, mesh=mesh, remat=True, runtime=runtime.detect())
    tx = optax.adamw(1e-5, weight_decay=0.1)
    replicated = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    state = jax.eval_shape(tx.init, params)
    state_sh = optax.tree_map_params(tx, lambda _, s: s, state, param_sh,
                                     transform_non_params=lambda _: replicated)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)

    def loss_fn(params, input_ids, attention_mask):
        compute = jax.tree.map(lambda p: p.astype(dtype), params)
        logits = module.apply({"params": compute}, input_ids, attention_mask).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
        mask = attention_mask[:, 1:].astype(jnp.float32)
        return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def train_step(params, opt_state, input_ids, attention_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids, attention_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = _sds((batch, seq), jnp.int32, mesh, P(*_batch_spec(mesh, batch), None))
    step = jax.jit(train_step, out_shardings=(param_sh, state_sh, replicated), donate_argnums=(0, 1),
                   keep_unused=True)
    start = time.perf_counter()
    stats = memory_stats(step.lower(params, opt_state, ids, ids).compile())
    return {"step": stats, "seconds": time.perf_counter() - start}


# -- the report ------------------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most); "n/a" when unknown."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _row(label: str, *cells: str) -> str:
    return f"  {label:<44}" + "".join(f"{c:>18}" for c in cells)


_XLA_ROWS = (
    ("XLA arguments", "argument"),
    ("XLA outputs", "output"),
    ("XLA aliased (donated)", "alias"),
    ("XLA temporaries", "temp"),
    ("  of which CPU-only f32 copies of bf16 args", "cpu_upcast"),
    ("XLA peak = args + out - alias + temp", "peak"),
    ("XLA peak without the CPU-only copies", "peak_accelerator"),
)


def _xla_rows(*stats: dict[str, int] | None) -> list[str]:
    return [_row(label, "", *(_gib(s and s[key]) for s in stats)) for label, key in _XLA_ROWS]


def quantize_and_mode(args) -> tuple[QuantSpec | None, str]:
    """(``--quantize``, the steps to plan): ``--mode``, by default both, or inference alone with ``--quantize``."""
    quant = parse_quantize(args.quantize)
    mode = args.mode or ("infer" if quant else "both")
    if quant and mode != "infer":
        raise PlanError(f"--mode {mode} --quantize {quant.format}: plan plans inference on quantized weights; "
                        "training over a quantized base (QLoRA, recipe key quantize_base) is not planned yet")
    return quant, mode


def run_plan(args) -> tuple[list[str], dict[str, Any], bool]:
    """(report lines, machine-readable report, fits) for parsed CLI ``args``."""
    cfg = load_config(args.model)
    mesh = make_mesh(args.mesh, jax.devices()[: math.prod(parse_mesh_spec(args.mesh).values())])
    dtype = jnp.dtype(args.dtype)
    hbm = parse_size(args.hbm, "--hbm", PlanError, unit_required=True)
    quant, mode = quantize_and_mode(args)
    data, tensor = mesh.shape.get("data", 1), mesh.shape.get("tensor", 1)
    batch = args.batch if args.batch is not None else data
    frame_count = getattr(args, "frames", None) or 0
    text_seq = args.seq if args.seq is not None else (64 if frame_count else 4096)
    if batch < 1 or text_seq < 2 or args.max_new_tokens < 1 or frame_count < 0:
        raise PlanError("--batch must be >= 1, --seq >= 2, --max-new-tokens >= 1 and --frames >= 0")
    _batch_spec(mesh, batch)
    counts = parameter_counts(cfg)
    shape = Shape(batch // data, dtype.itemsize, cfg.text.num_attention_heads // tensor, cfg.text.vocab_size // tensor)
    kv_heads = cfg.text.num_key_value_heads // tensor
    frames = Frames.of(cfg, frame_count, dtype.itemsize, shape.rows * frame_count) if frame_count else None
    seq = text_seq + (frames.count * frames.tokens if frames else 0)
    if frames:  # one line naming the frame count that fits, before anything compiles
        row = [cfg.image_token_id] * (frames.count * frames.tokens) + [0] * text_seq
        check_context_budget([row], cfg.image_token_id, frames.tokens, args.max_new_tokens,
                             cfg.text.max_position_embeddings)
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [
        f"model {args.model}: {counts['total']:,} parameters ({fmt_count(counts['total'])}), "
        f"{fmt_count(counts['active_per_token'])} active per text token",
        f"mesh {mesh_text} ({mesh.size} virtual CPU devices), compute dtype {dtype.name}, "
        f"batch {batch} ({shape.rows} per device), seq {seq}, HBM {args.hbm} = {hbm / GIB:.2f} GiB per device",
    ]
    report: dict[str, Any] = {"model": args.model, "mesh": dict(mesh.shape), "dtype": dtype.name, "batch": batch,
                              "seq": seq, "frames": frame_count, "hbm_bytes": hbm, "parameters": counts,
                              "quantize": quant and quant.to_json()}
    fits = True

    def verdict(name: str, analytic: int, compiled: int | None) -> None:
        nonlocal fits
        worst = max(analytic, compiled or 0)
        ok = worst <= hbm
        fits &= ok
        lines.append(f"  {name}: {'fits' if ok else 'DOES NOT FIT'} in {args.hbm}: needs {_gib(worst)} of "
                     f"{_gib(hbm)} ({100 * worst / hbm:.0f}%; the larger of analytic and compiled without CPU copies)")
        report[name]["fits"] = ok

    if mode in ("infer", "both"):
        slots = seq + args.max_new_tokens
        params = abstract_tree(cfg, dtype, mesh, quant=quant)
        pb = params_bytes(params)
        kv = kv_cache_bytes(cfg, shape, slots, kv_heads)
        act = inference_activations(cfg, shape, seq, slots)
        dequant = {"dequantized_layer": dequantized_bytes(params, cfg, dtype.itemsize)} if quant else {}
        video = frame_bytes(cfg, shape, frames, seq) if frames else {}
        analytic = {"params": pb["total"], "routed_experts": pb["routed_experts"], "quantized_weights": pb["quantized"],
                    "float_params": pb["float"], "kv_cache": kv, "activations": act, **dequant, **video,
                    "total": pb["total"] + kv + act + sum(dequant.values()) + sum(video.values())}
        cpu_extra = cpu_int4_extra(cfg, dtype, mesh, quant)
        if cpu_extra:
            analytic["cpu_int4_extra"] = cpu_extra
        compiled = compile_inference(cfg, mesh, params, dtype, batch, seq, args.max_new_tokens, frames, quant)
        pre, dec = compiled["prefill"], compiled["decode"]
        peak = max(pre["peak_accelerator"], dec["peak_accelerator"]) if pre and dec else None
        report["inference"] = {"analytic": analytic, "compiled": compiled}
        lines += [
            "",
            f"inference: prefill {batch} x {seq} tokens into a {slots}-slot KV cache, then one decode step "
            f"(params {weights_label(dtype, quant)}; compiled in {compiled['seconds']:.0f} s)",
            *([f"video: {frames.count} frames per row at {frames.size} px, {frames.tokens} tokens each "
               f"({frames.count * frames.tokens} image + {text_seq} text tokens); vision tower in chunks of "
               f"{frames.chunk} frames"] if frames else []),
            _row("per device", "analytic", "compiled prefill", "compiled decode"),
            _row(f"parameters (routed experts {_gib(pb['routed_experts'])})", _gib(pb["total"])),
            *([_row(f"  {quant.format} weights (values + float32 scales)", _gib(pb["quantized"])),
               _row(f"  float parameters ({dtype.name})", _gib(pb["float"]))] if quant else []),
            _row("KV cache", _gib(kv)),
            _row("activations / temporaries", _gib(act)),
            *([_row(f"one layer's weights dequantized to {dtype.name}", _gib(dequant["dequantized_layer"]))]
              if quant else []),
            *([_row("pixel values (float32)", _gib(video["pixels"])),
               _row("image features", _gib(video["image_features"])),
               _row("prompt embeddings", _gib(video["embeddings"])),
               _row(f"vision tower, one chunk of {frames.chunk} frames", _gib(video["vision_chunk"]))]
              if frames else []),
            _row("total", _gib(analytic["total"])),
            *_xla_rows(pre, dec),
        ]
        verdict("inference", analytic["total"], peak)
        if cpu_extra:
            lines.append(f"  (planned for GPU/TPU, int4 two per byte; the CPU runtime holds int4 one per byte: "
                         f"+{_gib(cpu_extra)})")

    if mode in ("train", "both"):
        params = abstract_tree(cfg, jnp.float32, mesh, getattr(args, "fsdp", False))
        pb = params_bytes(params)
        adam = 2 * pb["total"]
        copy = 0 if dtype == jnp.float32 else params_bytes(params, dtype.itemsize)["total"]
        act = training_activations(cfg, shape, text_seq)
        analytic = {"params": pb["total"], "routed_experts": pb["routed_experts"], "adam": adam,
                    "grads": pb["total"], "compute_copy": copy, "activations": act}
        analytic["total"] = sum(v for k, v in analytic.items() if k != "routed_experts")
        compiled = compile_training(cfg, mesh, params, dtype, batch, text_seq)
        st = compiled["step"]
        report["train"] = {"analytic": analytic, "compiled": compiled}
        lines += [
            "",
            f"training: forward + backward (remat per layer) + AdamW on {batch} x {text_seq} tokens "
            f"(float32 master params, {dtype.name} compute; compiled in {compiled['seconds']:.0f} s)",
            _row("per device", "analytic", "compiled step"),
            _row(f"parameters f32 (routed experts {_gib(pb['routed_experts'])})", _gib(pb["total"])),
            _row("AdamW moments (2 x f32)", _gib(adam)),
            _row("gradients (f32)", _gib(pb["total"])),
            _row(f"params cast to {dtype.name}", _gib(copy)),
            _row("activations (remat)", _gib(act)),
            _row("total", _gib(analytic["total"])),
            *_xla_rows(st),
        ]
        verdict("train", analytic["total"], st and st["peak_accelerator"])
    report["fits"] = fits
    return lines, report, fits


def cmd_plan(args) -> int:
    needed = math.prod(parse_mesh_spec(args.mesh).values())  # MeshError (exit 2) before anything heavy
    parse_size(args.hbm, "--hbm", PlanError, unit_required=True)
    quantize_and_mode(args)
    if args.json:
        check_writable_file(args.json, PlanError)  # not after a minute of compiling
    if not ensure_cpu_devices(needed):
        if os.environ.get(CHILD_ENV):
            raise PlanError(f"mesh '{args.mesh}' needs {needed} CPU devices but JAX started with "
                            f"{jax.device_count()} {runtime.platform()} device(s)")
        # The backend is already up with too few devices: plan in a fresh process that can ask for them.
        return subprocess.call([sys.executable, "-m", "aria_jax.cli", *args.argv], env={**os.environ, CHILD_ENV: "1"})
    lines, report, fits = run_plan(args)
    print("\n".join(lines))
    if args.json:
        write_json_atomic(args.json, report, indent=1)
    return 0 if fits else 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-device memory of inference and training on a mesh (abstract compile, allocates nothing)",
        description="Plan the per-device memory of the inference step (prefill + one decode step) and the "
        "training step (forward + backward with remat + AdamW, float32 master weights) on a device mesh. The "
        "steps are compiled for virtual CPU devices from abstract arrays; nothing is allocated. Prints an "
        "analytic estimate next to XLA's memory analysis. Exit status: 0 fits, 1 does not fit --hbm, "
        "2 bad input.",
    )
    p.add_argument("--model", required=True, help="a preset (aria, tiny), a model directory or a hub id")
    p.add_argument("--mesh", default="expert=1", help="mesh like 'expert=8' or 'data=4,expert=8' (axes data, "
                   "expert, tensor; default: one device)")
    p.add_argument("--mode", choices=["infer", "train", "both"], default=None,
                   help="which steps (both; infer with --quantize)")
    p.add_argument("--batch", type=int, default=None, help="global batch rows (default: the data axis size)")
    p.add_argument("--seq", type=int, default=None,
                   help="prompt / training sequence length (4096); with --frames, the prompt's text tokens (64)")
    p.add_argument("--frames", type=int, default=0, metavar="N",
                   help=f"inference: a video prompt with N frames per row at {FRAME_SIZE} px (their image tokens "
                   "added to --seq); fails naming the frame count that fits when the context is too short")
    p.add_argument("--max-new-tokens", type=int, default=256, help="decode tokens the KV cache holds (256)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype; inference params are stored in it too (bfloat16)")
    p.add_argument("--quantize", default=None, metavar="int8|int4",
                   help="inference on weight-only quantized weights (aria_jax.quant): int8 per channel or int4 in "
                   "groups of 128 (two per byte, as GPUs and TPUs hold them) for the language model's linear layers; "
                   "norms, router, embeddings, vision tower and projector stay in --dtype")
    p.add_argument("--hbm", default="80GB", help="memory per device, e.g. 80GB, 95GB, 16GiB (80GB)")
    p.add_argument("--fsdp", action="store_true",
                   help="training: also shard every weight (and its gradient and Adam state) over the data axis")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=cmd_plan)
