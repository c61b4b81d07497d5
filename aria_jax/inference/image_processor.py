"""Aria image preprocessing in numpy + Pillow (no torch).

Bit-identical to transformers' ``AriaImageProcessorPil`` (aria-spec.md §6): convert to RGB (transparency composited
on white), optionally split, then per crop a bicubic resize keeping the aspect ratio (long side to M, short side
floored at ``min_image_size``), zero padding bottom/right to M x M, a pixel mask, rescale by 1/255 (in float64, then
float32) and ``(x - mean) / std`` in float32.

``split_mode="hf"`` is transformers' split (llava-next ``select_best_resolution``, aspect-keeping resize, centre
padding, tiles of M that can be smaller at the edges, no global view). ``split_mode="original"`` is the original
Aria training-time split (``aria/model/vision_processor.py``): the ratio with the closest aspect ratio, a
non-aspect-preserving resize to M * ratio, crops of exactly M, and the full image prepended as crop 0 when there is
more than one crop. For RGB images its arrays are bit-identical to the original ``AriaVisionProcessor`` (held against
a copy of its code in tests/inference/test_original_split.py); images are made RGB first, as the original's training
code did (``Image.open(path).convert("RGB")``), with transformers' rule for transparency (composited on white).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from aria_jax.errors import ImageError, InputError, one_line
from aria_jax.inference.processor_options import ProcessorOptionError, check_min_image_size, check_split_mode

DEFAULT_SPLIT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2),
    (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1),
)  # fmt: skip
VALID_MAX_SIZES = (490, 980)

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file the way transformers' ``load_image`` does (EXIF transpose, then ``convert("RGB")``).

    Every failure (missing, empty, truncated or corrupt file, not an image, more than twice the pixels of Pillow's
    decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``) raises ``ImageError`` naming the file.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except _IMAGE_FAILURES as e:
        raise ImageError(f"{name}: cannot read image ({_reason(e)})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image ``load_image`` would return (EXIF rotation applied), without decoding pixels
    where the format allows (PNG keeps its EXIF after the pixels, so Pillow decodes those).

    Fails (``ImageError``) on what that shows: no such file, not an image, a decompression bomb, and for formats
    whose chunks carry checksums (PNG) a truncated or corrupt file (``Image.verify``).
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as image:
            image.verify()
        with Image.open(name) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)  # ExifTags.Base.Orientation; 5..8 swap the axes
    except _IMAGE_FAILURES as e:
        raise ImageError(f"{name}: cannot read image ({_reason(e)})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# Pillow signals a bad file with many types (struct.error and zlib.error from some decoders, EOFError, ...) and a
# decompression bomb with DecompressionBombError (over 2x MAX_IMAGE_PIXELS; between 1x and 2x it only warns, as in
# transformers).
_IMAGE_FAILURES = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
                   zlib.error, MemoryError, Image.DecompressionBombError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels, over twice Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8, as transformers' ``convert_to_rgb`` (alpha composited on white)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (H, W[, C]) arrays, got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy images must be (H, W) or (H, W, C) with C in 1, 3, 4; got {image.shape}")
        if image.shape[-1] == 1:
            return np.repeat(image, 3, axis=-1)
        if image.shape[-1] == 4:
            alpha = image[..., 3:4] / 255
            composite = alpha * image[..., :3] + (1 - alpha) * 255
            return np.round(composite).astype(np.uint8)
        return np.ascontiguousarray(image)
    raise TypeError(f"unsupported image type {type(image).__name__}; expected a PIL image, numpy array or path")


def _resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """PIL resize of an (H, W, 3) uint8 array, as transformers' ``image_transforms.resize``."""
    return np.array(Image.fromarray(array).resize((width, height), resample=resample))


def select_best_resolution(original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]) -> tuple:
    """llava-next rule: maximise the effective resolution, then minimise waste. Sizes are (height, width)."""
    original_height, original_width = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    return best_fit


def _patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    target_height, target_width = target
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def split_hf(
    array: np.ndarray, split_resolutions: Sequence[Sequence[int]], patch_size: int, resample: int
) -> list[np.ndarray]:
    """transformers' ``get_image_patches``: best resolution, aspect-keeping resize, centre pad, tiles of M."""
    height, width = array.shape[:2]
    best = select_best_resolution((height, width), split_resolutions)
    new_height, new_width = _patch_output_size(height, width, best)
    resized = _resize(array, new_height, new_width, resample)
    pad_x, r_x = divmod(best[1] - new_width, 2)
    pad_y, r_y = divmod(best[0] - new_height, 2)
    padded = np.pad(resized, ((pad_y, pad_y + r_y), (pad_x, pad_x + r_x), (0, 0)), mode="constant", constant_values=0)
    return [
        padded[i : i + patch_size, j : j + patch_size]
        for i in range(0, padded.shape[0], patch_size)
        for j in range(0, padded.shape[1], patch_size)
    ]


def select_best_ratio_original(
    width: int, height: int, ratios: Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """Original Aria ``_select_best_resolution``: closest aspect ratio; ``ratios`` are (width, height) pairs.

    On an exact tie, a later ratio wins when the image area exceeds half the ratio's area in patches.
    """
    aspect_ratio = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio_w, ratio_h in ratios:
        diff = abs(aspect_ratio - ratio_w / ratio_h)
        if diff < best_diff:
            best_diff = diff
            best = (ratio_w, ratio_h)
        elif diff == best_diff and area > 0.5 * patch_size * patch_size * ratio_w * ratio_h:
            best = (ratio_w, ratio_h)
    return best


def split_original(
    array: np.ndarray, ratios: Sequence[Sequence[int]], patch_size: int, resample: int
) -> list[np.ndarray]:
    """Original Aria ``_split_image``: resize to (M*rw, M*rh) ignoring aspect, crops of M, full image first."""
    height, width = array.shape[:2]
    ratio_w, ratio_h = select_best_ratio_original(width, height, ratios, patch_size)
    resized = _resize(array, patch_size * ratio_h, patch_size * ratio_w, resample)
    crops = [
        resized[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
        for r in range(ratio_h)
        for c in range(ratio_w)
    ]
    if len(crops) != 1:
        crops.insert(0, array)
    return crops


def _check_config(values: dict[str, Any]) -> None:
    """``preprocessor_config.json`` values of the right types and ranges; else ``InputError`` naming the key."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    size = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 20  # noqa: E731
    checks = {
        "max_image_size": size,
        "min_image_size": size,
        "image_mean": lambda v: isinstance(v, list) and len(v) == 3 and all(map(number, v)),
        "image_std": lambda v: isinstance(v, list) and len(v) == 3 and all(number(x) and x != 0 for x in v),
        "rescale_factor": number,
        "split_resolutions": lambda v: isinstance(v, list) and all(
            isinstance(p, list) and len(p) == 2 and all(map(size, p)) for p in v),
        "split_image": lambda v: isinstance(v, bool),
        "resample": lambda v: v in (0, 1, 2, 3, 4, 5) and not isinstance(v, bool),
        "do_rescale": lambda v: isinstance(v, bool),
        "do_normalize": lambda v: isinstance(v, bool),
    }
    for key, value in values.items():
        if not checks[key](value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InputError(f"'{key}' has an unusable value {shown}")


class AriaImageProcessor:
    """numpy/Pillow port of transformers' ``AriaImageProcessorPil`` (plus the original Aria split).

    ``split_resolutions`` are (height, width) pixel pairs as in transformers (default: the 19 ratios x 490).
    For ``split_mode="original"`` the same list divided by 490 is read as (width, height) ratios, as the original
    code did with its ``split_ratio`` list (the default list is symmetric, so the set of ratios is the same).
    """

    def __init__(
        self,
        max_image_size: int = 980,
        min_image_size: int = 336,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        split_resolutions: Sequence[Sequence[int]] | None = None,
        split_image: bool = False,
        resample: int = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        do_normalize: bool = True,
    ) -> None:
        self.max_image_size = int(max_image_size)
        self.min_image_size = int(min_image_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.rescale_factor = float(rescale_factor)
        if split_resolutions is None:
            split_resolutions = [[h * 490, w * 490] for h, w in DEFAULT_SPLIT_RATIOS]
        self.split_resolutions = [[int(h), int(w)] for h, w in split_resolutions]
        self.split_image = bool(split_image)
        self.resample = int(resample)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AriaImageProcessor:
        """Build from a ``preprocessor_config.json`` dict (HF keys; unknown keys are ignored)."""
        keys = (
            "max_image_size", "min_image_size", "image_mean", "image_std", "rescale_factor",
            "split_resolutions", "split_image", "resample", "do_rescale", "do_normalize",
        )  # fmt: skip
        values = {k: config[k] for k in keys if config.get(k) is not None}
        _check_config(values)
        return cls(**values)

    def crops(
        self, image: ImageLike, max_image_size: int, split_image: bool, split_mode: str = "hf",
        split_resolutions: Sequence[Sequence[int]] | None = None,
    ) -> list[np.ndarray]:
        """The (H, W, 3) uint8 crops of one image, before the per-crop resize (``split_resolutions`` overrides the
        processor's own list for this call)."""
        array = to_rgb_array(image)
        if not split_image:
            return [array]
        resolutions = self.split_resolutions if split_resolutions is None else split_resolutions
        if split_mode == "hf":
            return split_hf(array, resolutions, max_image_size, self.resample)
        ratios = [(h // 490, w // 490) for h, w in resolutions]
        return split_original(array, ratios, max_image_size, self.resample)

    def count_crops(
        self, width: int, height: int, max_image_size: int, split_image: bool, split_mode: str = "hf",
        split_resolutions: Sequence[Sequence[int]] | None = None,
    ) -> int:
        """``len(self.crops(image, ...))`` for a ``width`` x ``height`` image, without its pixels."""
        if not split_image:
            return 1
        resolutions = self.split_resolutions if split_resolutions is None else split_resolutions
        if split_mode == "hf":
            best_h, best_w = select_best_resolution((height, width), resolutions)
            return math.ceil(best_h / max_image_size) * math.ceil(best_w / max_image_size)
        ratios = [(h // 490, w // 490) for h, w in resolutions]
        ratio_w, ratio_h = select_best_ratio_original(width, height, ratios, max_image_size)
        n = ratio_w * ratio_h
        return n + 1 if n != 1 else 1

    def process_crop(
        self, crop: np.ndarray, max_image_size: int, min_image_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Resize (aspect kept, short side >= min), pad to M x M, mask, rescale, normalise -> (3,M,M), (M,M)."""
        m = max_image_size
        floor = self.min_image_size if min_image_size is None else min_image_size
        h, w = crop.shape[:2]
        scale = m / max(h, w)
        if w >= h:
            new_h, new_w = max(int(h * scale), floor), m
        else:
            new_h, new_w = m, max(int(w * scale), floor)
        resized = _resize(crop, new_h, new_w, self.resample)
        chw = np.moveaxis(resized, -1, 0)
        padded = np.pad(chw, ((0, 0), (0, m - new_h), (0, m - new_w)), mode="constant", constant_values=0)
        mask = np.zeros((m, m), dtype=bool)
        mask[:new_h, :new_w] = True
        values = padded
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(values.dtype, np.floating):
                values = values.astype(np.float32)
            mean = np.array(self.image_mean, dtype=values.dtype)[:, None, None]
            std = np.array(self.image_std, dtype=values.dtype)[:, None, None]
            values = (values - mean) / std
        return values, mask

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        max_image_size: int | None = None,
        split_image: bool | None = None,
        split_mode: str = "hf",
        min_image_size: int | None = None,
        split_resolutions: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Any]:
        """Preprocess images -> dict(pixel_values (N,3,M,M) float32, pixel_mask (N,M,M) bool, num_crops, crops).

        ``num_crops`` is transformers' value (the maximum over the images); ``crops`` lists each image's own count.
        ``split_mode="original"`` splits unless ``split_image=False`` says otherwise (a mode that only chooses the
        crops would otherwise be silently off); ``min_image_size`` and ``split_resolutions`` override the
        processor's values for this call, as transformers' keyword arguments of the same names do.
        """
        m = self.max_image_size if max_image_size is None else max_image_size
        if isinstance(m, bool) or m not in VALID_MAX_SIZES:
            raise ProcessorOptionError(f"max_image_size must be 490 or 980, got {m!r}")
        m = int(m)
        split_mode = check_split_mode(split_mode)
        floor = check_min_image_size(min_image_size, m)
        if split_image is None:
            split = self.split_image or split_mode == "original"
        else:
            split = bool(split_image)
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        values, masks, counts = [], [], []
        for image in images:
            crops = self.crops(image, m, split, split_mode, split_resolutions)
            counts.append(len(crops))
            for crop in crops:
                v, k = self.process_crop(crop, m, floor)
                values.append(v)
                masks.append(k)
        return {
            "pixel_values": np.stack(values, axis=0),
            "pixel_mask": np.stack(masks, axis=0),
            "num_crops": max(counts),
            "crops": counts,
        }


__all__ = ["AriaImageProcessor", "image_size", "load_image", "select_best_resolution", "to_rgb_array"]
