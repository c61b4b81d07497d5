"""The original AriaProcessor's keyword arguments (min_image_size, split_ratio, padding, truncation, max_length,
return_tensors, return_final_prompts) and tokenizer_path: against transformers' AriaProcessor where it has the same
argument (bit-identical arrays, same input_ids); every value that cannot be honoured is one line naming it."""

import json
import re

import numpy as np
import pytest
from aria_proc_dirs import hf_processor, write_dir
from PIL import Image
from tokenizers import Tokenizer, processors

from aria_jax import AriaProcessor
from aria_jax.files import ModelNotFoundError
from aria_jax.inference.processor_options import ProcessorOptionError

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")

KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")
CONFIG = {"model_type": "aria", "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
          "vision_config": {"patch_size": 14}}


def photos():
    return [Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.chelsea()),
            Image.fromarray(skimage_data.rocket())]


def make_dir(path, variant: str):
    """``plain``: the test tokenizer; ``bos_left``: its tokenizer.json adds <s> (so truncation keeps room for it) and
    tokenizer_config.json says truncation_side left."""
    d = write_dir(path, size_conversion={490: 128, 980: 256})
    if variant == "bos_left":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        del cfg["add_bos_token"], cfg["add_eos_token"]
        cfg["truncation_side"] = "left"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
        tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module", params=["plain", "bos_left"])
def procs(request, tmp_path_factory):
    d = make_dir(tmp_path_factory.mktemp(request.param), request.param)
    return AriaProcessor.from_pretrained(d), hf_processor(d)


def assert_same(out, ref):
    for key in KEYS:
        if key in ref:
            np.testing.assert_array_equal(out[key], np.asarray(ref[key]), err_msg=key)
            assert out[key].dtype == np.asarray(ref[key]).dtype, key
    assert set(out) == {k for k in KEYS if k in ref}


TEXTS = ["The quick brown fox jumps over the lazy dog. Hello world.", "What is shown in this picture? A cat"]
TEXT_CASES = [  # (ours, transformers'): ours pads to the longest unless told otherwise (one array)
    ({}, {"padding": True}),
    ({"padding": True}, {"padding": True}),
    ({"padding": "longest"}, {"padding": "longest"}),
    ({"padding": "max_length", "max_length": 40}, {"padding": "max_length", "max_length": 40}),
    ({"max_length": 4}, {"max_length": 4}),  # max_length alone truncates (transformers' rule)
    ({"max_length": 4, "padding": False}, {"max_length": 4, "padding": False}),
    ({"truncation": True, "max_length": 6}, {"truncation": True, "max_length": 6, "padding": True}),
    ({"truncation": "longest_first", "max_length": 9, "padding": "max_length"},
     {"truncation": "longest_first", "max_length": 9, "padding": "max_length"}),
    ({"truncation": "only_first", "max_length": 5, "padding": True},
     {"truncation": "only_first", "max_length": 5, "padding": True}),
    ({"truncation": False, "max_length": 3, "padding": True}, {"truncation": False, "max_length": 3, "padding": True}),
    ({"truncation": "do_not_truncate", "padding": "do_not_pad", "max_length": 99},
     {"truncation": "do_not_truncate", "padding": "do_not_pad", "max_length": 99}),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # transformers: "max_length is ignored when padding=True ..."
@pytest.mark.parametrize("case", range(len(TEXT_CASES)))
def test_padding_truncation_max_length_match_transformers(procs, case):
    ours, theirs = procs
    mine, hers = TEXT_CASES[case]
    texts = TEXTS[:1] if hers.get("padding") == "do_not_pad" else TEXTS
    out = ours(text=texts, **mine)
    ref = theirs(text=list(texts), return_tensors="np", **hers)
    assert_same(out, ref)


def test_truncation_with_images_matches_transformers(procs):
    ours, theirs = procs
    texts, images = ["<|img|> The quick brown fox jumps over the lazy dog.", "describe <|img|>"], photos()[:2]
    if ours.truncation_side == "left":  # the text to cut on the side that is cut
        texts = ["The quick brown fox jumps over the lazy dog. <|img|>", "<|img|> describe"]
    kw = dict(images=images, max_image_size=490, truncation=True, max_length=128 + 5)
    out = ours(text=texts, **kw)
    ref = theirs(text=list(texts), padding=True, return_tensors="np", **kw)
    assert_same(out, ref)
    assert out["input_ids"].shape[1] == 133 and (out["input_ids"] == ours.image_token_id).sum() == 256
    kw["max_length"] = 100  # would cut the images' tokens: both refuse
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        theirs(text=list(texts), padding=True, return_tensors="np", **kw)
    with pytest.raises(ProcessorOptionError, match=r"^max_length=100: truncation cuts text \d's image tokens \(\d+ "
                                                   r"of 128 kept\); raise max_length or pass truncation=False$"):
        ours(text=texts, **kw)


def test_min_image_size_and_split_ratio_match_transformers(procs):
    ours, theirs = procs
    texts, images = ["<|img|> and <|img|>", "one more <|img|>"], photos()
    for kw in ({"min_image_size": 100}, {"min_image_size": 490}, {"min_image_size": 100, "split_image": True}):
        out = ours(text=texts, images=images, max_image_size=490, **kw)
        ref = theirs(text=list(texts), images=images, max_image_size=490, padding=True, return_tensors="np", **kw)
        assert_same(out, ref)
    # split_ratio: the original's [width, height] list; transformers' split reads it as its split_resolutions
    ratios = [[1, 1], [2, 1], [1, 3], [2, 2]]
    out = ours(text=texts, images=images, max_image_size=490, split_image=True, split_ratio=ratios, min_image_size=200)
    ref = theirs(text=list(texts), images=images, max_image_size=490, split_image=True, min_image_size=200,
                 split_resolutions=[[a * 490, b * 490] for a, b in ratios], padding=True, return_tensors="np")
    assert_same(out, ref)
    default = ours(text=texts, images=images, max_image_size=490, split_image=True)
    assert out["pixel_values"].shape[0] != default["pixel_values"].shape[0]  # the list was used


def test_return_tensors_and_final_prompts(procs):
    import jax
    import torch
    from transformers import TensorType

    ours, theirs = procs
    texts, images = ["<|img|> x", "a longer text about <|img|>"], photos()[:2]
    pt = ours(text=texts, images=images, max_image_size=490, return_tensors="pt")
    ref = theirs(text=list(texts), images=images, max_image_size=490, padding=True, return_tensors="pt")
    for key in KEYS:
        assert isinstance(pt[key], torch.Tensor) and torch.equal(pt[key], ref[key]), key
    jx = ours(text=texts, images=images, max_image_size=490, return_tensors="jax")
    assert all(isinstance(v, jax.Array) for v in jx.values())
    np.testing.assert_array_equal(np.asarray(jx["pixel_values"]), pt["pixel_values"].numpy())
    plain = ours(text=texts, images=images, max_image_size=490, return_tensors=TensorType.NUMPY)
    assert all(isinstance(v, np.ndarray) for v in plain.values())

    batch, prompts = ours(text=texts, images=images, max_image_size=490, return_final_prompts=True)
    assert prompts == [t.replace("<|img|>", "<|img|>" * 128) for t in texts]
    for key in KEYS:
        np.testing.assert_array_equal(batch[key], plain[key])


REFUSED = [
    ({"padding": "sideways"}, "padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got 'sideways'"),
    ({"padding": 1}, "padding must be True, False"),
    ({"truncation": "only_second", "max_length": 4}, "truncation='only_second' cuts the second text of text pairs"),
    ({"truncation": 3}, "truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', got 3"),
    ({"max_length": 0}, "max_length must be a positive integer, got 0"),
    ({"max_length": True}, "max_length must be a positive integer, got True"),
    ({"max_length": 2.5}, "max_length must be a positive integer, got 2.5"),
    ({"min_image_size": 0}, "min_image_size must be an integer in 1..max_image_size (490), got 0"),
    ({"min_image_size": 491}, "min_image_size must be an integer in 1..max_image_size (490), got 491"),
    ({"min_image_size": True}, "min_image_size must be an integer in 1..max_image_size (490), got True"),
    ({"split_ratio": [[0, 1]]}, "split_ratio must be a non-empty list of [width, height] pairs"),
    ({"split_ratio": []}, "split_ratio must be a non-empty list"),
    ({"split_ratio": "12"}, "split_ratio must be a non-empty list"),
    ({"split_ratio": [[1, 2, 3]]}, "split_ratio must be a non-empty list"),
    ({"split_mode": "llava"}, "split_mode must be 'hf' (transformers' split) or 'original'"),
    ({"return_tensors": "tf"}, "return_tensors must be 'np' (the default), 'jax' or 'pt', got 'tf'"),
    ({"return_final_prompts": "yes"}, "return_final_prompts must be True or False, got 'yes'"),
    ({"padding": False}, "padding=False: the texts are "),
    ({"padding": "max_length", "max_length": 3}, "padding='max_length': text 0 has "),
    ({"max_image_size": 512}, "max_image_size must be 490 or 980, got 512"),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_values_that_cannot_be_honoured_are_one_line(procs, case):
    ours, _ = procs
    kw, message = REFUSED[case]
    kw = {"max_image_size": 490, **kw}
    with pytest.raises(ProcessorOptionError, match="^" + re.escape(message)) as e:
        ours(text=["<|img|> The quick brown fox", "<|img|>"], images=photos()[:2], **kw)
    assert "\n" not in str(e.value)


def test_max_length_padding_needs_a_length(tmp_path):
    proc = AriaProcessor.from_pretrained(make_dir(tmp_path, "plain"))
    assert proc.model_max_length == 1000000  # tokenizer_config.json's
    proc.model_max_length = None
    with pytest.raises(ProcessorOptionError, match=r"^padding='max_length' needs max_length"):
        proc(text=["hello"], padding="max_length")
    assert proc(text=["hello world", "hello"], truncation=True)["input_ids"].shape[0] == 2  # nothing to cut to


# ---------------------------------------------------------------------------------------------------- tokenizer_path


@pytest.fixture
def split_dirs(tmp_path):
    """(a full processor directory, a model directory without tokenizer files, a tokenizer directory)."""
    full = write_dir(tmp_path / "full", model_config=CONFIG)
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (model / name).write_bytes((full / name).read_bytes())
    tok = write_dir(tmp_path / "tok")
    (tok / "preprocessor_config.json").unlink()
    return full, model, tok


def test_tokenizer_path_gives_the_same_processor(split_dirs):
    full, model, tok = split_dirs
    a, b = AriaProcessor.from_pretrained(full), AriaProcessor.from_pretrained(model, tokenizer_path=tok)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    assert a.apply_chat_template(messages, add_generation_prompt=True) == b.apply_chat_template(
        messages, add_generation_prompt=True)
    texts = [b.apply_chat_template(messages, add_generation_prompt=True), "what is shown in <|img|>"]
    out_a = a(text=texts, images=photos()[:2], max_image_size=980)
    out_b = b(text=texts, images=photos()[:2], max_image_size=980)
    for key in KEYS:
        np.testing.assert_array_equal(out_a[key], out_b[key])
    assert b.size_conversion == {490: 128, 980: 256}  # from the model directory's config.json
    with pytest.raises(ValueError, match="^no tokenizer.json in "):
        AriaProcessor.from_pretrained(model)


def test_tokenizer_path_hub_ids_resolve_offline(split_dirs, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    full, model, tok = split_dirs
    calls = []

    def cached(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tok)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    proc = AriaProcessor.from_pretrained(model, tokenizer_path="rhymes-ai/Aria", revision="v1")
    assert proc.image_token_id == 9
    assert calls == [("rhymes-ai/Aria", "v1", ["*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken"])]

    def offline(repo_id, revision=None, allow_patterns=None):
        raise errors.LocalEntryNotFoundError("not cached\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match=r"^tokenizer_path someone/tok: cannot fetch from the hub "
                                                 r"\(LocalEntryNotFoundError: "):
        AriaProcessor.from_pretrained(model, tokenizer_path="someone/tok")
    missing = model.parent / "nope"
    with pytest.raises(ModelNotFoundError, match=f"^tokenizer_path {re.escape(str(missing))}: not a model directory"):
        AriaProcessor.from_pretrained(model, tokenizer_path=missing)
