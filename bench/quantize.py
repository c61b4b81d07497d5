"""Quality of weight-only quantization: next-token distributions of int8 / int4 aria_jax against its float32 model.

    python bench/quantize.py [--prompts 4] [--text 48]

The benchmark's mid-size random Aria (bench/common.py), float32, quantized while loading
(``Aria.from_pretrained(quantize=...)``). Inputs: real photos (scikit-image's astronaut, chelsea, coffee and rocket,
through the image processor at 490 px: 128 image tokens each) followed by ``--text`` text tokens (drawn at random:
the random model has no vocabulary to speak of; each prompt its own). For every text position the next-token
distribution of each format is compared with float32 aria_jax (itself within 1e-4 of transformers, tests/): mean
and max KL(float || quantized), top-1 agreement, and the logits' relative error. One process; no timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import MID_P2Q, build_mid_checkpoint, print_table  # noqa: E402

IMAGE_TOKEN = 9  # the mid model's image token id (bench/common.py leaves transformers' default)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo_inputs(prompts: int, text: int, vocab: int) -> list[dict[str, np.ndarray]]:
    from PIL import Image
    from skimage import data

    from aria_jax.inference.image_processor import AriaImageProcessor

    processor = AriaImageProcessor(max_image_size=490)
    rng = np.random.default_rng(0)
    out = []
    for i in range(prompts):
        image = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        batch = processor([image])
        ids = [*rng.integers(10, vocab, 4), *[IMAGE_TOKEN] * MID_P2Q[1225], *rng.integers(10, vocab, text)]
        out.append({"input_ids": np.array([ids]), "pixel_values": batch["pixel_values"].astype(np.float32),
                    "pixel_mask": batch["pixel_mask"].astype(bool), "text": text})
    return out


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """KL(ref || out) per position, top-1 agreement and max |out - ref| / max |ref| of (positions, V) logits."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(ref.astype(np.float64)), log_softmax(out.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((ref.argmax(-1) == out.argmax(-1)).mean()),
            "rel": float(np.abs(out - ref).max() / np.abs(ref).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="photo + text prompts (4)")
    parser.add_argument("--text", type=int, default=48, help="text tokens after each photo (48)")
    args = parser.parse_args()

    from aria_jax import Aria

    with tempfile.TemporaryDirectory() as directory:
        build_mid_checkpoint(directory)
        models = {fmt: Aria.from_pretrained(directory, dtype="float32", quantize=fmt)
                  for fmt in (None, "int8", "int4")}
    prompts = photo_inputs(args.prompts, args.text, models[None].config.text.vocab_size)
    logits: dict = {fmt: [] for fmt in models}
    for prompt in prompts:
        inputs = {k: v for k, v in prompt.items() if k != "text"}
        for fmt, model in models.items():
            logits[fmt].append(np.asarray(model.forward(**inputs))[0, -prompt["text"]:])
    ref = np.concatenate(logits[None])
    rows = []
    for fmt in ("int8", "int4"):
        m = compare(ref, np.concatenate(logits[fmt]))
        rows.append({"weights": fmt, "positions": str(len(ref)), "mean KL": f"{m['kl_mean']:.2e}",
                     "max KL": f"{m['kl_max']:.2e}", "top-1 agreement": f"{100 * m['top1']:.1f}%",
                     "logits rel. error": f"{m['rel']:.2e}",
                     "bar": "KL <= 1e-3" if fmt == "int8" else "KL <= 3e-2"})
    print(f"mid-size random Aria, float32; {args.prompts} photos ({', '.join(PHOTOS[:args.prompts])}) at 490 px "
          f"+ {args.text} text tokens each; against float32 aria_jax")
    print_table(rows, ["weights", "positions", "mean KL", "max KL", "top-1 agreement", "logits rel. error", "bar"])


if __name__ == "__main__":
    main()
