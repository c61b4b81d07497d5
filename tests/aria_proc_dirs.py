"""Build tiny Aria processor directories (tokenizer + configs + chat template) that transformers also loads."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aria_jax.cli.demo import ARIA_CHAT_TEMPLATE, SPECIAL_TOKENS

# The real Aria chat template and special-token order (ids 0..9: <unk>=0, <s>=1, </s>=2, <|img|>=9); the processor
# tests render it with transformers too, so its text is checked against the reference there.
SPECIALS = SPECIAL_TOKENS

CORPUS = [
    "describe the image in detail, please.",
    "What is shown in this picture? A cat, a cup of coffee and an astronaut!",
    "The quick brown fox jumps over the lazy dog. Hello world.",
    "user assistant system: answer the question about the photo",
] * 20


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(10))
    return tok


def write_dir(
    directory,
    *,
    pad_token: str | None = "<pad>",
    size_conversion: dict | None = None,
    model_config: dict | None = None,
    template_file: str = "chat_template.json",
    preprocessor: dict | None = None,
) -> Path:
    """Write a processor directory. ``template_file``: chat_template.json, chat_template.jinja or tokenizer_config."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(d / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 1000000,
        "extra_special_tokens": {"image_token": "<|img|>"},
    }
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "image_token": "<|img|>",
    }
    if pad_token is not None:
        tok_cfg["pad_token"] = pad_token
        special_map["pad_token"] = pad_token
    if template_file == "tokenizer_config":
        tok_cfg["chat_template"] = ARIA_CHAT_TEMPLATE
    elif template_file == "chat_template.json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": ARIA_CHAT_TEMPLATE}))
    else:
        (d / "chat_template.jinja").write_text(ARIA_CHAT_TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    proc_cfg = {"processor_class": "AriaProcessor"}
    if size_conversion is not None:
        proc_cfg["size_conversion"] = {str(k): v for k, v in size_conversion.items()}
    (d / "processor_config.json").write_text(json.dumps(proc_cfg, indent=2))
    pre = {
        "image_processor_type": "AriaImageProcessor",
        "processor_class": "AriaProcessor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "max_image_size": 980,
        "min_image_size": 336,
        "split_image": False,
        **(preprocessor or {}),
    }
    (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    if model_config is not None:
        (d / "config.json").write_text(json.dumps(model_config, indent=2))
    return d


def hf_processor(directory, size_conversion: dict | None = None):
    """transformers' AriaProcessor on the same directory, with the PIL image processor."""
    from transformers import AriaProcessor as HFAriaProcessor
    from transformers import AutoTokenizer
    from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    image_processor = AriaImageProcessorPil.from_pretrained(str(directory))
    if size_conversion is None:
        return HFAriaProcessor.from_pretrained(str(directory), tokenizer=tokenizer, image_processor=image_processor)
    return HFAriaProcessor.from_pretrained(
        str(directory), tokenizer=tokenizer, image_processor=image_processor, size_conversion=size_conversion
    )
