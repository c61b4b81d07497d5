"""split_mode="original" against the original rhymes-ai/Aria code itself (copied below), from the image processor up
to ``Aria.chat`` and ``Aria.generate``: the same crops, bit-identical pixel values and masks, the same prompts."""

import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from aria_jax import Aria, AriaProcessor
from aria_jax.inference.image_processor import AriaImageProcessor

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------------------------
# The reference: rhymes-ai/Aria, aria/model/vision_processor.py and aria/model/processing_aria.py (commit 9b25fec,
# Apache-2.0, Copyright 2024 Rhymes AI), copied unchanged except where marked. The original needs torchvision for
# two operations of its ``transform``; `_to_tensor` and `_normalize` are those operations as torchvision defines them
# (transforms.ToTensor on a uint8 RGB image, transforms.Normalize), since torchvision is not installed here.

ORIGINAL_SPLIT_RATIO = [[1, 2], [1, 3], [1, 4], [1, 5], [1, 6], [1, 7], [1, 8], [2, 4], [2, 3], [2, 2], [2, 1], [3, 1],
                        [3, 2], [4, 1], [4, 2], [5, 1], [6, 1], [7, 1], [8, 1]]


def _select_best_resolution(img_width, img_height, target_ratios, patch_size):
    aspect_ratio = img_width / img_height
    best_ratio_diff = float("inf")
    best_ratio_w, best_ratio_h = 1, 1
    area = np.int32(img_width) * np.int32(img_height)
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio_w, best_ratio_h = ratio[0], ratio[1]
        elif (
            ratio_diff == best_ratio_diff
            and area > 0.5 * patch_size * patch_size * ratio[0] * ratio[1]
        ):
            best_ratio_w, best_ratio_h = ratio[0], ratio[1]

    return best_ratio_w, best_ratio_h


def _split_image(image, split_image, split_ratio, patch_size):
    if split_image:
        ratio_width, ratio_height = _select_best_resolution(
            image.width, image.height, split_ratio, patch_size
        )
        resize_width = patch_size * ratio_width
        resize_height = patch_size * ratio_height
        blocks = ratio_width * ratio_height
        resized_img = image.resize((resize_width, resize_height))
        processed_images = []
        for i in range(blocks):
            box = (
                (i % (resize_width // patch_size)) * patch_size,
                (i // (resize_width // patch_size)) * patch_size,
                ((i % (resize_width // patch_size)) + 1) * patch_size,
                ((i // (resize_width // patch_size)) + 1) * patch_size,
            )
            # split the image
            split_img = resized_img.crop(box)
            processed_images.append(split_img)
        assert len(processed_images) == blocks
        if len(processed_images) != 1:
            processed_images.insert(0, image)
        return processed_images
    else:
        return [image]


def keep_ratio_resize_and_pixel_mask(img, max_size, min_size=336, padding_value=0):
    img = img.convert("RGB")
    # rescale the given image, keep the aspect ratio
    scale = max_size / max(img.size)

    w, h = img.size
    if w >= h:
        new_size = (max_size, max(int(h * scale), min_size))  # w, h
    else:
        new_size = (max(int(w * scale), min_size), max_size)  # w, h

    img_resized = img.resize(new_size, resample=Image.Resampling.BICUBIC)

    # padding the right/bottom
    padding_right, padding_bottom = max_size - new_size[0], max_size - new_size[1]
    img_padded = ImageOps.expand(
        img_resized, (0, 0, padding_right, padding_bottom), fill=padding_value
    )

    # Create a pixel mask
    pixel_mask = torch.zeros(max_size, max_size)
    pixel_mask[: new_size[1], : new_size[0]] = 1
    pixel_mask = pixel_mask.bool()
    return img_padded, pixel_mask


def _to_tensor(pic):  # torchvision.transforms.ToTensor for a uint8 RGB PIL image
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True)).view(pic.size[1], pic.size[0], 3)
    return img.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)


def _normalize(tensor, mean, std):  # torchvision.transforms.Normalize (functional._normalize)
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def original_vision_processor(images, max_image_size=980, min_image_size=336, split_image=False,
                              split_ratio=ORIGINAL_SPLIT_RATIO, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
    """``AriaVisionProcessor.__call__`` (its body, with ``self.transform`` spelled out)."""
    max_size, min_size = max_image_size, min_image_size
    if isinstance(images, Image.Image):
        images = [images]
    pixel_values = []
    pixel_masks = []
    num_crops = []
    for image in images:
        crop_images = _split_image(image, split_image, split_ratio, max_size)
        num_crops.append(torch.tensor(len(crop_images)))
        for crop_image in crop_images:
            img_padded, pixel_mask = keep_ratio_resize_and_pixel_mask(crop_image, max_size, min_size)
            img_padded = _normalize(_to_tensor(img_padded), image_mean, image_std)
            pixel_values.append(img_padded)
            pixel_masks.append(pixel_mask)
    return {"pixel_values": torch.stack(pixel_values), "pixel_mask": torch.stack(pixel_masks),
            "num_crops": torch.stack(num_crops)}


def original_prompts(text, num_crops, num_image_tokens, image_token="<|img|>"):
    """``AriaProcessor.__call__``'s image-token expansion (``num_image_tokens``: 128 / 256 in the original, the
    checkpoint's tokens per image here)."""
    prompt_strings = []
    crop_iter = iter(num_crops)
    for prompt in text:
        prompt_strings.append(re.sub(re.escape(image_token), lambda _: next(crop_iter) * image_token, prompt))
    return [sample.replace(image_token, image_token * num_image_tokens) for sample in prompt_strings]

# ---------------------------------------------------------------------------------------------------------------


def photos():
    return {
        "astronaut": Image.fromarray(skimage_data.astronaut()),  # square: ratio tie, later (2, 2) wins
        "coffee": Image.fromarray(skimage_data.coffee()),  # 600 x 400: (3, 2)
        "rocket": Image.fromarray(skimage_data.rocket()),
        "camera_L": Image.fromarray(skimage_data.camera()).resize((300, 200)),  # grayscale: the same arrays too
    }


def shapes():
    rng = np.random.RandomState(0)
    rgb = lambda w, h: Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    return {"1x1": rgb(1, 1), "300x5": rgb(300, 5), "5x300": rgb(5, 300), "200x100": rgb(200, 100),
            "1000x2000": rgb(1000, 2000), "980x490": rgb(980, 490), "33x1000": rgb(33, 1000)}


def assert_matches_original(out, ref, name=""):
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"].numpy(), err_msg=name)
    np.testing.assert_array_equal(out["pixel_mask"], ref["pixel_mask"].numpy(), err_msg=name)
    assert out["crops"] == ref["num_crops"].tolist(), name


@pytest.mark.parametrize("split_image", [True, False])
def test_image_processor_is_the_original_at_490(split_image):
    for name, image in {**photos(), **shapes()}.items():
        ref = original_vision_processor([image], 490, split_image=split_image)
        out = AriaImageProcessor()([image], 490, split_image=split_image, split_mode="original")
        assert_matches_original(out, ref, name)


def test_image_processor_is_the_original_at_980():
    images = {k: v for k, v in {**photos(), **shapes()}.items() if k in ("coffee", "5x300", "980x490", "1x1")}
    for name, image in images.items():
        ref = original_vision_processor([image], 980, split_image=True)
        out = AriaImageProcessor()([image], 980, split_image=True, split_mode="original")
        assert_matches_original(out, ref, name)


def test_split_ratio_and_min_image_size_are_the_originals(tmp_path):
    from aria_proc_dirs import write_dir

    proc = AriaProcessor.from_pretrained(write_dir(tmp_path, size_conversion={490: 128, 980: 256}))
    ratios = [[1, 1], [3, 1], [1, 3], [2, 2], [4, 3]]
    images = [photos()["coffee"], shapes()["5x300"], shapes()["200x100"], photos()["astronaut"]]
    for min_size in (336, 100, 490):
        ref = original_vision_processor(images, 490, min_size, split_image=True, split_ratio=ratios)
        out = AriaImageProcessor()(images, 490, True, "original", min_image_size=min_size,
                                   split_resolutions=[[a * 490, b * 490] for a, b in ratios])
        assert_matches_original(out, ref, f"min {min_size}")
        batch = proc(text=["<|img|>" * 4], images=images, max_image_size=490, split_mode="original",
                     split_ratio=ratios, min_image_size=min_size)
        np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"].numpy())
    # (width, height) ratios: 600 x 400 and 200 x 100 take (4, 3), the tall strip (1, 3), the square (1, 1) alone
    assert out["crops"] == [13, 4, 13, 1]


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    from aria_proc_dirs import hf_processor, write_dir

    d = write_dir(tmp_path_factory.mktemp("original"), size_conversion={490: 128, 980: 256})
    return AriaProcessor.from_pretrained(d), hf_processor(d)


def test_processor_prompts_ids_and_pixels_are_the_originals(procs):
    ours, theirs = procs
    texts = ["<|img|> wide and <|img|> tall", "a square <|img|>"]
    images = [photos()["coffee"], shapes()["5x300"], photos()["astronaut"]]
    ref = original_vision_processor(images, 490, split_image=True)
    prompts = original_prompts(texts, ref["num_crops"].tolist(), 128)
    batch, final = ours(text=texts, images=images, max_image_size=490, split_mode="original",
                        return_final_prompts=True)
    assert final == prompts
    ids = theirs.tokenizer(prompts, padding=True, return_tensors="np")  # the original tokenizes its prompts so
    np.testing.assert_array_equal(batch["input_ids"], ids["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ids["attention_mask"])
    np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"].numpy())
    np.testing.assert_array_equal(batch["pixel_mask"], ref["pixel_mask"].numpy())


def test_original_mode_splits_unless_told_not_to(procs):
    ours, _ = procs
    image = photos()["coffee"]
    count = lambda **kw: ours(text="<|img|>", images=[image], max_image_size=490, **kw)["pixel_values"].shape[0]  # noqa: E731
    assert count(split_mode="original") == 7  # the whole image + (3, 2) crops
    assert count(split_mode="original", split_image=False) == 1
    assert count() == 1 and count(split_image=True) == 2  # transformers' split: two 490 tiles, no global view


@pytest.fixture(scope="module")
def chat_model(chat_dir):
    return Aria.from_pretrained(chat_dir[0], dtype="float32")


def test_chat_and_generate_feed_the_model_the_original_crops(chat_dir, chat_model, monkeypatch):
    from transformers import AutoTokenizer

    directory, model = chat_dir[0], chat_model
    seen = []
    plan = model._plan

    def spy(*args, **kwargs):
        seen.append(plan(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(model, "_plan", spy)
    image = photos()["coffee"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    reply = model.chat(messages, images=[image], max_new_tokens=4, max_image_size=490, split_mode="original")

    ref = original_vision_processor([image], 490, split_image=True)
    fed = seen[-1]
    assert fed["pixel_values"].shape[0] == int(ref["num_crops"][0]) == 7
    np.testing.assert_array_equal(fed["pixel_values"], ref["pixel_values"].numpy())
    np.testing.assert_array_equal(fed["pixel_mask"], ref["pixel_mask"].numpy())
    prompt = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = np.asarray(AutoTokenizer.from_pretrained(directory)(original_prompts([prompt], [7], 4))["input_ids"])
    np.testing.assert_array_equal(fed["input_ids"], ids)  # 7 crops x 4 tokens per image in this checkpoint
    assert (ids == model.processor.image_token_id).sum() == 28

    # the reply is the model's answer to exactly the original's arrays
    tokens = model.generate(ids, None, ref["pixel_values"].numpy(), ref["pixel_mask"].numpy(), max_new_tokens=4,
                            stop_strings=["<|im_end|>"])
    assert reply == model._reply_text(tokens[0])
    # generate(text=, images=, split_mode=) goes through the same processor
    out = model.generate(text=prompt, images=[image], max_image_size=490, split_mode="original", max_new_tokens=4,
                         stop_strings=["<|im_end|>"])
    np.testing.assert_array_equal(out, tokens)
    np.testing.assert_array_equal(seen[-1]["pixel_values"], ref["pixel_values"].numpy())


def test_processor_options_without_text_are_refused(chat_model):
    model = chat_model
    ids = np.array([[10, 11, 12]])
    with pytest.raises(ValueError, match=r"^split_mode: processor options, for generate\(text=\.\.\., images=\.\.\.\)"):
        model.generate(ids, split_mode="original")
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, text="hello")
