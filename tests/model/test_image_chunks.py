"""Images and video frames through the vision tower in chunks (``AriaModel.image_features``), the long prompt's
prefill in chunks (``Decoder``), and the context budget that names the frame count that fits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hf_models import IMAGE_TOKEN

from aria_jax.config import AriaConfig, AriaVisionConfig
from aria_jax.inference.budget import ContextBudgetError, check_context_budget, frames_that_fit
from aria_jax.inference.generation import (
    MIN_PREFILL_CHUNK,
    PREFILL_CHUNK,
    PREFILL_SCORE_BYTES,
    Decoder,
    StopRule,
    prefill_chunk_tokens,
)
from aria_jax.inference.sampling import SamplingConfig
from aria_jax.model.aria import AriaModel, chunk_starts, example_inputs, image_chunk_size, vision_chunk_bytes
from aria_jax.runtime import Runtime

TOL = 1e-6


def frames(n: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random frames, some partly padded (pixel mask), as the processor makes them."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (n, 3, side, side)).astype(np.float32)
    mask = np.ones((n, side, side), bool)
    mask[1::3, :, side // 2 + 1 :] = False
    pixels[~np.broadcast_to(mask[:, None], pixels.shape)] = -1.0
    return pixels, mask


def with_chunk(module: AriaModel, images: int) -> AriaModel:
    """``module`` whose image chunk budget holds exactly ``images`` images."""
    cfg = module.config
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    budget = vision_chunk_bytes(cfg, patches, 4, images)
    return module.clone(runtime=module.runtime.replace(image_chunk_bytes=budget))


@pytest.mark.parametrize("n, chunk", [(7, 3), (9, 8), (6, 2), (5, 5), (1, 4), (12, 5)])
def test_chunks_cover_every_image_once_in_order(n, chunk):
    size, starts = chunk_starts(n, chunk)
    assert size <= chunk and starts[0] == 0 and starts[-1] + size == n
    covered = np.zeros(n, int)
    for s in starts:
        covered[s : s + size] += 1
    assert (covered >= 1).all() and len(starts) * size - n < len(starts)  # overlap less than one image per chunk


def test_chunk_size_follows_the_budget():
    cfg = AriaConfig.preset("aria")
    per_image = vision_chunk_bytes(cfg, 1225, 2, 1)
    assert image_chunk_size(cfg, 1225, 2, per_image, 128) == 1
    assert image_chunk_size(cfg, 1225, 2, 1, 128) == 1  # at least one image
    big = image_chunk_size(cfg, 1225, 2, 512 << 20, 128)
    assert 1 < big < 128 and vision_chunk_bytes(cfg, 1225, 2, big) <= 512 << 20 < vision_chunk_bytes(cfg, 1225, 2,
                                                                                                   big + 1)
    assert image_chunk_size(cfg, 1225, 2, 1 << 40, 7) == 7  # never more than the images there are


@pytest.mark.each_value_once
@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_features_equal_one_batch(aria_model, chunk, masked):
    model = aria_model("gqa")
    pixels, mask = frames(7, model.config.vision.image_size)
    mask = mask if masked else None
    one_batch = model.module.clone(runtime=Runtime(image_chunk_bytes=1 << 40))
    ref = one_batch.apply({"params": model.params}, pixels, mask, method="image_features")
    out = with_chunk(model.module, chunk).apply({"params": model.params}, pixels, mask, method="image_features")
    assert out.shape == ref.shape == (7, 4, model.config.text.hidden_size)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out, ref[::-1]) > 1e-2  # the comparison sees which frame is where


def _image_features_temp_bytes(cfg: AriaConfig, runtime: Runtime, n: int) -> int:
    module = AriaModel(cfg, runtime=runtime)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), **example_inputs(cfg))["params"])
    side = cfg.vision.image_size
    run = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m, method="image_features"))
    compiled = run.lower(params, jax.ShapeDtypeStruct((n, 3, side, side), jnp.float32),
                         jax.ShapeDtypeStruct((n, side, side), bool)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_temp_memory_does_not_grow_with_the_frame_count():
    """XLA's own memory analysis: 2 -> 32 frames of 1225 patches adds nothing beyond the features in chunks, and
    the tower's activations (megabytes per frame) in one batch."""
    cfg = dataclasses.replace(
        AriaConfig.preset("tiny"), projector_patch_to_query=((1225, 16),),
        vision=AriaVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                image_size=490, patch_size=14),
    )
    chunked = Runtime(image_chunk_bytes=vision_chunk_bytes(cfg, 1225, 4, 2))
    features_bytes = 30 * 16 * cfg.text.hidden_size * 4  # 30 more frames' (Q, D) features
    growth = _image_features_temp_bytes(cfg, chunked, 32) - _image_features_temp_bytes(cfg, chunked, 2)
    assert growth <= features_bytes + (256 << 10)
    one_batch = Runtime(image_chunk_bytes=1 << 40)
    growth = _image_features_temp_bytes(cfg, one_batch, 32) - _image_features_temp_bytes(cfg, one_batch, 2)
    assert growth > 100 * (features_bytes + (256 << 10))  # the check above can fail


def _prefill_temp_bytes(cfg: AriaConfig, runtime: Runtime, n: int, prefill_chunk: int) -> int:
    module = AriaModel(cfg, runtime=runtime)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), **example_inputs(cfg))["params"])
    decoder = Decoder(module, prefill_chunk=prefill_chunk)
    p, side = 16 * n + 16, cfg.vision.image_size
    run = jax.jit(functools.partial(decoder._prefill_impl, cache_len=p + 16, sampling=SamplingConfig(),
                                    rule=StopRule(eos_ids=(), pad_id=0, max_new=8)))
    sds = jax.ShapeDtypeStruct
    compiled = run.lower(params, sds((1, p), jnp.int32), sds((1, p), jnp.int32), sds((n, 3, side, side), jnp.float32),
                         sds((n, side, side), bool), jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_prefill_memory_grows_only_by_features_and_prompt():
    """The whole prefill (tower, projector, merge, decoder into the KV cache) of 2 -> 32 frames: in chunks its
    temporaries grow by the features, the prompt's embeddings and a chunk's scores over more cache slots (well under
    2 MB here), in one block by the tower's activations of 30 more frames."""
    cfg = dataclasses.replace(
        AriaConfig.preset("tiny"), projector_patch_to_query=((1225, 16),),
        vision=AriaVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                image_size=490, patch_size=14),
    )
    chunked = Runtime(image_chunk_bytes=vision_chunk_bytes(cfg, 1225, 4, 2))
    growth = _prefill_temp_bytes(cfg, chunked, 32, 64) - _prefill_temp_bytes(cfg, chunked, 2, 64)
    assert growth <= 4 << 20
    whole = Runtime(image_chunk_bytes=1 << 40)
    assert _prefill_temp_bytes(cfg, whole, 32, 1 << 20) - _prefill_temp_bytes(cfg, whole, 2, 1 << 20) > 25 * (4 << 20)


def _video_prompt(model, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    q = model.config.queries_for_patches((model.config.vision.image_size // model.config.vision.patch_size) ** 2)
    vocab = model.config.text.vocab_size
    row = [*rng.integers(10, vocab, 3)]
    for _ in range(n):
        row += [*rng.integers(10, vocab, 2), *[IMAGE_TOKEN] * q]
    row += [*rng.integers(10, vocab, 5)]
    ids = np.full((1, len(row) + 3), 2, np.int32)
    mask = np.zeros_like(ids)
    ids[0, 3:], mask[0, 3:] = row, 1  # left-padded
    return ids, mask


def test_prefill_chunk_bounds_the_score_block():
    assert prefill_chunk_tokens(1, 8, 2048) == PREFILL_CHUNK
    chunk = prefill_chunk_tokens(1, 8, 6144)  # 32 frames on the bench model: 8 heads, 6144 cache slots
    assert MIN_PREFILL_CHUNK <= chunk < PREFILL_CHUNK and 8 * chunk * 6144 * 4 <= PREFILL_SCORE_BYTES
    assert prefill_chunk_tokens(64, 64, 1 << 20) == MIN_PREFILL_CHUNK
    assert prefill_chunk_tokens(1, 8, 2048, limit=16) == 16
    assert prefill_chunk_tokens(1, 8, 1 << 20, blockwise=True) == PREFILL_CHUNK  # no score array to bound


def test_chunked_prefill_equals_one_block(aria_model):
    model = aria_model("gqa")
    rng = np.random.default_rng(5)
    pixels, pmask = frames(9, model.config.vision.image_size, seed=6)
    ids, mask = _video_prompt(model, 9, rng)
    ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])  # two rows of 9 frames each
    pixels, pmask = np.concatenate([pixels, pixels[::-1]]), np.concatenate([pmask, pmask[::-1]])
    mask[1, :6] = 0  # more left padding in row 1
    rule = StopRule(eos_ids=(), pad_id=0, max_new=6)
    whole = Decoder(model.module)
    chunked = Decoder(with_chunk(model.module, 4), prefill_chunk=16)
    assert ids.shape[1] > 3 * 16
    ref, _ = whole.run(model.params, ids, mask, pixels, pmask, SamplingConfig(), rule)
    out, _ = chunked.run(model.params, ids, mask, pixels, pmask, SamplingConfig(), rule)
    np.testing.assert_array_equal(out, ref)
    # The caches after prefill: same keys and values, slot for slot (p = 80 = 5 chunks, and 72: overlapping chunks).
    for p in (80, 72):
        args = (np.pad(ids, ((0, 0), (p - ids.shape[1], 0))), np.pad(mask, ((0, 0), (p - ids.shape[1], 0))),
                pixels, pmask, jax.random.key(0))
        kw = dict(cache_len=p + 8, sampling=SamplingConfig(), rule=rule)
        a = jax.jit(functools.partial(whole._prefill_impl, **kw))(model.params, *args)
        b = jax.jit(functools.partial(chunked._prefill_impl, **kw))(model.params, *args)
        valid = np.asarray(a.mask).astype(bool)  # padding slots hold garbage keys in both
        for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache), strict=True):
            slots = list(x.shape).index(p + 8)  # keys (B, kv, hd, S), values (B, kv, S, hd)
            x, y = np.moveaxis(np.asarray(x), slots, -1), np.moveaxis(np.asarray(y), slots, -1)
            picked = np.broadcast_to(valid[:, None, None, :], x.shape)
            assert rel_err(y[picked], x[picked]) <= 1e-5
        np.testing.assert_array_equal(a.token, b.token)


def test_context_budget_names_the_frame_count_that_fits(aria_model):
    assert frames_that_fit(4096, 40, 128, 256) == 29
    assert frames_that_fit(100, 90, 128, 20) == 0
    ids = np.array([[5] * 10 + [IMAGE_TOKEN] * 128 * 40 + [6] * 30])
    check_context_budget(ids, IMAGE_TOKEN, 128, 100, 8192)  # fits
    with pytest.raises(ContextBudgetError, match=r"40 images/frames x 128 tokens .* 4096; the frames that fit: 30 ") as err:
        check_context_budget(ids, IMAGE_TOKEN, 128, 100, 4096)
    assert "\n" not in str(err.value)
    check_context_budget(np.array([[5] * 5000]), IMAGE_TOKEN, 128, 100, 4096)  # no images: the caller's check
    model = aria_model("gqa")
    short = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, max_position_embeddings=60))
    decoder = Decoder(model.module.clone(config=short))
    ids, mask = _video_prompt(model, 9, np.random.default_rng(7))
    pixels, pmask = frames(9, model.config.vision.image_size)
    # 6 tokens per frame (2 of text + 4 image tokens), 13 others (3 padding + 3 + 5 + 2 before the first frame's run):
    # 7 frames take 53 + 4 new tokens <= 60, 8 frames 59 + 4 > 60
    with pytest.raises(ContextBudgetError, match=r"9 images/frames x 4 tokens \+ 29 other.* 60; the frames that fit: 7 "):
        decoder.run(model.params, ids, mask, pixels, pmask, SamplingConfig(),
                    StopRule(eos_ids=(), pad_id=0, max_new=4))
