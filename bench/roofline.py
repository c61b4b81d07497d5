"""This machine's limits, measured in the benchmark's own run, and the floors they put under each benchmark.

- memory bandwidth: a large array copy (bytes read + bytes written per second);
- matmul rate: a large float32 matmul under ``jax.jit`` (FLOP/s);
- decode floor: bytes the step really reads (the weights of the layers, of the experts the batch's tokens were
  routed to, lm_head, and the KV cache) / bandwidth;
- prefill and training floors: useful FLOPs (only the k routed experts per token, causal attention half) / rate;
- on an accelerator (bench/device.py): its copy bandwidth and bf16 matmul rate measured on the device, and its
  data-sheet peaks (``DEVICE_PEAKS``).

    python bench/roofline.py       # prints the two rates
"""

from __future__ import annotations

import time

import numpy as np

BYTES = 4  # float32 throughout the CPU benchmarks


def measure_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """Bytes per second moved by copying a ``gib`` GiB array (read + write), best of ``repeats``."""
    src = np.ones(int(gib * 2**30) // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def measure_matmul(n: int = 2048, repeats: int = 5) -> float:
    """Float32 FLOP/s of an n x n x n matmul compiled by XLA, best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _attention_params(t) -> int:
    return t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + (
        t.num_attention_heads * t.head_dim * t.hidden_size)


def _expert_params(t) -> int:
    return 3 * t.hidden_size * t.intermediate_size


def _dense_layer_params(t) -> int:
    """Per-layer weights every token uses: attention, router, shared experts, norms."""
    shared = 3 * t.hidden_size * t.shared_intermediate_size
    return _attention_params(t) + t.hidden_size * t.moe_num_experts + shared + 2 * t.hidden_size


def _weight_bytes(params: float, k: int, quant, int4_packed: bool, itemsize: int = BYTES) -> float:
    """Bytes of ``params`` weights with K input channels: float (``itemsize`` bytes each), or int8/int4 values plus
    float32 scales (one per output channel, or per group of K for int4; int4 one value per byte where the runtime
    holds it so)."""
    if quant is None:
        return itemsize * params
    from aria_jax.quant import group_size

    if quant.format == "int8":
        return params + 4 * params / k
    return params * (0.5 if int4_packed else 1.0) + 4 * params / group_size(k, quant.group)


def decode_bytes(cfg, batch: int, experts_per_layer: float, cache_len: float, quant=None,
                 int4_packed: bool = True, itemsize: int = BYTES) -> float:
    """Bytes one decode step reads: layer weights, the distinct experts routed to (mean per layer), final norm,
    lm_head, the batch's embedding rows and the ``cache_len`` cached keys and values per row. ``quant`` (an
    aria_jax.quant.QuantSpec): the attention, shared and routed experts and lm_head (unless ``quant.lm_head`` is
    False) at their quantized bytes; norms, router, embeddings and the cache stay float. ``itemsize``: bytes of a
    float (4: float32, the CPU benchmarks; 2: a bfloat16 model and cache, bench/device.py)."""
    t = cfg.text
    d = t.hidden_size
    attention = _attention_params(t)
    shared = 3 * d * t.shared_intermediate_size
    experts = experts_per_layer * _expert_params(t)
    # K of each: attention and shared and expert up-projections read d inputs, the down-projections their width
    linear = (_weight_bytes(attention, d, quant, int4_packed, itemsize)
              + _weight_bytes(2 * d * t.shared_intermediate_size, d, quant, int4_packed, itemsize)
              + _weight_bytes(shared / 3, t.shared_intermediate_size, quant, int4_packed, itemsize)
              + _weight_bytes(2 * experts / 3, d, quant, int4_packed, itemsize)
              + _weight_bytes(experts / 3, t.intermediate_size, quant, int4_packed, itemsize))
    floats = d * t.moe_num_experts + 2 * d + 2 * batch * cache_len * t.num_key_value_heads * t.head_dim
    head_quant = quant if quant is not None and quant.lm_head else None
    head = _weight_bytes(d * t.vocab_size, d, head_quant, int4_packed, itemsize)
    return t.num_hidden_layers * (linear + itemsize * floats) + head + itemsize * d * (1 + batch)


def text_flops(cfg, tokens: int, context: int, logits_rows: int, train: bool = False) -> float:
    """Forward FLOPs of ``tokens`` new tokens attending causally to ``context`` (>= tokens) positions in all."""
    t = cfg.text
    per_token = _dense_layer_params(t) + t.moe_topk * _expert_params(t)
    matmuls = 2 * t.num_hidden_layers * tokens * per_token + 2 * logits_rows * t.hidden_size * t.vocab_size
    past = context - tokens
    attended = tokens * past + tokens * (tokens + 1) / 2  # causal: token i sees past + i + 1 positions
    attention = 4 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * attended
    return (3 if train else 1) * (matmuls + attention)


def vision_flops(cfg, images: int, patches: int) -> float:
    """Vision tower (the layers used) + projector for ``images`` images of ``patches`` patches each."""
    v, d = cfg.vision, cfg.vision.hidden_size
    embed = 2 * patches * v.num_channels * v.patch_size**2 * d
    layer = 2 * patches * (4 * d * d + 2 * d * v.intermediate_size) + 4 * patches * patches * d
    queries = cfg.queries_for_patches(patches)
    text_d = cfg.text.hidden_size
    # projector: k/v projections (twice: outer and in-projection) over the patches, q/in-q/out/linear over the
    # queries, cross-attention scores and values, then the FFN (d -> text_d -> text_d).
    projector = (2 * patches * 4 * d * d + 2 * queries * 4 * d * d + 4 * queries * patches * d
                 + 2 * queries * (d * text_d + text_d * text_d))
    return images * (embed + cfg.vision_layers_used * layer + projector)


# Accelerators' data-sheet peaks: (device_kind substring, dense bfloat16 FLOP/s, HBM bytes/s), the most specific
# name first (jax's ``device_kind``: "NVIDIA H100 80GB HBM3" is the SXM part). bench/device.py takes MFU against the
# FLOP/s; the bandwidth is shown next to the measured copy rate, which the decode floors use.
DEVICE_PEAKS = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200 NVL", 835e12, 4.8e12),
    ("H200", 989e12, 4.8e12),
    ("A100", 312e12, 2.0e12),
)


def device_peak(kind: str) -> tuple[float, float] | None:
    """(dense bf16 FLOP/s, HBM bytes/s) of a device kind from ``DEVICE_PEAKS``, None for one not listed."""
    for name, flops, bandwidth in DEVICE_PEAKS:
        if name.lower() in kind.lower():
            return flops, bandwidth
    return None


def measure_device_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second (read + write) of an elementwise pass over a ``gib`` GiB bfloat16 array made on JAX's default
    device (an accelerator's HBM copy rate), best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(int(gib * 2**30) // 2, jnp.bfloat16)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    best = min(_timed(lambda: step(x).block_until_ready()) for _ in range(repeats))
    return 2 * x.nbytes / best


def measure_device_matmul(n: int = 8192, repeats: int = 5) -> float:
    """BFloat16 FLOP/s of an n x n x n matmul (float32 accumulation) on JAX's default device, best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    mm(a, b).block_until_ready()
    best = min(_timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def fraction(floor_s: float, actual_s: float) -> str:
    return f"{100 * floor_s / actual_s:.0f}%"


if __name__ == "__main__":
    print(f"memory bandwidth (copy, read + write): {measure_bandwidth() / 1e9:.1f} GB/s")
    print(f"float32 matmul (2048^3, XLA): {measure_matmul() / 1e9:.1f} GFLOP/s")
