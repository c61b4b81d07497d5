"""The offline demo: every stage runs, and its checkpoint gives transformers the same reply as aria_jax."""

import torch

from aria_jax import Aria
from aria_jax.cli.demo import build_random_checkpoint, demo_image, run


def test_demo_runs_every_stage(tmp_path):
    lines = []
    reply = run(str(tmp_path), max_new_tokens=6, out=lines.append)
    assert [line[:2] for line in lines[:5]] == ["1.", "2.", "3.", "4.", "5."]
    assert isinstance(reply, str) and repr(reply) in lines[4]
    assert list(tmp_path.iterdir()) == []  # temporary files are gone


def test_demo_checkpoint_replies_like_transformers(tmp_path):
    from aria_proc_dirs import hf_processor
    from transformers import AriaForConditionalGeneration

    hf_dir = build_random_checkpoint(str(tmp_path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    ours = Aria.from_pretrained(hf_dir, dtype="float32").chat(messages, images=[demo_image()], max_new_tokens=8,
                                                            max_image_size=490)
    proc = hf_processor(hf_dir)
    hf = AriaForConditionalGeneration.from_pretrained(hf_dir).eval()
    inputs = proc(text=[proc.apply_chat_template(messages, add_generation_prompt=True)], images=[demo_image()],
                  max_image_size=490, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, stop_strings=["<|im_end|>"],
                          tokenizer=proc.tokenizer)
    assert ours == proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
