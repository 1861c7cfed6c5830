"""Qwen3-VL vision tower under jit: padded patch/grid rows are ignored, different image sizes
in the same padded shapes share one compilation, block-local vision attention (CPU, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen3_vl_tiny import (
    CASES,
    assert_parity,
    hf_logits,
    jd_bucketed,
    jd_forward,
    jitted_forward,
    make_batch,
    tiny_checkpoint,
    to_bucket,
    unbucket,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen3vl_tiny"))


def test_padded_pixels_ignored_and_image_sizes_share_one_compile(ckpt):
    """Same bucketed shapes, different image sizes/counts: one compilation, HF parity, and
    the same logits as the unpadded inputs."""
    hf, model, _, _ = ckpt
    fwd = jitted_forward(nnx.graphdef(model))
    batches = [make_batch(rows) for rows in ([[3, (1, 4, 6), 4, (1, 6, 2), 5]],
                                             [[2, (1, 2, 8), 3, (1, 4, 4), 2, (1, 2, 2), 6], [4]])]
    bucketed = [jd_bucketed(model, *batch)[0] for batch in batches[:1]]
    compiled = fwd._cache_size()
    bucketed.append(jd_bucketed(model, *batches[1])[0])
    assert fwd._cache_size() == compiled, "a new image size in the same padded shapes recompiled"
    for (ids, mask, pv, grid), logits in zip(batches, bucketed, strict=True):
        assert_parity(hf_logits(hf, ids, mask, pv, grid), logits, mask)
    valid = batches[0][1].astype(bool)
    # without any padding (its own compile): same logits
    unpadded = np.asarray(jd_forward(model, *batches[0]).logits)
    np.testing.assert_allclose(bucketed[0][valid], unpadded[valid], atol=1e-5)
    # other contents in the padded patch rows: same logits (same compile)
    ids, mask, pv, grid = batches[1]
    ids_p, mask_p, pv_p, grid_p = to_bucket(ids, mask, pv, grid, rng_seed=7)
    pv_p[len(pv):] *= 100.0
    other = unbucket(jd_forward(model, ids_p, mask_p, pv_p, grid_p).logits, ids)
    np.testing.assert_allclose(other[mask.astype(bool)], bucketed[1][mask.astype(bool)], atol=1e-6)
    assert fwd._cache_size() == compiled + 1


def test_block_local_vision_attention_matches_transformers(ckpt):
    """vision_max_frame_patches: block-local vision attention (cost P*3L, not P^2), same logits."""
    hf, model, config, _ = ckpt
    local_cfg = config.replace(vision_max_frame_patches=24)  # the largest frame below: 4 x 6 patches
    local = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: type(model)(local_cfg, rngs=nnx.Rngs(0)))),
                      nnx.state(model))
    ids, mask, pv, grid = make_batch(CASES["batch_left_padding"])
    logits, _, _ = jd_bucketed(local, ids, mask, pv, grid)
    assert_parity(hf_logits(hf, ids, mask, pv, grid), logits, mask)
    too_small = nnx.merge(nnx.graphdef(nnx.eval_shape(
        lambda: type(model)(config.replace(vision_max_frame_patches=16), rngs=nnx.Rngs(0)))), nnx.state(model))
    with pytest.raises(ValueError, match="has 24 patches, more than max_frame_patches=16"):
        too_small.visual(jnp.asarray(pv), jnp.asarray(grid))
