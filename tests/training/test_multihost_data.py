"""Multi-host data without launching processes: each process's block of rows of every global batch.

Loaders built with an explicit ``process_index`` / ``process_count`` decide the global batch from sample metadata
and build only their own rows; put side by side, their blocks must be exactly the single-process batch.
"""

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, write_dataset

from aria_jax.config import AriaConfig
from aria_jax.inference.image_processor import image_size, load_image
from aria_jax.inference.processor import AriaProcessor
from aria_jax.model.aria import merge_image_features
from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training.config import RecipeError

IMAGE_TOKEN = 9


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AriaProcessor.from_pretrained(chat_dir[0])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return J.read_jsonl(write_dataset(tmp_path_factory.mktemp("ds"), n=8))


def _jsonl_loader(records, encoder, max_len, batch, index=0, count=1, seed=3):
    collate = lambda s, layout: D.collate(s, 0, max_len, (3, encoder.max_image_size, encoder.max_image_size), layout)
    return D.Loader(len(records), D.build_source(records, encoder, max_len), batch, seed, collate,
                    D.build_measure(records, encoder, max_len), index, count)


def _merged(batch, per_image):
    """The decoder input the model would build: image-token positions filled from a per-image signature."""
    ids = batch["input_ids"]
    embeds = np.zeros((*ids.shape, 1), np.float32)
    if "pixel_values" not in batch:
        return embeds[..., 0]
    signature = batch["pixel_values"].sum(axis=(1, 2, 3))
    features = np.repeat(signature[:, None, None], per_image, axis=1).astype(np.float32)
    return np.asarray(merge_image_features(embeds, ids, features, IMAGE_TOKEN, batch.get("image_offsets")))[..., 0]


def _assert_blocks_make_the_batch(single, blocks, per_image):
    rows = ("input_ids", "attention_mask", "labels")
    for k in rows:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in blocks]), single[k], err_msg=k)
    assert ("pixel_values" in single) == all("pixel_values" in b for b in blocks)
    if "pixel_values" not in single:
        return
    slots = {len(b["pixel_values"]) for b in blocks}
    assert len(slots) == 1  # every process the same number of image slots (one global array)
    glob = {k: np.concatenate([b[k] for b in blocks]) for k in ("pixel_values", "pixel_mask", "image_offsets")}
    glob.update({k: single[k] for k in rows})
    # Each row's images, found through the offsets in the global image array, are the single-process ones.
    np.testing.assert_array_equal(_merged(glob, per_image), _merged(single, per_image))
    n_real = int(np.sum(single["input_ids"] == IMAGE_TOKEN)) // per_image
    real = np.concatenate([b["pixel_values"][: int(np.sum(b["input_ids"] == IMAGE_TOKEN)) // per_image]
                           for b in blocks])
    np.testing.assert_array_equal(real, single["pixel_values"][:n_real])


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("split_image, cut", [(False, False), (False, True), (True, False)])
def test_jsonl_process_blocks_partition_the_global_batch(processor, records, count, split_image, cut):
    encoder = D.JsonlEncoder(processor, 490, split_image)
    max_len = 512
    if cut:  # cut through the two-image samples' last image: they are dropped, on every process alike, and so are
        # the samples the cut leaves no trained token; two short text-only samples keep some
        ids = encoder(records[2]).input_ids
        max_len = int(np.nonzero(ids == IMAGE_TOKEN)[0].max())
        short = [J.Record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}], [], f"x:{i}")
                 for i, text in enumerate(["the lazy dog", "a cat"])]
        records = records + short
    batch = 4
    single = _jsonl_loader(records, encoder, max_len, batch)
    procs = [_jsonl_loader(records, encoder, max_len, batch, p, count) for p in range(count)]
    encoded = []
    for proc in procs:  # count the samples each process really encodes
        proc.encode = (lambda f: lambda i: encoded.append(i) or f(i))(proc.encode)
    per_image = processor.tokens_per_image(490)
    for _ in range(5):  # 20 samples of 8: crosses two epoch boundaries
        ref = single.next_batch()
        blocks = [p.next_batch() for p in procs]
        _assert_blocks_make_the_batch(ref, blocks, per_image)
        for p in procs:
            assert p.state == single.state
    assert len(encoded) == single.state["samples"]  # each sample of a global batch built by one process only
    assert (single.state["dropped"] > 0) == cut


@pytest.mark.parametrize("count", [2, 4])
def test_synthetic_process_blocks_partition_the_global_batch(count):
    import os

    import yaml

    with open(os.path.join(REPO, "configs", "tiny_cpu.yaml")) as f:
        cfg = AriaConfig.from_dict(yaml.safe_load(f)["model_config"])
    source, measure = D.synthetic_source(cfg, 16, 40, 0), D.synthetic_measure(cfg, 40)
    side = cfg.vision.image_size
    collate = lambda s, layout: D.collate(s, 0, 64, (3, side, side), layout)
    single = D.Loader(16, source, 8, 1, collate)
    procs = [D.Loader(16, source, 8, 1, collate, measure, p, count, image_multiple=2) for p in range(count)]
    per_image = cfg.queries_for_patches((side // cfg.vision.patch_size) ** 2)
    for _ in range(3):
        ref = single.next_batch()
        blocks = [p.next_batch() for p in procs]
        _assert_blocks_make_the_batch(ref, blocks, per_image)
        assert all(len(b["pixel_values"]) % 2 == 0 for b in blocks)  # a multiple of the data shards per block
    assert all(p.state == single.state for p in procs)


def test_measure_equals_encode(processor, records):
    for split in (False, True):
        encoder = D.JsonlEncoder(processor, 490, split)
        for record in records:
            sample = encoder(record)
            ids, labels, crops = encoder.measure(record)
            np.testing.assert_array_equal(ids, sample.input_ids)
            np.testing.assert_array_equal(labels, sample.labels)
            assert crops == (0 if sample.pixel_values is None else len(sample.pixel_values))


def test_count_crops_matches_crops(processor):
    ip = processor.image_processor
    rng = np.random.default_rng(0)
    for h, w in [(40, 60), (60, 40), (100, 700), (700, 90), (490, 490), (300, 980), (33, 1000)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for mode in ("hf", "original"):
            for m in (490, 980):
                assert ip.count_crops(w, h, m, True, mode) == len(ip.crops(image, m, True, mode)), (h, w, mode, m)
        assert ip.count_crops(w, h, 490, False) == 1


def test_image_size_applies_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: width and height swap
    Image.new("RGB", (30, 20)).save(path, exif=exif)
    assert image_size(path) == load_image(path).size == (20, 30)


def test_merge_with_image_offsets_reads_each_rows_own_block():
    embeds = np.zeros((2, 4, 1), np.float32)
    ids = np.array([[9, 9, 1, 1], [1, 9, 9, 1]])
    features = np.arange(1, 9, dtype=np.float32).reshape(4, 2, 1)  # 4 slots x 2 tokens; slots 1 and 3 blanks
    merged = np.asarray(merge_image_features(embeds, ids, features, 9, np.array([0, 2], np.int32)))[..., 0]
    np.testing.assert_array_equal(merged, [[1, 2, 0, 0], [0, 5, 6, 0]])


def test_blocks_must_divide_the_batch():
    with pytest.raises(RecipeError, match="per_device_train_batch_size=3"):
        D.Loader(8, lambda i: None, 3, 0, lambda s, layout: {}, None, 0, 2)
