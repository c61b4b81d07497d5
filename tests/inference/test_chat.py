"""End to end with a tokenizer: processor -> generate -> decode, against transformers' processor and generate."""

import numpy as np
import pytest
import torch
from aria_proc_dirs import hf_processor
from PIL import Image

from aria_jax import Aria


def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())


def messages():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]


def hf_reply(model, directory, max_new_tokens, **generate_kwargs):
    proc = hf_processor(directory)
    prompt = proc.apply_chat_template(messages(), add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[photo()], max_image_size=490, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, tokenizer=proc.tokenizer,
                             **generate_kwargs)
    new = out[0, inputs["input_ids"].shape[1]:]
    return proc.tokenizer.decode(new, skip_special_tokens=True), new.numpy()


def test_chat_equals_transformers_processor_and_generate(chat_dir):
    directory, hf = chat_dir
    model = Aria.from_pretrained(directory, dtype="float32")
    assert model.processor is not None
    ref_text, _ = hf_reply(hf, directory, 12, stop_strings=["<|im_end|>"])
    reply = model.chat(messages(), images=[photo()], max_new_tokens=12, max_image_size=490)
    assert reply == ref_text
    assert len(reply) > 0
    streamed = list(model.chat(messages(), images=[photo()], max_new_tokens=12, max_image_size=490, stream=True))
    assert "".join(streamed) == reply and len(streamed) > 1
    assert model.last_stats.new_tokens == 12 and model.last_stats.prefill_ms > 0


def test_stop_strings_stop_where_transformers_stops(chat_dir):
    directory, hf = chat_dir
    model = Aria.from_pretrained(directory, dtype="float32")
    full_text, full_tokens = hf_reply(hf, directory, 16)
    # A stop string that ends inside the 6th generated token's text: both must stop right after that token.
    decode = model.processor.decode
    upto5 = decode([int(t) for t in full_tokens[:5]], skip_special_tokens=False)
    upto6 = decode([int(t) for t in full_tokens[:6]], skip_special_tokens=False)
    stop = upto6[max(0, len(upto5) - 2): len(upto5) + 1]
    assert stop and stop not in upto5
    _, ref_tokens = hf_reply(hf, directory, 16, stop_strings=[stop])
    proc = model.processor
    batch = proc(text=[proc.apply_chat_template(messages(), add_generation_prompt=True)], images=[photo()],
                 max_image_size=490)
    out = model.generate(**batch, max_new_tokens=16, stop_strings=[stop])
    np.testing.assert_array_equal(out[0], ref_tokens)
    assert len(ref_tokens) == 6 and full_text.startswith(decode([int(t) for t in out[0]], skip_special_tokens=True))


def test_images_not_matching_placeholders(chat_dir):
    directory, _ = chat_dir
    model = Aria.from_pretrained(directory, dtype="float32")
    with pytest.raises(ValueError, match=r"1 <\|img\|> placeholder\(s\) but 2 image\(s\)"):
        model.chat(messages(), images=[photo(), photo()], max_new_tokens=2, max_image_size=490)
