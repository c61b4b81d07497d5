"""aria_jax.inference.image_processor against transformers' AriaImageProcessorPil, run in the same test (bit-identical)."""

import io
import warnings

import numpy as np
import pytest
from conftest import time_limit
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from aria_jax.errors import ImageError
from aria_jax.inference.image_processor import AriaImageProcessor, image_size, load_image

skimage_data = pytest.importorskip("skimage.data")
AriaImageProcessorPil = pytest.importorskip("transformers.models.aria.image_processing_pil_aria").AriaImageProcessorPil


def photos():
    """Real photographs bundled in the scikit-image wheel (no download)."""
    return {
        "astronaut": Image.fromarray(skimage_data.astronaut()),
        "coffee": Image.fromarray(skimage_data.coffee()),
        "chelsea": Image.fromarray(skimage_data.chelsea()),
        "camera_L": Image.fromarray(skimage_data.camera()),
        "rocket": Image.fromarray(skimage_data.rocket()),
    }


def synthetic():
    """Edge cases: modes and sizes."""
    rng = np.random.RandomState(0)
    rgb = lambda h, w: Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.randint(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA")
    la = Image.fromarray(rng.randint(0, 256, (40, 30, 2), dtype=np.uint8), "LA")
    p = rgb(31, 47).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 3
    i16 = Image.fromarray((rng.randint(0, 65536, (29, 41))).astype(np.uint16))
    cmyk = rgb(23, 19).convert("CMYK")
    return {
        "1x1": rgb(1, 1),
        "5x300": rgb(5, 300),
        "300x5": rgb(300, 5),
        "1x2000": rgb(1, 2000),
        "tall_3000x7": rgb(3000, 7),
        "huge_2500x3100": rgb(2500, 3100),
        "exact_980": rgb(980, 980),
        "exact_490x980": rgb(490, 980),
        "rgba": rgba,
        "la": la,
        "p": p,
        "p_transparent": p_transparent,
        "i16": i16,
        "cmyk": cmyk,
        "bilevel_1": rgb(17, 33).convert("1"),
    }


def assert_same(images, max_image_size, split_image):
    ref = AriaImageProcessorPil()(images, max_image_size=max_image_size, split_image=split_image, return_tensors="np")
    out = AriaImageProcessor()(images, max_image_size=max_image_size, split_image=split_image)
    assert out["pixel_values"].dtype == np.float32 and out["pixel_mask"].dtype == bool
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(out["pixel_mask"], ref["pixel_mask"])
    assert out["num_crops"] == int(ref["num_crops"])
    return out


@pytest.mark.parametrize("split_image", [False, True])
@pytest.mark.parametrize("max_image_size", [490, 980])
def test_photos_bit_identical(max_image_size, split_image):
    out = assert_same(list(photos().values()), max_image_size, split_image)
    assert out["pixel_values"].shape[1:] == (3, max_image_size, max_image_size)


@pytest.mark.parametrize("split_image", [False, True])
@pytest.mark.parametrize("max_image_size", [490, 980])
def test_synthetic_edge_cases_bit_identical(max_image_size, split_image):
    for name, image in synthetic().items():
        try:
            assert_same([image], max_image_size, split_image)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def test_numpy_inputs_match_transformers():
    rng = np.random.RandomState(1)
    for arr in (rng.randint(0, 256, (45, 67, 3), dtype=np.uint8), rng.randint(0, 256, (45, 67, 4), dtype=np.uint8)):
        ref = AriaImageProcessorPil()([arr], max_image_size=490, return_tensors="np")
        out = AriaImageProcessor()([arr], max_image_size=490)
        np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
        np.testing.assert_array_equal(out["pixel_mask"], ref["pixel_mask"])


def test_spec_example_800x600():
    out = AriaImageProcessor()([Image.new("RGB", (800, 600), (10, 20, 30))], max_image_size=980)
    mask = out["pixel_mask"][0]
    assert mask.sum(0).max() == 735 and mask.sum(1).max() == 980
    assert (out["pixel_values"][0][:, 735:, :] == -1.0).all()


def test_config_overrides_match_transformers():
    kw = {"min_image_size": 100, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    image = photos()["rocket"]
    ref = AriaImageProcessorPil(**kw)([image], max_image_size=490, return_tensors="np")
    out = AriaImageProcessor.from_dict(kw)([image], max_image_size=490)
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(out["pixel_mask"], ref["pixel_mask"])


@pytest.mark.parametrize("bad", [0, 224, 491, 1960, "980", True])
def test_invalid_max_image_size(bad):
    with pytest.raises(ValueError, match=str(bad) if isinstance(bad, int) else "max_image_size"):
        AriaImageProcessor()([Image.new("RGB", (8, 8))], max_image_size=bad)


def test_file_loading_matches_transformers_and_errors_name_the_file(tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    good = tmp_path / "good.png"
    photos()["chelsea"].save(good)
    np.testing.assert_array_equal(np.array(load_image(good)), np.array(hf_load_image(str(good))))
    out = AriaImageProcessor()([str(good)], max_image_size=490)
    ref = AriaImageProcessorPil()([hf_load_image(str(good))], max_image_size=490, return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="garbage.jpg"):
        AriaImageProcessor()([str(garbage)])
    buf = io.BytesIO()
    photos()["coffee"].save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ValueError, match="truncated.jpg"):
        AriaImageProcessor()([truncated])
    with pytest.raises(ValueError, match="missing.png"):
        AriaImageProcessor()([tmp_path / "missing.png"])


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 160000 > 2 * 10000 pixels -> error
    for read in (load_image, image_size):
        with pytest.raises(ImageError, match=rf"^{path}: cannot read image \(too many pixels, over twice Pillow's"):
            read(path)
    assert Image.MAX_IMAGE_PIXELS == 100 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # between 1x and 2x: a warning, as Pillow does
        load_image(path)


def test_a_real_decompression_bomb_is_one_error(tmp_path):
    """A 30000 x 30000 1-bit PNG (110 kB on disk, 900 M pixels): refused from its header, before any decoding.
    Before: PIL.Image.DecompressionBombError escaped as a traceback."""
    path = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(path)
    for read in (load_image, image_size):
        with time_limit(5), pytest.raises(ImageError, match="decompression bomb"):
            read(path)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()[:48, :64]).save(buf, format=fmt)
    return buf.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}


def _check_image_bytes(tmp_path_factory, data: bytes) -> None:
    """Either a picture, or ImageError naming the file; nothing else, and never a hang."""
    path = tmp_path_factory.getbasetemp() / "fuzz.img"
    path.write_bytes(data)
    for read in (load_image, image_size):
        with time_limit(10):
            try:
                read(path)
            except ImageError as e:
                assert str(e).startswith(f"{path}: cannot read image (") and "\n" not in str(e)


@given(st.binary(max_size=300))
def test_random_bytes_are_an_image_or_an_image_error(tmp_path_factory, data):
    _check_image_bytes(tmp_path_factory, data)


@given(st.sampled_from(sorted(ENCODED)), st.data())
def test_mutated_image_files_are_an_image_or_an_image_error(tmp_path_factory, fmt, data):
    raw = bytearray(ENCODED[fmt])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(raw) - 1))
        kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "insert"]))
        if kind == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte":
            raw[at] = data.draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif kind == "truncate":
            del raw[max(at, 1):]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    _check_image_bytes(tmp_path_factory, bytes(raw))


# ---------------------------------------------------------------- original (training-time) split
def reference_original_split(image, m, min_size=336):
    """Independent re-implementation of aria-spec §6 / the original ``_split_image`` + per-crop pipeline."""
    img = image.convert("RGB")
    ratios = [(1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2), (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1)]
    w, h = img.size
    best, best_diff = (1, 1), float("inf")
    for rw, rh in ratios:  # (width, height) ratios, closest aspect ratio; ties go later if the image is big enough
        diff = abs(w / h - rw / rh)
        if diff < best_diff:
            best, best_diff = (rw, rh), diff
        elif diff == best_diff and w * h > 0.5 * m * m * rw * rh:
            best = (rw, rh)
    rw, rh = best
    big = img.resize((m * rw, m * rh), Image.Resampling.BICUBIC)
    crops = [big.crop((c * m, r * m, (c + 1) * m, (r + 1) * m)) for r in range(rh) for c in range(rw)]
    if len(crops) > 1:
        crops = [img] + crops
    values, masks = [], []
    for crop in crops:
        cw, ch = crop.size
        scale = m / max(cw, ch)
        size = (m, max(int(ch * scale), min_size)) if cw >= ch else (max(int(cw * scale), min_size), m)
        canvas = Image.new("RGB", (m, m), (0, 0, 0))
        canvas.paste(crop.resize(size, Image.Resampling.BICUBIC), (0, 0))
        x = np.asarray(canvas).astype(np.float32) / np.float32(255)
        values.append(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))
        mask = np.zeros((m, m), bool)
        mask[: size[1], : size[0]] = True
        masks.append(mask)
    return np.stack(values), np.stack(masks), best


@pytest.mark.parametrize("max_image_size", [490, 980])
def test_original_split_matches_independent_reference(max_image_size):
    images = dict(photos(), wide=synthetic()["5x300"], tall=synthetic()["300x5"], square=synthetic()["exact_980"])
    if max_image_size == 980:  # keep the test fast: a photograph and the extreme aspect ratios
        images = {k: images[k] for k in ("rocket", "wide", "tall")}
    for name, image in images.items():
        values, masks, (rw, rh) = reference_original_split(image, max_image_size)
        out = AriaImageProcessor()([image], max_image_size=max_image_size, split_image=True, split_mode="original")
        assert out["crops"] == [rw * rh + 1], name  # the default ratios have no (1, 1): always a global view
        np.testing.assert_array_equal(out["pixel_values"], values, err_msg=name)
        np.testing.assert_array_equal(out["pixel_mask"], masks, err_msg=name)
        # crop 0 is the global view: the unsplit image through the ordinary pipeline
        unsplit = AriaImageProcessor()([image], max_image_size=max_image_size)
        np.testing.assert_array_equal(out["pixel_values"][0], unsplit["pixel_values"][0], err_msg=name)
        # every other crop is exactly M x M of content: fully valid mask
        assert out["pixel_mask"][1:].all(), name


def test_original_split_ratio_choice_and_counts():
    proc = AriaImageProcessor()
    # 2:1 landscape -> (w, h) ratio (2, 1): 2 crops + global; square -> (2, 2): 4 crops + global
    assert proc([Image.new("RGB", (200, 100))], 490, True, "original")["crops"] == [3]
    assert proc([Image.new("RGB", (100, 100))], 490, True, "original")["crops"] == [5]
    # tie between (1, 2) and (2, 4): a big enough image takes the later (2, 4) -> 8 crops + global
    assert proc([Image.new("RGB", (100, 200))], 490, True, "original")["crops"] == [3]
    assert proc([Image.new("RGB", (1000, 2000))], 490, True, "original")["crops"] == [9]
    # no split: one crop, and transformers' num_crops is the maximum over the images
    out = proc([Image.new("RGB", (200, 100)), Image.new("RGB", (100, 100))], 490, True, "original")
    assert out["crops"] == [3, 5] and out["num_crops"] == 5 and out["pixel_values"].shape[0] == 8
    with pytest.raises(ValueError, match="split_mode"):
        proc([Image.new("RGB", (8, 8))], 490, True, "llava")
