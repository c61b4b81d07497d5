"""Projector parity with transformers' AriaProjector (double q/k/v projection, key padding mask, eps 1e-5)."""

import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS

from aria_jax.model.projector import Projector


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_projector_every_query_count_with_and_without_mask(name, hf_model, aria_model):
    hf = hf_model(name).model.multi_modal_projector
    model = aria_model(name)
    dv = model.config.vision.hidden_size
    rng = np.random.default_rng(11)
    for patches, queries in model.config.projector_patch_to_query:
        features = rng.standard_normal((3, patches, dv)).astype(np.float32)
        valid = np.ones((3, patches), bool)
        valid[0, patches // 2 :] = False
        valid[2, 1:] = False  # a single valid patch
        for mask in (valid, None):
            with torch.no_grad():
                attn_mask = None if mask is None else torch.as_tensor(~mask)
                ref = hf(torch.as_tensor(features), attn_mask=attn_mask).numpy()
            out = Projector(model.config).apply({"params": model.params["projector"]}, features, mask)
            assert out.shape == (3, queries, model.config.text.hidden_size)
            assert rel_err(out, ref) <= 1e-5


def test_unknown_patch_count_names_the_table(aria_model):
    model = aria_model("gqa")
    with pytest.raises(ValueError, match="9 patches per image is not in projector_patch_to_query_dict"):
        Projector(model.config).apply({"params": model.params["projector"]}, np.zeros((1, 9, 32), np.float32))
