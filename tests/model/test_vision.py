"""Vision tower parity with transformers' Idefics3VisionTransformer (hidden_states[-1], before post_layernorm)."""

import numpy as np
import pytest
import torch
from conftest import rel_err
from hf_models import CONFIGS, image_batch

from aria_jax.model import vision
from aria_jax.model.vision import VisionTower, bucket_boundaries, patch_attention_mask, position_ids, query_chunk


@pytest.mark.parametrize("side", [4, 14, 70])
def test_bucket_boundaries_equal_torch_arange(side):
    ref = torch.arange(1 / side, 1.0, 1 / side).numpy()
    np.testing.assert_array_equal(bucket_boundaries(side), ref)


def test_position_ids_match_transformers_for_every_row_and_column_count():
    """The real 70x70 grid: every valid row count n_h and column count n_w in 1..70 (aria-spec.md §2.3)."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=1, num_channels=1, image_size=980, patch_size=14))
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(4900, dtype=torch.float32)[:, None])
    counts = np.arange(1, 71)
    masks = np.zeros((70, 70, 70), bool)
    for i, n in enumerate(counts):
        masks[i, :n, : 71 - n] = True  # n valid rows, 71 - n valid columns: both run over 1..70
    ours = np.asarray(position_ids(masks, 70))
    for start in range(0, 70, 10):
        chunk = torch.as_tensor(masks[start : start + 10])
        with torch.no_grad():
            ref = emb(torch.zeros(len(chunk), 1, 980, 980), chunk)[..., 0].numpy().astype(np.int64)
        np.testing.assert_array_equal(ours[start : start + 10], ref)
    # Not vacuous: full images give the identity, and the old formula differs at n = 49 (spec §2.3).
    np.testing.assert_array_equal(np.asarray(position_ids(np.ones((1, 70, 70), bool), 70))[0], np.arange(4900))


def test_patch_mask_any_valid_pixel():
    mask = np.zeros((1, 28, 28), bool)
    mask[0, :15, :1] = True  # a single valid pixel in the second patch row
    np.testing.assert_array_equal(np.asarray(patch_attention_mask(mask, 14))[0], [[True, False], [True, False]])


@pytest.mark.each_value_once
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_vision_tower_matches_hidden_states_before_post_layernorm(name, masked, chunked, hf_model, aria_model,
                                                                  monkeypatch):
    if chunked:  # attention in 5-query chunks instead of one block
        monkeypatch.setattr(vision, "SCORE_BLOCK_BYTES", 1)
        monkeypatch.setattr(vision, "MIN_QUERY_CHUNK", 5)
    hf = hf_model(name).model
    model = aria_model(name)
    batch = image_batch(name, np.random.default_rng(10))
    pixels = torch.as_tensor(batch["pixel_values"])
    pixel_mask = batch["pixel_mask"] if masked else None
    with torch.no_grad():
        patch_mask = hf._create_patch_attention_mask(None if pixel_mask is None else torch.as_tensor(pixel_mask))
        ref = hf.vision_tower(pixels, patch_attention_mask=patch_mask, output_hidden_states=True).hidden_states[-1]
    tower = VisionTower(model.config.vision, model.config.vision_layers_used)
    out, valid = tower.apply({"params": model.params["vision_tower"]}, batch["pixel_values"], pixel_mask)
    if masked:
        np.testing.assert_array_equal(np.asarray(valid), patch_mask.flatten(1).numpy())
        assert not np.asarray(valid).all()
    keep = np.asarray(valid)  # padded query rows carry unused values in both implementations
    assert chunked == (query_chunk(1, 1, keep.shape[1]) < keep.shape[1])
    assert rel_err(np.asarray(out)[keep], ref.numpy()[keep]) <= 1e-5


def test_query_chunk_keeps_one_block_unless_the_scores_outgrow_the_budget():
    assert query_chunk(1, 4, 1225) == 1225  # the benchmarks' mid-size tower at 490 px: 24 MB, one block
    assert query_chunk(1, 16, 1225) == 768  # Aria at 490 px: 96 MB in one block, two chunks
    assert query_chunk(1, 16, 4900) == 256  # Aria at 980 px: 1.5 GB in one block
    assert query_chunk(8, 16, 4900) == 256  # never below MIN_QUERY_CHUNK

