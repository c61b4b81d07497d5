"""The fine-tuning data pipeline: label masking, images, truncation, order, and one-line errors (exit 2)."""

import json
import os

import numpy as np
import pytest
from train_helpers import run_train, write_dataset

from aria_jax.inference.processor import AriaProcessor
from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor(chat_dir):
    return AriaProcessor.from_pretrained(chat_dir[0])


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds")


def test_labels_only_on_assistant_turns_and_never_on_images(processor, dataset):
    records = J.read_jsonl(dataset)
    encoder = D.JsonlEncoder(processor, 490, False)
    sample = encoder(records[2])  # two images, two assistant turns
    assert sample.pixel_values.shape == (2, 3, 490, 490)
    assert np.sum(sample.input_ids == 9) == 2 * processor.tokens_per_image(490)
    trained = sample.labels != IGNORE_INDEX
    assert not np.any(sample.input_ids[trained] == 9)
    # The trained tokens are exactly the two assistant replies with their end markers, without the role header.
    text = processor.decode(sample.input_ids[trained])
    assert text == "an astronaut<|im_end|>\nthe lazy dog<|im_end|>\n"
    np.testing.assert_array_equal(sample.labels[trained], sample.input_ids[trained])
    # Same tokens as the whole conversation rendered by the chat template and tokenised by the processor.
    full = processor(text=processor.apply_chat_template(json.loads(open(os.path.join(dataset, "train.jsonl")).readlines()[2])["messages"]),
                     images=[np.zeros((50, 60, 3), np.uint8)] * 2, max_image_size=490, add_special_tokens=False)
    np.testing.assert_array_equal(full["input_ids"][0], sample.input_ids)


def test_text_only_sample(processor, dataset):
    sample = D.JsonlEncoder(processor, 490, False)(J.read_jsonl(dataset)[1])
    assert sample.pixel_values is None
    assert processor.decode(sample.input_ids[sample.labels != IGNORE_INDEX]) == "the quick brown fox<|im_end|>\n"


def test_truncation_through_an_image_drops_the_sample_and_counts_it(processor, dataset):
    records = J.read_jsonl(dataset)
    encoder = D.JsonlEncoder(processor, 490, False)
    sample = encoder(records[0])
    last_image = int(np.nonzero(sample.input_ids == 9)[0].max())
    assert D.truncate(sample, last_image, 9) is None
    kept = D.truncate(sample, last_image + 2, 9)
    assert len(kept.input_ids) == last_image + 2
    # The two-image sample cut through its second image; a short text-only one keeps a trained token or two.
    short = J.Record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the lazy dog"}], [], "x:1")
    cut = int(np.nonzero(encoder(records[2]).input_ids == 9)[0].max())
    source = D.build_source([records[2], short], encoder, cut)
    assert source(0) is None and D.trained_tokens(source(1).labels) > 0
    loader = D.Loader(2, source, 2, 0, lambda s, layout: D.collate(s, 0, 64, None, layout))
    batch = loader.next_batch()
    assert loader.state["dropped"] >= 1
    assert np.all(D.shift_valid(batch["labels"]).sum(axis=1) > 0)


def test_order_is_seeded_and_resumes_from_its_state(processor, dataset):
    records = J.read_jsonl(dataset)
    source = D.build_source(records, D.JsonlEncoder(processor, 490, False), 256)

    def loader(seed):
        return D.Loader(len(records), source, 3, seed, lambda s, layout: D.collate(s, 3, 256, None, layout))

    a, b = loader(1), loader(1)
    batches = [a.next_batch() for _ in range(4)]  # crosses an epoch boundary (8 samples)
    state = dict(b.state)
    for _ in range(2):
        b.next_batch()
    c = loader(1)
    c.state = dict(b.state)
    for ref in batches[2:]:
        got = c.next_batch()
        for k in ref:
            np.testing.assert_array_equal(ref[k], got[k])
    assert state["epoch"] == 0 and a.state["epoch"] == 1
    assert not np.array_equal(loader(2).next_batch()["input_ids"], batches[0]["input_ids"])
    batch = batches[0]
    assert batch["input_ids"].shape[1] % 32 == 0
    assert np.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    if "pixel_values" in batch:
        assert len(batch["pixel_values"]) & (len(batch["pixel_values"]) - 1) == 0  # padded to a power of two


def test_dataset_mixer_weights(dataset):
    records = J.read_jsonl(dataset)
    assert len(J.mix({"a": records}, {"a": 0.5})) == 4
    assert len(J.mix({"a": records, "b": records}, {"a": 2.0, "b": 1.0})) == 24


def _expect_exit_2(result, *needles):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _bad(tmp_path, chat_dir, line: str, files=()):
    root = tmp_path / "bad"
    write_dataset(root, n=3)
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    with open(root / "train.jsonl", "a") as f:
        f.write(line + "\n")
    return run_train([f"model_name_or_path={chat_dir[0]}", f"dataset_mixer={{{root}: 1}}", f"output_dir={tmp_path / 'o'}"])


def test_malformed_jsonl_line_names_its_line(tmp_path, chat_dir):
    _expect_exit_2(_bad(tmp_path, chat_dir, '{"messages": [oops'), "train.jsonl:4", "not valid JSON")


def test_missing_image(tmp_path, chat_dir):
    line = json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["images/nope.png"]})
    _expect_exit_2(_bad(tmp_path, chat_dir, line), "train.jsonl:4", "nope.png", "not found")


def test_image_path_may_not_escape_the_dataset(tmp_path, chat_dir):
    line = json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["../secret.png"]})
    _expect_exit_2(_bad(tmp_path, chat_dir, line, files=["secret.png"]), "escapes the dataset directory")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["bogus_key=1", "another=2"], "unknown config key(s): another, bogus_key"),
        (["max_image_size=500"], "'max_image_size'"),
        (["learning_rate=fast"], "'learning_rate'"),
        (["lr_scheduler_type=step"], "'lr_scheduler_type'"),
        (["per_device_train_batch_size=0"], "'per_device_train_batch_size'"),
        (["mesh=data=2"], "'mesh'"),
        (["lora_target_modules=[nope]", "use_peft=true"], "'lora_target_modules'"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, args, needle):
    result = run_train(["--config", "configs/tiny_cpu.yaml", f"output_dir={tmp_path}", *args])
    _expect_exit_2(result, needle)
