import jax.numpy as jnp
import numpy as np
import pytest

from jdelta.distill.rollout import (
    build_sequences,
    first_stop_lengths,
    flatten_vision,
    images_per_row,
    repeat_prompts,
    stack_vision,
)


def test_repeat_prompts_rollout_major():
    b = {"input_ids": np.array([[0, 5], [6, 7]]), "attention_mask": np.array([[0, 1], [1, 1]])}
    r = repeat_prompts(b, 3)
    assert r["input_ids"][:, 1].tolist() == [5, 5, 5, 7, 7, 7]
    assert r["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="leading dim"):
        repeat_prompts({"input_ids": np.zeros((2, 3)), "attention_mask": np.zeros((3, 3))}, 2)


def test_build_sequences_masks_and_errors():
    ids = np.array([[0, 3, 4], [5, 6, 7]])
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    comp = np.array([[9, 2, 8], [9, 9, 9]])
    lengths = first_stop_lengths(comp, [2])
    assert lengths.tolist() == [2, 3]
    s = build_sequences(ids, mask, comp, lengths, pad_id=0)
    assert s["input_ids"].tolist() == [[0, 3, 4, 9, 2, 0], [5, 6, 7, 9, 9, 9]]
    assert s["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert s["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="completion mask is empty"):
        build_sequences(ids, mask, comp, np.zeros(2, int))
    with pytest.raises(ValueError, match="left-padded"):
        build_sequences(np.array([[3, 0]]), np.array([[1, 0]]), comp[:1], [1])


def test_vision_stack_roundtrip():
    grid = np.array([[1, 2, 2], [1, 2, 2]])
    pv = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    spv, sgrid = stack_vision(pv, grid)
    assert spv.shape == (2, 4, 3) and sgrid.shape == (2, 1, 3)
    fpv, fgrid = flatten_vision(spv, sgrid)
    np.testing.assert_array_equal(fpv, pv)
    np.testing.assert_array_equal(fgrid, grid)
    # different image sizes, batch padding rows (zero grid row, extra pixel rows), two images in row 0
    grid = np.array([[1, 2, 2], [1, 2, 4], [1, 2, 2], [0, 0, 0]])
    pv = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    spv, sgrid = stack_vision(pv, grid, images_per_sample=[2, 1])
    assert spv.shape == (2, 12, 3) and sgrid.shape == (2, 2, 3)
    assert sgrid[1].tolist() == [[1, 2, 2], [0, 0, 0]]
    fpv, fgrid = flatten_vision(spv, sgrid)
    np.testing.assert_array_equal(fpv[:16], pv[:16])
    assert not fpv[16:].any()
    jpv, _ = flatten_vision(jnp.asarray(spv), jnp.asarray(sgrid))
    np.testing.assert_array_equal(np.asarray(jpv), fpv)
    ids = np.array([[0, 9, 9, 5, 9], [9, 9, 5, 5, 5]])
    assert images_per_row(ids, np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), 9).tolist() == [2, 1]
    with pytest.raises(ValueError, match="hold 4 images"):
        stack_vision(pv, grid, images_per_sample=[2, 2])
