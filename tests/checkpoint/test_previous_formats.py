"""A converted directory written before the restructure (commit b90c1e2, tests/fixtures/b90c1e2/converted: the "gqa"
test model in bfloat16) still loads: bit for bit the parameters of today's conversion of the same checkpoint, and transformers' logits on
the same bfloat16-rounded weights (float32 compute, <= 1e-4)."""

import os

import jax
import numpy as np
import torch
from conftest import REPO, rel_err
from hf_models import image_batch, make_hf_model

from aria_jax import Aria
from aria_jax.cli import main

OLD = os.path.join(REPO, "tests", "fixtures", "b90c1e2", "converted")


def test_a_converted_directory_from_the_previous_commit_loads(checkpoint, tmp_path):
    src = checkpoint("gqa", "hub")  # the same seeded random model the fixture was converted from
    assert main(["convert", src, str(tmp_path / "new"), "--dtype", "bfloat16", "--quiet"]) == 0
    old = Aria.from_pretrained(OLD, layout="stacked")
    new = Aria.from_pretrained(tmp_path / "new", layout="stacked")
    flat_old, flat_new = jax.tree_util.tree_leaves_with_path(old.params), jax.tree_util.tree_leaves_with_path(new.params)
    assert [p for p, _ in flat_old] == [p for p, _ in flat_new]
    for (path, a), (_, b) in zip(flat_old, flat_new, strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a).view(np.int16), np.asarray(b).view(np.int16)), path
    batch = image_batch("gqa", np.random.default_rng(2))
    reference = make_hf_model("gqa")  # the same weights, rounded to bfloat16 as the fixture stores them
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
    with torch.no_grad():
        ref = reference(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
    ours = np.asarray(Aria.from_pretrained(OLD, dtype="float32").forward(**batch))
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(ours[valid], ref[valid]) <= 1e-4
