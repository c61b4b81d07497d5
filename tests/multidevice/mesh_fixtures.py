"""Shared by the multi-device scripts (named apart from bench/common.py: one pytest process imports both): a checkpoint, a
batch, and a loss whose gradients are compared."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/


def make_checkpoint(directory: str, name: str = "mha"):
    import hf_models

    model = hf_models.make_hf_model(name)
    hf_models.save_layout(model, "hub", directory)
    return model


def batch(name: str = "mha", seed: int = 0) -> dict:
    import hf_models

    b = hf_models.image_batch(name, np.random.default_rng(seed))  # 2 rows, 3 partially masked images
    return {k: np.asarray(v) for k, v in b.items()}


def loss_fn(module):
    """Mean next-token cross-entropy over valid positions (a plain reference loss, not the trainer's)."""
    import jax
    import jax.numpy as jnp

    def loss(params, input_ids, attention_mask, pixel_values, pixel_mask):
        logits = module.apply({"params": params}, input_ids, attention_mask, pixel_values, pixel_mask).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
        mask = attention_mask[:, 1:].astype(jnp.float32)
        return (nll * mask).sum() / mask.sum()

    return loss


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
