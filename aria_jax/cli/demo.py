"""``aria-jax demo``: the whole path on a tiny random Aria built locally, no hub and no network.

random weights + a freshly trained tiny tokenizer -> HF checkpoint (``export``) -> ``convert`` -> ``from_pretrained``
-> processor (chat template + an image) -> ``chat``. The model is random, so the reply is gibberish; the point is
that every stage runs.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aria_jax.checkpoint.convert import convert
from aria_jax.checkpoint.converted import ParamWriter
from aria_jax.checkpoint.export import export
from aria_jax.config import AriaConfig
from aria_jax.inference.api import Aria
from aria_jax.model.schema import declared_params

# The chat template of the converted hub checkpoint (aria-spec.md §5.3).
ARIA_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Ids 0..9 as in the real tokenizer where it matters: <unk> 0, <s> 1, </s> 2, <|img|> 9.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<fim_prefix>", "<fim_suffix>", "<|im_start|>", "<|im_end|>",
                  "<|reserved|>", "<|img|>"]
CORPUS = ["describe the image in detail.", "what is in this picture? a cat on a sofa next to a cup of coffee.",
          "the quick brown fox jumps over the lazy dog.", "user assistant: answer the question about the photo."]


def write_tokenizer(directory: str, vocab_size: int, tokens_per_image: dict[int, int]) -> None:
    """A byte-level BPE trained on a few sentences, plus the files transformers' AriaProcessor reads."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "image_token": "<|img|>"}
    files = {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                                  "add_eos_token": False, "padding_side": "left", **specials},
        "special_tokens_map.json": specials,
        "chat_template.json": {"chat_template": ARIA_CHAT_TEMPLATE},
        "processor_config.json": {"processor_class": "AriaProcessor",
                                  "size_conversion": {str(k): v for k, v in tokens_per_image.items()}},
        "preprocessor_config.json": {"image_processor_type": "AriaImageProcessor", "max_image_size": 980,
                                     "min_image_size": 336, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)


def demo_image(size: int = 640) -> Image.Image:
    """A synthetic landscape-ish picture (gradients and a disc), so the demo needs no files."""
    y, x = np.mgrid[0:size, 0:size * 3 // 4].astype(np.float32) / size
    rgb = np.stack([x, y, 1 - (x - 0.4) ** 2 - (y - 0.3) ** 2 < 0.9], axis=-1).astype(np.float32)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 0, 2))


def build_random_checkpoint(directory: str, seed: int = 0) -> str:
    """A tiny random Aria as an HF-format directory (hub layout) with tokenizer files; returns its path."""

    cfg = AriaConfig.preset("tiny")
    model = Aria.from_config(cfg, seed=seed, dtype="float32", layout="stacked")
    random_dir = os.path.join(directory, "random")
    os.makedirs(random_dir)
    writer = ParamWriter(random_dir, *declared_params(cfg, model.dtype), model.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        writer.write(tuple(k.key for k in path), None, np.asarray(leaf))
    writer.close()
    with open(os.path.join(random_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    tokens_per_image = {s: cfg.queries_for_patches((s // cfg.vision.patch_size) ** 2) for s in (490, 980)}
    write_tokenizer(random_dir, cfg.text.vocab_size, tokens_per_image)
    hf_dir = os.path.join(directory, "hf")
    export(random_dir, hf_dir, layout="hub", progress=False)
    return hf_dir


def run(workdir: str | None = None, max_new_tokens: int = 16, out=print) -> str:
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        hf_dir = build_random_checkpoint(directory)
        out(f"1. built a tiny random Aria checkpoint (HF hub layout + tokenizer): {hf_dir}")
        converted = os.path.join(directory, "converted")
        summary = convert(hf_dir, converted, progress=False)
        out(f"2. converted {summary['tensors']} tensors ({summary['layout']} layout) to {converted}")
        model = Aria.from_pretrained(converted)
        out(f"3. loaded it: {sum(x.size for x in jax.tree.leaves(model.params)):,} parameters")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
        prompt = model.processor.apply_chat_template(messages, add_generation_prompt=True)
        out(f"4. prompt: {prompt!r} + a {demo_image().size[0]}x{demo_image().size[1]} image at 490 px")
        reply = model.chat(messages, images=[demo_image()], max_new_tokens=max_new_tokens, max_image_size=490)
        out(f"5. reply (random weights, so gibberish): {reply!r}")
        out(f"   {model.last_stats}")
        return reply


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path offline on a tiny random model",
                       description="Build a tiny random Aria checkpoint and tokenizer locally, convert it, load it, "
                                   "process an image and generate a reply. Needs no network and no hub.")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (16)")
    p.add_argument("--workdir", default=None, help="where to put the temporary files (default: the system temp dir)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    run(args.workdir, args.max_new_tokens)
    return 0
