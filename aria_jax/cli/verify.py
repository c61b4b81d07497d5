"""``--verify``: the converted model against transformers' AriaForConditionalGeneration on a fixed prompt.

The reference is built from the same config and the *source* tensors (renamed to transformers 5 names, so
every key layout works, including the custom-code one transformers cannot read), then both run a fixed prompt
of text tokens and one image. float32 must agree to ``FLOAT32_REL_TOL`` max relative error; bfloat16 runs
in two different numerical orders, so it is judged by the KL divergence of the next-token distributions.

A quantized conversion (``--quantize``) is judged against transformers' float model (the source weights, in the
conversion's dtype) by the mean KL divergence of the next-token distributions, ``QUANT_KL_TOL`` per format, with the
top-1 agreement reported beside it.
"""

from __future__ import annotations

import math

import numpy as np

from aria_jax.checkpoint.converted import stored_quantization
from aria_jax.checkpoint.hf_keys import from_hub_name, to_hub_name
from aria_jax.config import AriaConfig
from aria_jax.inference.api import Aria

FLOAT32_REL_TOL = 1e-4
BFLOAT16_KL_TOL = 1e-2
QUANT_KL_TOL = {"int8": 1e-3, "int4": 3e-2}  # mean KL of the quantized model's next-token distributions


class VerifyError(RuntimeError):
    """The converted model disagrees with transformers beyond tolerance."""


def fixed_prompt(cfg: AriaConfig) -> dict[str, np.ndarray]:
    """Text tokens around one image of the smallest supported size (seeded; the same every run)."""
    rng = np.random.default_rng(0)
    patches, queries = min(cfg.projector_patch_to_query)
    side = math.isqrt(patches) * cfg.vision.patch_size
    vocab = cfg.text.vocab_size
    avoid = {cfg.image_token_id, cfg.text.pad_token_id}
    words = [int(t) for t in rng.integers(min(10, vocab - 1), vocab, 32) if int(t) not in avoid][:10]
    ids = words[:4] + [cfg.image_token_id] * queries + words[4:]
    pixels = rng.uniform(-1, 1, (1, cfg.vision.num_channels, side, side)).astype(np.float32)
    return {"input_ids": np.array([ids], np.int64), "pixel_values": pixels}


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max relative error (max |out-ref| / max |ref|) and mean KL(ref || out) of the softmaxed logits."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    rel = float(np.abs(out - ref).max() / np.abs(ref).max())

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lo = log_softmax(ref), log_softmax(out)
    kl = float((np.exp(lr) * (lr - lo)).sum(-1).mean())
    top1 = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
    return {"max_rel_err": rel, "kl": kl, "top1": top1}


def _torch_tensor(array: np.ndarray, torch_dtype):
    import torch

    array = np.array(array)  # an owned copy of the memory map
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(torch_dtype)
    return torch.from_numpy(array).to(torch_dtype)


def reference_logits(
    tensors: dict, layout: str, cfg: AriaConfig, batch: dict[str, np.ndarray], dtype: np.dtype
) -> np.ndarray:
    """transformers' logits with the source tensors loaded by name (strict: every parameter must be filled)."""
    import torch
    import transformers

    torch_dtype = torch.bfloat16 if dtype.name == "bfloat16" else torch.float32
    hf_cfg = transformers.AriaConfig.from_dict(cfg.to_dict())
    model = transformers.AriaForConditionalGeneration._from_config(hf_cfg, dtype=torch_dtype)
    model.set_attn_implementation("eager")
    state = {}
    for key, reader in tensors.items():
        name = to_hub_name(key, layout)
        if name.endswith("inv_freq"):
            continue
        state[from_hub_name(name, "transformers5")] = _torch_tensor(reader.get(key), torch_dtype)
    for param in ("weight", "bias"):  # absent from custom-code checkpoints; unused by the model
        state.setdefault(f"model.vision_tower.post_layernorm.{param}", torch.zeros(cfg.vision.hidden_size))
    model.load_state_dict(state, strict=True)
    del state
    with torch.no_grad():
        inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        return model.eval()(**inputs).logits.float().numpy()


def verify_conversion(
    tensors: dict, layout: str, cfg: AriaConfig, directory: str, dtype: np.dtype, mesh=None
) -> dict[str, float]:
    """Run the converted ``directory`` and transformers on ``fixed_prompt``; VerifyError beyond tolerance."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "torch/transformers are not installed; --verify needs both (pip install 'aria-jax[verify]')"}

    batch = fixed_prompt(cfg)
    ours = np.asarray(Aria.from_pretrained(directory, dtype=dtype, mesh=mesh).forward(**batch), np.float32)
    ref = reference_logits(tensors, layout, cfg, batch, np.dtype(dtype))
    bad = [int(x.size - np.count_nonzero(np.isfinite(x))) for x in (ours, ref)]
    if any(bad):
        raise VerifyError(f"non-finite logits ({bad[0]} of the converted model's, {bad[1]} of transformers'): the "
                          "weights hold NaN or infinite values")
    result = compare(ours, ref)
    # `not x <= tol`, so that a NaN measure (all-zero reference logits) fails too
    quant = stored_quantization(directory)
    if quant is not None:
        limit = QUANT_KL_TOL[quant.format]
        if not result["kl"] <= limit:
            raise VerifyError(f"mean KL divergence {result['kl']:.3g} > {limit:g} ({quant.format} against the float "
                              f"model; top-1 agreement {100 * result['top1']:.1f}%)")
        return {**result, "format": quant.format, "kl_limit": limit}
    if dtype.name == "float32" and not result["max_rel_err"] <= FLOAT32_REL_TOL:
        raise VerifyError(f"max relative error {result['max_rel_err']:.3g} > {FLOAT32_REL_TOL:g} (float32)")
    if dtype.name != "float32" and not result["kl"] <= BFLOAT16_KL_TOL:
        raise VerifyError(f"KL divergence {result['kl']:.3g} > {BFLOAT16_KL_TOL:g} ({dtype.name})")
    return result
