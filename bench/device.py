"""Full-size Aria on one accelerator: decode, image prefill, every expert kernel, a training step, quantized weights.

    python bench/device.py --json bench/device.json      # one GPU (H100 80 GB / H200 141 GB): under 10 minutes
    python bench/device.py --smoke --json /tmp/d.json    # the same code on the tiny preset on CPU, tiny sizes

The ``aria`` preset (25.3B parameters) in bfloat16, random weights made on the device (``random_params``). Sections:
env and rates (copy bandwidth, bf16 matmul; the data-sheet peak, ``roofline.DEVICE_PEAKS``, else the matmul); decode
at batch 1 and 8 against the HBM floor (``roofline.decode_bytes`` with the distinct experts the router picked, and
the KV cache, over the measured bandwidth); image prefill at 490 and 980 px (FLOP/s, share of the peak); each expert
kernel of ``aria_jax.runtime.EXPERT_KERNELS`` (read at run time) forced: 490 px prefill and batch-8 decode, a
failing one reported with its error; a training step (loss and gradients of ``aria_jax.training.steps``' objective)
of the model cut to a few layers at full width, per kernel, with MFU; int8/int4 weights' decode against their floors.

Each section has a share of ``--budget`` seconds, its deadline the sum of the shares so far; a measurement starts
only if it should end by then, taking as long as the one before (else it is reported as skipped). ``--json`` is
rewritten after every section, so a run cut short keeps what it measured; a table ends the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform as host
import sys
import time
from importlib import metadata
from importlib.util import find_spec

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # aria_jax from this checkout where it is not installed (device machines)

import roofline  # noqa: E402
from device_report import print_report  # noqa: E402

SKIPPED = {"skipped": "time budget spent"}
SECTIONS = ("decode", "prefill", "backends", "training", "quantized")
# Shares of --budget: the model's setup first (rates, random weights), then each section.
SHARES = {"setup": 0.1, "decode": 0.3, "prefill": 0.15, "backends": 0.2, "training": 0.15, "quantized": 0.1}
# Random int8/int4 weights: a scale that gives them the float weights' standard deviation (0.02).
WEIGHT_STD = 0.02
UNIFORM_STD = {"int8": 127 / 3**0.5, "int4": 8 / 3**0.5}


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    prompt: int  # decode prompt tokens
    new_tokens: int  # timed decode steps
    repeats: int
    image_px: tuple[int, ...]
    train_layers: int
    train_batch: int
    train_seq: int
    train_kernels: int  # expert kernels the training section tries (the platform's first)
    bandwidth_gib: float
    matmul_n: int
    host_bytes: int  # random_params: leaves up to this are drawn on the host, bigger ones on the device
    block_bytes: int  # ... in blocks of rows of about this size


FULL = Sizes("aria", 64, 32, 3, (490, 980), 4, 8, 1024, 8, 2.0, 8192, 64 << 20, 1 << 30)
SMOKE = Sizes("tiny", 8, 2, 1, (490, 980), 2, 2, 16, 1, 0.01, 128, 16 << 10, 64 << 10)


class Clock:
    """Section deadlines from the start: each the sum of the shares of ``budget`` up to its section."""

    def __init__(self, budget_s: float):
        self.start = self.deadline = time.monotonic()
        self.budget = budget_s

    def section(self, name: str) -> None:
        self.deadline += SHARES[name] * self.budget

    def left(self, need: float = 0.0) -> bool:
        """Whether a measurement expected to take ``need`` seconds ends before the section's deadline."""
        return time.monotonic() + need < self.deadline


def each(names, fn, clock: Clock, estimate: bool = True) -> dict:
    """``attempt(fn, name)`` per name while the section's time allows (``estimate``: each expected to take as long as
    the last; else started whenever the deadline has not passed)."""
    out, last = {}, 0.0
    for name in names:
        if not clock.left(last if estimate else 0.0):
            out[str(name)] = SKIPPED
            continue
        start = time.monotonic()
        out[str(name)] = attempt(fn, name)
        last = time.monotonic() - start
    return out


def attempt(fn, *args) -> dict:
    """``fn(*args)``, or ``{"error": ...}`` naming what it raised: one kernel or size failing ends nothing."""
    try:
        return fn(*args)
    except Exception as e:  # a kernel this platform cannot run, out of memory, ...: reported, the run goes on
        text = str(e).strip()
        return {"error": f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"}
    finally:
        gc.collect()


# -- random weights ---------------------------------------------------------------------------------------------
RANGES = {"int8": (-127, 127), "int4": (-8, 8), "bits": (0, 256)}  # [low, high) of random quantized values
CONSTANTS = {"ones": 1.0, "zeros": 0.0}


def _kind(name: str, dtype: np.dtype, quant) -> str:
    if name.endswith("_q"):
        return "bits" if dtype == np.uint8 else quant.format  # packed int4: any byte holds two valid values
    return "qscale" if name.endswith("_scale") else "ones" if name == "scale" else "zeros" if name.endswith(
        "bias") else "normal"


def _draw(key, kind: str, shape: tuple, dtype):
    """A random leaf of ``kind``: on the host (``key`` a numpy Generator) or the device (a JAX key)."""
    if isinstance(key, np.random.Generator):
        if kind == "normal":
            return (WEIGHT_STD * key.standard_normal(shape, np.float32)).astype(dtype)
        return key.integers(*RANGES[kind], shape, dtype)
    import jax

    if kind == "normal":
        return WEIGHT_STD * jax.random.normal(key, shape, dtype)
    return jax.random.randint(key, shape, *RANGES[kind], dtype)


def random_params(cfg, dtype, quant=None, packed: bool = True, sz: Sizes = FULL, seed: int = 0) -> dict:
    """Every parameter ``aria_jax.model.schema`` declares (stacked layout; ``quant``: int8/int4 values and float32
    scales as aria_jax.quant stores them), random: normal(0.02) weights, unit norms, zero biases, quantized values
    uniform with scales giving the same deviation. Leaves up to ``sz.host_bytes`` are drawn by numpy on the host (no
    compile per shape); bigger ones on the device, a block of rows (first axis, about ``sz.block_bytes``) at a time
    into a donated buffer: making one takes a block more than the leaf, and the model never passes through the
    host's memory."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict

    from aria_jax.model.schema import stored_specs

    def put(buf, key, start, rows: int, kind: str):
        return jax.lax.dynamic_update_slice_in_dim(buf, _draw(key, kind, (rows, *buf.shape[1:]), buf.dtype), start, 0)

    fill = jax.jit(put, static_argnums=(3, 4), donate_argnums=(0,))
    root, rng, params = jax.random.key(seed), np.random.default_rng(seed), {}
    constants = {**CONSTANTS, "qscale": quant and WEIGHT_STD / UNIFORM_STD[quant.format]}
    for n, (path, (shape, _, leaf_dtype)) in enumerate(stored_specs(cfg, jnp.dtype(dtype), quant, packed).items()):
        kind = _kind(path.rsplit("/", 1)[-1], leaf_dtype, quant)
        row_bytes = int(np.prod(shape[1:])) * leaf_dtype.itemsize
        if kind in constants:
            leaf = jnp.full(shape, constants[kind], leaf_dtype)
        elif len(shape) > 1 and shape[0] * row_bytes > sz.host_bytes:
            leaf, rows = jnp.zeros(shape, leaf_dtype), min(shape[0], max(1, sz.block_bytes // row_bytes))
            for i, start in enumerate(range(0, shape[0], rows)):  # the last block ends at the last row
                key = jax.random.fold_in(jax.random.fold_in(root, n), i)
                leaf = fill(leaf, key, min(start, shape[0] - rows), rows, kind)
        else:
            leaf = jax.device_put(_draw(rng, kind, tuple(shape), leaf_dtype))
        params[tuple(path.split("/"))] = leaf
    return jax.block_until_ready(unflatten_dict(params))


# -- measurements -------------------------------------------------------------------------------------------------
def memory_gib(key: str) -> float | None:
    """``bytes_limit`` or ``peak_bytes_in_use`` of the device in GiB (None where the backend keeps no statistics)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats[key] / 2**30 if key in stats else None


def environment() -> dict:
    import jax

    device, names = jax.devices()[0], ("jax", "jaxlib", "flax", "qwix")
    return {"python": host.python_version(), **{n: metadata.version(n) for n in names if find_spec(n)},
            "platform": device.platform, "device_kind": device.device_kind, "devices": jax.device_count(),
            "memory_gib": memory_gib("bytes_limit")}


def rates(sz: Sizes, kind: str) -> dict:
    bandwidth, matmul = roofline.measure_device_bandwidth(sz.bandwidth_gib), roofline.measure_device_matmul(sz.matmul_n)
    sheet = roofline.device_peak(kind)
    return {"copy_bandwidth": bandwidth, "bf16_matmul": matmul, "sheet_flops": sheet and sheet[0],
            "sheet_bandwidth": sheet and sheet[1], "peak_flops": sheet[0] if sheet else matmul,
            "peak_source": "data sheet" if sheet else "measured matmul"}


def warm_median(once, repeats: int) -> tuple[float, float]:
    """(wall seconds of the first ``once()``, which compiles; the median of what ``repeats`` more calls return)."""
    start = time.perf_counter()
    once()
    first = time.perf_counter() - start
    return first, float(np.median([once() for _ in range(repeats)]))


def decode_rate(model, batch: int, sz: Sizes) -> tuple[dict, np.ndarray]:
    """Greedy decode of ``new_tokens`` after a random prompt (eos held off): ({tok_s, step_ms, first_call_s}, the
    prompt + generated tokens)."""
    ids = np.random.default_rng(batch).integers(10, model.config.text.vocab_size, (batch, sz.prompt))
    n, new = sz.new_tokens, []

    def once() -> float:
        new[:] = [model.generate(ids, np.ones_like(ids), max_new_tokens=n + 1, min_new_tokens=n + 1)]
        return model.last_stats.decode_s / n

    first, step = warm_median(once, sz.repeats)
    rate = {"tok_s": batch / step, "step_ms": 1000 * step, "first_call_s": first}
    return rate, np.concatenate([ids, new[0][:, :n]], 1)


def distinct_experts(model, seqs: dict[int, np.ndarray], first: int) -> dict[int, float]:
    """Per batch: the mean number of distinct experts per layer its decode steps (positions >= first) were routed
    to, from one jitted router pass over every batch's rows (rows do not see each other)."""
    import jax

    rows, module = np.concatenate(list(seqs.values())), model.module
    router = jax.jit(lambda p, ids: module.apply({"params": p}, ids, compute_logits=False).router_logits)
    logits = router(model.params, rows)
    top = np.asarray(jax.lax.top_k(logits, model.config.text.moe_topk)[1]).reshape(logits.shape[0], *rows.shape, -1)
    out, start = {}, 0
    for batch in seqs:
        part = top[:, start : start + batch]
        out[batch] = float(np.mean([len(np.unique(part[layer, :, pos])) for layer in range(part.shape[0])
                                    for pos in range(first, rows.shape[1])]))
        start += batch
    return out


def decode(model, sz: Sizes, clock: Clock, bandwidth: float, quant=None, inject: bool = False) -> dict:
    """Batch 1 and 8, each with its HBM floor (bytes read per step / measured bandwidth)."""
    if inject:
        raise RuntimeError(f"injected failure of '{model.runtime.experts}' (--inject-failure)")
    seqs = {}

    def one(batch: int) -> dict:
        rate, seqs[batch] = decode_rate(model, batch, sz)
        return rate

    out = {f"batch_{b}": r for b, r in each((1, 8), one, clock, estimate=False).items()}
    if seqs:
        experts = distinct_experts(model, seqs, sz.prompt)
        itemsize = np.dtype(model.dtype).itemsize
        for batch, count in experts.items():
            step_bytes = roofline.decode_bytes(model.config, batch, count, sz.prompt + sz.new_tokens / 2, quant,
                                               model.runtime.int4_packed, itemsize)
            r = out[f"batch_{batch}"]
            floor_s = step_bytes / bandwidth
            r.update(experts_per_layer=count, step_gb=step_bytes / 1e9, floor_tok_s=batch / floor_s,
                     of_floor=floor_s / (r["step_ms"] / 1000))
    return out


def image_inputs(cfg, px: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One random px-square image, its image tokens between 8 and 24 text tokens: (ids, pixels, patches)."""
    rng = np.random.default_rng(px)
    patches = (px // cfg.vision.patch_size) ** 2
    vocab = cfg.text.vocab_size
    image = np.full((1, cfg.queries_for_patches(patches)), cfg.image_token_id)
    ids = np.concatenate([rng.integers(10, vocab, (1, 8)), image, rng.integers(10, vocab, (1, 24))], 1)
    return ids, rng.uniform(-1, 1, (1, 3, px, px)).astype(np.float32), patches


def prefill(model, px: int, sz: Sizes, peak: float) -> dict:
    """First-token latency of one image prompt (``generate_stream`` with one new token: the prefill alone)."""
    cfg = model.config
    ids, pixels, patches = image_inputs(cfg, px)

    def once() -> float:
        for _ in model.generate_stream(ids, pixel_values=pixels, max_new_tokens=1):
            pass
        return model.last_stats.prefill_ms

    first, ms = warm_median(once, sz.repeats)
    flops = roofline.vision_flops(cfg, 1, patches) + roofline.text_flops(cfg, ids.shape[1], ids.shape[1], 1)
    return {"ms": ms, "tokens": int(ids.shape[1]), "first_call_s": first, "tflop_s": flops / ms / 1e9,
            "of_peak": flops / (ms / 1000) / peak}


def backend(name: str, params, cfg, dtype, base, sz: Sizes, clock: Clock, inject: str | None) -> dict:
    """One expert kernel forced (``moe_backend`` where aria_jax.kernels.experts knows the name, and the runtime's
    kernel for many rows) on the stacked layout: 490 px prefill, then batch-8 decode if the time allows."""
    from aria_jax import Aria
    from aria_jax.kernels.experts import MOE_BACKENDS

    if name == inject:
        raise RuntimeError(f"injected failure of '{name}' (--inject-failure)")
    forced = name if name in MOE_BACKENDS else "auto"
    model = Aria(cfg, params, dtype, forced, layout="stacked", runtime=base.replace(experts=name))
    start = time.monotonic()
    out = {"forced": forced != "auto", "prefill_490_ms": prefill(model, min(sz.image_px), sz, 1.0)["ms"]}
    if clock.left(time.monotonic() - start):
        out["decode_8_tok_s"] = decode_rate(model, 8, sz)[0]["tok_s"]
    return out


def training(cfg, dtype, base, sz: Sizes, peak: float, clock: Clock, kernels: list[str], inject: str | None) -> dict:
    """Loss and gradients (no optimizer update) of the model cut to ``train_layers`` layers, per expert kernel."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from aria_jax.parallel import layout as param_layout
    from aria_jax.training import steps as S
    from aria_jax.training.trainer import resolve_scan_layers

    if not clock.left():
        return SKIPPED
    small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=sz.train_layers))
    trainable, frozen = (traverse_util.unflatten_dict(t) for t in S.split_params(
        random_params(small, dtype, sz=sz), lambda p: p[0] != "vision_tower"))  # the text model trains
    layerwise = not resolve_scan_layers(None, base)  # the layout train.py picks: per layer on CPU
    if layerwise:
        trainable, frozen = param_layout.unroll_layers(trainable), param_layout.unroll_layers(frozen)
    b, t = sz.train_batch, sz.train_seq
    ids = np.random.default_rng(0).integers(10, cfg.text.vocab_size, (b, t)).astype(np.int32)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, t), jnp.int32), "labels": jnp.asarray(ids)}
    flops = b * roofline.text_flops(small, t, t, t, train=True)

    def step_of(name: str) -> dict:
        from aria_jax.kernels.experts import MOE_BACKENDS
        from aria_jax.model.aria import AriaModel

        if name == inject:
            raise RuntimeError(f"injected failure of '{name}' (--inject-failure)")
        module = AriaModel(small, moe_backend=name if name in MOE_BACKENDS else "auto", dtype=dtype,
                           layout="per_layer" if layerwise else "stacked", runtime=base.replace(experts=name))
        grad_fn = S.make_grad_fn(S.make_objective(module, S.LossSpec(cfg.text.moe_topk, 1e-3, 1e-5, 1, None,
                                                                     compute_dtype=dtype)))
        spare, losses = [jax.tree.map(jnp.zeros_like, trainable)], []

        def once() -> float:
            start = time.perf_counter()
            (loss, _), spare[0] = grad_fn(spare[0], trainable, frozen, data, jax.random.key(0), jnp.float32(b * t))
            losses.append(float(jax.block_until_ready(loss)))
            return time.perf_counter() - start

        first, s = warm_median(once, sz.repeats)
        return {"step_s": s, "first_step_s": first, "tokens_s": b * t / s, "tflop_s": flops / s / 1e12,
                "mfu": flops / s / peak, "loss": losses[-1]}

    return {"layers": sz.train_layers, "batch": b, "seq": t, "tflop_per_step": flops / 1e12,
            **each(kernels, step_of, clock)}


def quantized(fmt: str, cfg, dtype, base, sz: Sizes, clock: Clock, bandwidth: float) -> dict:
    from aria_jax import Aria
    from aria_jax.quant import QuantSpec

    runtime = base.replace(quant=QuantSpec(fmt))
    start = time.perf_counter()
    model = Aria(cfg, random_params(cfg, dtype, runtime.quant, runtime.int4_packed, sz=sz),
                 dtype, runtime=runtime)
    return {"weights_s": time.perf_counter() - start, **decode(model, sz, clock, bandwidth, runtime.quant)}


# -- the run ------------------------------------------------------------------------------------------------------
def run(args, sz: Sizes, report: dict, save) -> None:
    import jax
    import jax.numpy as jnp

    from aria_jax import Aria, AriaConfig
    from aria_jax.runtime import EXPERT_KERNELS, detect

    clock, wanted, inject = Clock(args.budget), args.sections, args.inject_failure
    cfg, dtype, base = AriaConfig.preset(sz.preset), jnp.bfloat16, detect()
    report["env"] = {**environment(), "preset": sz.preset, "runtime": base.describe()}
    report["rates"] = rates(sz, report["env"]["device_kind"])
    bandwidth, peak = report["rates"]["copy_bandwidth"], report["rates"]["peak_flops"]
    clock.section("setup")
    if report["env"]["platform"] == "cpu" and not args.smoke:
        fail("jax runs on the CPU here (no accelerator), and the full-size model needs one: use --smoke")
    start = time.perf_counter()
    params = random_params(cfg, dtype, sz=sz)
    leaves = jax.tree.leaves(params)
    report["weights"] = {"s": time.perf_counter() - start, "gb": sum(x.nbytes for x in leaves) / 1e9,
                         "parameters_b": sum(x.size for x in leaves) / 1e9}
    del leaves
    save()
    model = Aria(cfg, params, dtype, runtime=base)  # the platform's layout and kernels
    clock.section("decode")
    if "decode" in wanted:
        report["decode"] = attempt(decode, model, sz, clock, bandwidth, None, inject == base.experts)
        if any("error" in r for r in report["decode"].values() if isinstance(r, dict)) or "error" in report["decode"]:
            # the platform's kernels failed: again with the portable ones (jax.lax.ragged_dot, einsum attention)
            portable = base.replace(**{k: v for k, v in (("experts", "ragged"), ("attention", "einsum"))
                                       if hasattr(base, k)})
            model = Aria(cfg, params, dtype, runtime=portable)
            report["decode"] = {**attempt(decode, model, sz, clock, bandwidth), "failed": report["decode"]}
            report["env"]["runtime"] = portable.describe() + " (fallback for decode and prefill)"
        save()
    clock.section("prefill")
    if "prefill" in wanted:
        report["prefill"] = each(sz.image_px, lambda px: prefill(model, px, sz, peak), clock, estimate=False)
        save()
    model = None  # the bfloat16 model's weights stay in params
    clock.section("backends")
    kernels = [base.experts, *(k for k in EXPERT_KERNELS if k != base.experts)]  # the platform's first
    if "backends" in wanted:
        report["backends"] = each(kernels, lambda k: backend(k, params, cfg, dtype, base, sz, clock, inject), clock)
        save()
    params = None  # the bfloat16 model goes before the training and quantized ones come
    gc.collect()
    clock.section("training")
    if "training" in wanted:
        report["training"] = attempt(training, cfg, dtype, base, sz, peak, clock, kernels[: sz.train_kernels], inject)
        save()
    clock.section("quantized")
    if "quantized" in wanted:
        report["quantized"] = each(args.quantize, lambda f: quantized(f, cfg, dtype, base, sz, clock, bandwidth), clock)
    report.update(peak_memory_gib=memory_gib("peak_bytes_in_use"), elapsed_s=time.monotonic() - clock.start)
    save()


def fail(message: str) -> None:
    """Bad input: one line naming it, exit status 2."""
    print(f"bench/device.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here (rewritten after every section)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on CPU with tiny sizes (CI)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sections together")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quantize", default="int8,int4", help="weight formats of the quantized section, or none")
    parser.add_argument("--inject-failure", help=argparse.SUPPRESS)  # tests: this expert kernel raises
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        fail(f"--sections: unknown section '{unknown[0]}'; choose from {', '.join(SECTIONS)}")
    args.quantize = [] if args.quantize == "none" else [f for f in args.quantize.split(",") if f]
    if any(f not in ("int8", "int4") for f in args.quantize):
        fail(f"--quantize: unknown format in '{','.join(args.quantize)}'; choose from int8, int4, none")
    if not args.budget > 0:
        fail(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        fail(f"--json: directory '{os.path.dirname(os.path.abspath(args.json))}' does not exist")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported
    # JAX takes 75% of a GPU's memory by default: 60 GB of an H100, about what the 50.6 GB bfloat16 model and the
    # largest step's work space need together; the user's own setting stands
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    report: dict = {"smoke": args.smoke, "budget_s": args.budget}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"[{time.strftime('%H:%M:%S')}] done: {', '.join(report)}", flush=True)

    run(args, SMOKE if args.smoke else FULL, report, save)
    print_report(report)


if __name__ == "__main__":
    main()
