"""Qwen3-VL image preprocessing: parity with transformers' Qwen2VLImageProcessor (PIL backend)."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from jdelta.data.image_processor import (
    ImageConfig,
    ImageError,
    decode_image,
    pixelate,
    process_image,
    process_images,
    smart_resize,
)
from jdelta.data.records import PromptRecord
from jdelta.errors import UserError

MIN_PIXELS = 32 * 32 * 4
MAX_PIXELS = 32 * 32 * 256


def _hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )


def _random_image(h, w, mode, seed):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# (height, width, mode): odd sizes, tiny (upsampled to min_pixels), large (downsampled to max_pixels),
# extreme aspect ratios close to the 200:1 limit, and every colour mode the converter handles.
SIZES = [
    (224, 224, "RGB"),
    (37, 53, "RGB"),
    (1, 1, "RGB"),
    (3, 500, "RGB"),
    (600, 4, "RGB"),
    (1000, 7, "RGB"),
    (17, 3000, "RGB"),
    (999, 1001, "RGB"),
    (1234, 567, "L"),
    (100, 333, "RGBA"),
    (250, 90, "P"),
    (64, 2048, "RGB"),
]


@pytest.mark.parametrize("h,w,mode", SIZES)
def test_parity_with_transformers(h, w, mode):
    image = _random_image(h, w, mode, seed=h * 7919 + w)
    ref = _hf_processor()(images=[image], return_tensors="np")
    pv, grid = process_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert pv.dtype == np.float32
    assert pv.shape == ref["pixel_values"].shape
    assert tuple(grid) == tuple(int(v) for v in ref["image_grid_thw"][0])
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w", [(300, 500), (2000, 3000)])
def test_parity_at_qwen3_vl_default_pixel_limits(h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen3-VL's released preprocessor_config.json (min 65,536 px: small images are upsampled).
    hf = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )
    image = _random_image(h, w, "RGB", seed=h + w)
    ref = hf(images=[image], return_tensors="np")
    pv, grid = process_image(image)
    assert tuple(grid) == tuple(int(v) for v in ref["image_grid_thw"][0])
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)


def test_parity_on_uint8_array_and_bytes():
    rgba = np.random.default_rng(0).integers(0, 256, (70, 45, 4), dtype=np.uint8)
    ref = _hf_processor()(images=[rgba], return_tensors="np")
    pv, _ = process_image(rgba, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(pv, ref["pixel_values"], rtol=0, atol=1e-6)

    image = _random_image(81, 123, "RGB", 1)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    pv_bytes, grid = process_image(buf.getvalue(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pv_pil, _ = process_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(pv_bytes, pv_pil)


def test_process_images_concatenates_in_order():
    images = [_random_image(64, 96, "RGB", 2), _random_image(200, 50, "RGB", 3)]
    ref = _hf_processor()(images=images, return_tensors="np")
    cfg = ImageConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pv, grids = process_images(images, config=cfg)
    assert grids.dtype == np.int32 and grids.shape == (2, 3)
    np.testing.assert_array_equal(grids, ref["image_grid_thw"])
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6, rtol=0)
    assert cfg.num_patches(200, 50) == int(np.prod(grids[1]))


def test_smart_resize_properties():
    for h, w in [(10, 10), (33, 1000), (4000, 3000), (224, 448)]:
        nh, nw = smart_resize(h, w, 32, MIN_PIXELS, MAX_PIXELS)
        assert nh % 32 == 0 and nw % 32 == 0
        assert MIN_PIXELS <= nh * nw <= MAX_PIXELS


def test_errors_name_the_record():
    with pytest.raises(ImageError, match=r"record 'rec-7'.*undecodable"):
        process_image(b"\x89PNG not really", record="rec-7")
    with pytest.raises(ImageError, match=r"record 'rec-8'.*empty"):
        process_image(b"", record="rec-8")
    with pytest.raises(ImageError, match=r"record 'rec-9'.*aspect ratio"):
        process_image(_random_image(1, 300, "RGB", 0), record="rec-9")
    with pytest.raises(ImageError, match=r"record 'rec-10'.*too small"):
        process_image(_random_image(3, 30, "RGB", 0), record="rec-10", min_side=8)
    with pytest.raises(ImageError, match=r"record 'rec-11'.*uint8"):
        process_image(np.zeros((4, 4, 3), np.float32), record="rec-11")


def test_corrupt_image_file_message_names_the_path(tmp_path):
    """A record's image file that does not decode: one line naming the record and the file (PIL's
    own message named a ``<_io.BytesIO object at 0x...>``)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not an image")
    buf = io.BytesIO()
    _random_image(40, 40, "RGB", 1).save(buf, format="PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[:120])  # a half-written PNG
    rec = PromptRecord(id="c1", images=[str(broken), str(cut), buf.getvalue()[:120]], question="q")
    for i, path in ((0, broken), (1, cut)):
        with pytest.raises(ImageError) as e:
            decode_image(rec.image_bytes(i), record=rec.id, name=rec.image_name(i))
        msg = str(e.value)
        assert msg.startswith(f"record 'c1' image {i} ({path}): undecodable image ("), msg
        assert "BytesIO" not in msg and "\n" not in msg and isinstance(e.value, UserError)
    with pytest.raises(ImageError, match=r"^record 'c1' image 2: undecodable image \(") as e:
        decode_image(rec.image_bytes(2), record=rec.id, name=rec.image_name(2))
    assert "BytesIO" not in str(e.value)
    # a path handed straight to decode_image names itself
    with pytest.raises(ImageError, match=rf"^image {broken}: undecodable image"):
        decode_image(broken)


def test_pixelate_matches_definition():
    image = _random_image(97, 203, "RGB", 5)
    out = pixelate(image)
    assert out.size == image.size
    small_w, small_h = math.floor(203 * 0.1), math.floor(97 * 0.1)
    small = np.asarray(image.resize((small_w, small_h), Image.Resampling.BILINEAR))
    # Every output pixel is the nearest low-resolution pixel.
    rows = np.floor((np.arange(97) + 0.5) * small_h / 97).astype(int)
    cols = np.floor((np.arange(203) + 0.5) * small_w / 203).astype(int)
    np.testing.assert_array_equal(np.asarray(out), small[rows][:, cols])
    tiny = pixelate(_random_image(5, 8, "RGB", 6))
    assert (
        tiny.size == (8, 5)
        and len(set(np.asarray(tiny).reshape(-1, 3).tobytes()[i : i + 3] for i in range(0, 120, 3))) == 1
    )
