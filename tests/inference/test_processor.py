"""aria_jax.inference.processor.AriaProcessor against transformers' AriaProcessor (PIL image backend) on the same directory."""

import json
import shutil

import numpy as np
import pytest
from aria_proc_dirs import ARIA_CHAT_TEMPLATE, hf_processor, write_dir
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from aria_jax import AriaProcessor
from aria_jax.errors import InputError
from aria_jax.inference.processor import ChatTemplateError, ChatTemplateRejected

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")

KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_mask")

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image in detail, please."}]},
    {"role": "assistant", "content": "A cat, a cup of coffee and an astronaut!"},
    {"role": "user", "content": [{"type": "text", "text": "What is shown in"}, {"type": "image"}, {"type": "text", "text": " this picture?"}]},
]


@pytest.fixture(scope="module")
def aria_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("aria_proc"), size_conversion={490: 128, 980: 256})


@pytest.fixture(scope="module")
def procs(aria_dir):
    return AriaProcessor.from_pretrained(aria_dir), hf_processor(aria_dir)


def photos():
    return [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.rocket())]


def assert_same_batch(out, ref):
    assert set(out) == set(KEYS) & set(out)
    for key in KEYS:
        if key in out:
            assert out[key].dtype == np.asarray(ref[key]).dtype, key
            np.testing.assert_array_equal(out[key], np.asarray(ref[key]), err_msg=key)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_identical(procs, add_generation_prompt):
    ours, theirs = procs
    for messages in (MESSAGES, MESSAGES[:1], [{"role": "user", "content": "plain string"}], [MESSAGES, MESSAGES[:1]]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    text = ours.apply_chat_template(MESSAGES[:1], add_generation_prompt=True)
    assert text == "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>describe the image in detail, please.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template_file", ["chat_template.jinja", "tokenizer_config"])
def test_chat_template_sources(tmp_path, template_file):
    d = write_dir(tmp_path, size_conversion={490: 128, 980: 256}, template_file=template_file)
    ours = AriaProcessor.from_pretrained(d)
    assert ours.chat_template == ARIA_CHAT_TEMPLATE
    if template_file == "chat_template.jinja":  # transformers' processor reads only its own template files
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == hf_processor(d).apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_chat_template_globals_and_errors(procs):
    ours, theirs = procs
    template = "{% if messages|length > 1 %}{{ raise_exception('too many: ' ~ messages|length) }}{% endif %}{{ bos_token }}{{ messages[0] | tojson }}|{{ eos_token }}|{{ pad_token }}"
    msgs = [{"role": "user", "content": "héllo <b>", "extra": None}]
    assert ours.apply_chat_template(msgs, chat_template=template) == theirs.apply_chat_template(msgs, chat_template=template)
    with pytest.raises(ChatTemplateRejected, match="^chat template: the template refuses this conversation: too many: 2$"):
        ours.apply_chat_template(msgs * 2, chat_template=template)
    with pytest.raises(ChatTemplateError, match="breaks the template sandbox"):
        ours.apply_chat_template(msgs, chat_template="{{ messages.__class__.__base__.__subclasses__() }}")


@pytest.mark.parametrize("max_image_size", [490, 980])
def test_batch_identical_to_transformers(procs, max_image_size):
    ours, theirs = procs
    texts = [
        ours.apply_chat_template(MESSAGES, add_generation_prompt=True),  # two images, long
        "Hello <|img|> world!",  # one image, short
    ]
    images = photos()
    out = ours(text=texts, images=images, max_image_size=max_image_size)
    ref = theirs(text=list(texts), images=images, max_image_size=max_image_size, padding=True, return_tensors="np")
    assert_same_batch(out, ref)
    per_image = {490: 128, 980: 256}[max_image_size]
    assert (out["input_ids"] == ours.image_token_id).sum() == 3 * per_image
    assert out["attention_mask"][1, 0] == 0 and out["input_ids"][1, 0] == ours.pad_token_id == 3  # left padding
    assert out["attention_mask"][:, -1].all()


def test_split_image_identical_to_transformers(procs):
    ours, theirs = procs
    texts = ["<|img|> wide one", "and a tall <|img|>"]
    images = [Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.camera()).resize((200, 520))]
    out = ours(text=texts, images=images, max_image_size=490, split_image=True)
    ref = theirs(text=list(texts), images=images, max_image_size=490, split_image=True, padding=True, return_tensors="np")
    assert_same_batch(out, ref)


def test_original_split_uses_per_image_crop_counts(procs):
    ours, _ = procs
    images = [Image.new("RGB", (200, 100)), Image.new("RGB", (100, 100))]  # 3 and 5 crops
    out = ours(text=["<|img|><|img|>"], images=images, max_image_size=490, split_image=True, split_mode="original")
    assert out["pixel_values"].shape[0] == 8
    assert (out["input_ids"] == ours.image_token_id).sum() == 8 * 128


def test_text_only_and_decode(procs):
    ours, theirs = procs
    texts = ["The quick brown fox jumps over the lazy dog.", "<|im_start|>user\nHello world<|im_end|>\n"]
    out = ours(text=texts)
    ref = theirs(text=list(texts), padding=True, return_tensors="np")
    assert set(out) == {"input_ids", "attention_mask"}
    assert_same_batch(out, ref)
    for skip in (True, False):
        assert ours.batch_decode(out["input_ids"], skip_special_tokens=skip) == theirs.batch_decode(ref["input_ids"], skip_special_tokens=skip)
        assert ours.decode(out["input_ids"][1], skip_special_tokens=skip) == theirs.decode(ref["input_ids"][1], skip_special_tokens=skip)
    assert ours.decode(out["input_ids"][1], skip_special_tokens=True) == "user\nHello world\n"


def test_special_token_ids(procs):
    ours, theirs = procs
    assert (ours.image_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (9, 1, 2, 0)
    assert ours.image_token_id == theirs.image_token_id and ours.pad_token_id == theirs.tokenizer.pad_token_id


def test_pad_falls_back_to_unk_like_transformers(tmp_path):
    d = write_dir(tmp_path, pad_token=None, size_conversion={490: 128, 980: 256})
    ours, theirs = AriaProcessor.from_pretrained(d), hf_processor(d)
    assert ours.pad_token_id == 0 == theirs.tokenizer.pad_token_id
    texts = ["short <|img|>", "a much longer prompt about the <|img|> picture, please."]
    images = photos()[:2]
    out = ours(text=texts, images=images, max_image_size=490)
    ref = theirs(text=list(texts), images=images, max_image_size=490, padding=True, return_tensors="np")
    assert_same_batch(out, ref)


def test_tokens_per_image_from_config_json(tmp_path):
    # no size_conversion in processor_config.json: read config.json's projector_patch_to_query_dict (patches of 14)
    cfg = {"model_type": "aria", "projector_patch_to_query_dict": {"1225": 3, "4900": 5}, "vision_config": {"patch_size": 14}}
    d = write_dir(tmp_path, model_config=cfg)
    ours = AriaProcessor.from_pretrained(d)
    assert ours.size_conversion == {490: 3, 980: 5}
    theirs = hf_processor(d, size_conversion={490: 3, 980: 5})
    texts, images = ["<|img|> x", "y <|img|> z <|img|>"], photos()
    for m in (490, 980):
        out = ours(text=texts, images=images, max_image_size=m)
        ref = theirs(text=list(texts), images=images, max_image_size=m, padding=True, return_tensors="np")
        assert_same_batch(out, ref)


def test_custom_size_conversion_from_processor_config(tmp_path):
    d = write_dir(tmp_path, size_conversion={490: 7, 980: 11})
    out = AriaProcessor.from_pretrained(d)(text=["<|img|>"], images=photos()[:1], max_image_size=980)
    assert (out["input_ids"] == 9).sum() == 11


def test_errors(procs, tmp_path):
    ours, _ = procs
    with pytest.raises(ValueError, match=r"2 <\|img\|> placeholder.*1 image"):
        ours(text=["<|img|> and <|img|>"], images=photos()[:1])
    with pytest.raises(ValueError, match=r"0 <\|img\|> placeholder.*2 image"):
        ours(text=["no placeholder"], images=photos()[:2])
    with pytest.raises(ValueError, match="1234"):
        ours(text=["<|img|>"], images=photos()[:1], max_image_size=1234)
    with pytest.raises(ValueError, match="tokenizer.json"):
        AriaProcessor.from_pretrained(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="bad.png"):
        ours(text=["<|img|>"], images=[str(bad)])
    d = write_dir(tmp_path / "no_sizes")  # neither size_conversion nor config.json
    with pytest.raises(ValueError, match="size_conversion"):
        AriaProcessor.from_pretrained(d)(text=["<|img|>"], images=photos()[:1])


def test_vocab_size_guard(tmp_path):
    cfg = {"model_type": "aria", "text_config": {"vocab_size": 50}, "projector_patch_to_query_dict": {"1225": 2, "4900": 4}}
    proc = AriaProcessor.from_pretrained(write_dir(tmp_path, model_config=cfg))
    with pytest.raises(ValueError, match="vocab_size 50"):
        proc(text=["The quick brown fox jumps over the lazy dog."])


CONFIG_FILES = ("preprocessor_config.json", "tokenizer_config.json", "processor_config.json", "special_tokens_map.json",
                "chat_template.json")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def fuzz_dirs(tmp_path_factory):
    source = write_dir(tmp_path_factory.mktemp("fuzz_src"), size_conversion={490: 4, 980: 8})
    return source, tmp_path_factory.mktemp("fuzz_work") / "d"


@given(st.sampled_from(CONFIG_FILES), st.booleans(), st.data())
def test_mutated_processor_files_raise_one_line_errors(fuzz_dirs, name, whole, data):
    """Any value in the processor's JSON files: a processor, or an InputError naming the file. Before: TypeError
    and AttributeError tracebacks (a list for size_conversion, null in image_mean, ...)."""
    source, work = fuzz_dirs
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    content = json.loads((source / name).read_text())
    if whole:
        content = data.draw(JSON_VALUES)
    else:
        content[data.draw(st.sampled_from(sorted(content)))] = data.draw(JSON_VALUES)
    (work / name).write_text(json.dumps(content))
    try:
        processor = AriaProcessor.from_pretrained(work)
    except InputError as e:
        assert str(work) in str(e) and "\n" not in str(e)
        return
    try:
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    except ValueError as e:  # no template, or a template that does not render this conversation
        assert "\n" not in str(e)
