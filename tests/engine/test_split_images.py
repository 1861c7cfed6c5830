"""Per-prompt images out of a collated batch (jdelta.models.family.split_images, the family's
``image_tokens`` hook), as the rollout engine takes them; and the one-line refusals of
ContinuousSampler."""

import numpy as np
import pytest

from jdelta.completions import ContinuousSampler, split_prompts
from jdelta.models.family import split_images
from jdelta.testing import tiny_config


def _row(n_text, *images, img):
    out = list(range(1, n_text + 1))
    for k in images:
        out += [img] * k
    return out


def _batch(rows, pad=0):
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad, np.int32)
    mask = np.zeros((len(rows), s), np.int32)
    for i, r in enumerate(rows):
        ids[i, s - len(r):], mask[i, s - len(r):] = r, 1
    return ids, mask


def test_qwen3_vl_rows_get_their_patch_rows():
    cfg = tiny_config()  # 2x2 merge: an image of grid (t, h, w) takes t*h*w/4 tokens
    img = cfg.image_token_id
    grids = np.array([[1, 2, 2], [1, 4, 2], [1, 2, 4], [0, 0, 0]], np.int32)  # 4, 8, 8 patch rows; a padding row
    pixels = np.arange(24 + 6, dtype=np.float32)[:, None] * np.ones((1, 5), np.float32)  # 6 padding rows
    ids, mask = _batch([_row(3, img=img), _row(2, 1, 2, img=img), _row(1, 2, img=img)])
    got = split_images(cfg, ids, mask, pixels, grids)
    assert got[0] is None
    np.testing.assert_array_equal(got[1]["image_grid_thw"], grids[:2])
    np.testing.assert_array_equal(got[1]["pixel_values"], pixels[:12])
    np.testing.assert_array_equal(got[2]["image_grid_thw"], grids[2:3])
    np.testing.assert_array_equal(got[2]["pixel_values"], pixels[12:20])
    prompts = split_prompts(cfg, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
                                  "image_grid_thw": grids})
    assert [p["input_ids"].tolist() for p in prompts] == [_row(3, img=img), _row(2, 1, 2, img=img),
                                                          _row(1, 2, img=img)]
    assert "pixel_values" not in prompts[0] and prompts[2]["pixel_values"].shape == (8, 5)


def test_gemma3_rows_get_their_whole_images():
    from jdelta.models.gemma3 import Gemma3Config

    cfg = Gemma3Config(mm_tokens_per_image=4, image_token_id=250)
    grids = np.array([[1, 1, 1]] * 3 + [[0, 0, 0]], np.int32)
    pixels = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
    ids, mask = _batch([_row(2, 4, 4, img=250), _row(4, img=250), _row(1, 4, img=250)])
    got = split_images(cfg, ids, mask, pixels, grids)
    np.testing.assert_array_equal(got[0]["pixel_values"], pixels[:2])
    assert got[1] is None
    np.testing.assert_array_equal(got[2]["pixel_values"], pixels[2:3])
    np.testing.assert_array_equal(got[2]["image_grid_thw"], [[1, 1, 1]])


def test_mismatched_images_are_refused_naming_the_records():
    cfg = tiny_config()
    img = cfg.image_token_id
    ids, mask = _batch([_row(2, 3, img=img)])  # 3 tokens: no image gives 3
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": np.zeros((32, 5), np.float32),
              "image_grid_thw": np.array([[1, 4, 4]], np.int32)}  # 16 patch rows: 4 tokens
    with pytest.raises(ValueError, match=r"records 'a': cannot give each prompt its images: prompt row 0 "
                                         r"holds 3 image tokens but the batch's next images \(grid rows 0..0\) give 4"):
        split_prompts(cfg, inputs, ["a"])
    inputs["image_grid_thw"] = np.array([[1, 4, 4], [1, 4, 4]], np.int32)
    ids, mask = _batch([_row(2, 4, img=img)])
    with pytest.raises(ValueError, match="the batch has 2 images but its prompts' image tokens account for 1"):
        split_images(cfg, ids, mask, inputs["pixel_values"], inputs["image_grid_thw"])


def test_continuous_sampler_refuses_a_mesh_in_one_line():
    with pytest.raises(ValueError, match=r"^engine=continuous runs on one device in one process; use engine=static "
                                         r"with a mesh or several processes$"):
        ContinuousSampler(object(), None, pad_id=0, slots=4, mesh=object())
