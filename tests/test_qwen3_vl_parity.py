"""Qwen3-VL port: parity with transformers (CPU, fp32) on a tiny random checkpoint.

The HF model is built once per module, saved with ``save_pretrained`` and loaded with
jdelta; logits are compared at every real token (max abs diff <= 1e-4, logits O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_vl_tiny import (
    CASES,
    IMG,
    PAD,
    TOL,
    HFConfig,
    assert_parity,
    hf_logits,
    jd_bucketed,
    jd_forward,
    jitted_forward,
    make_batch,
    to_bucket,
    unbucket,
)

from jdelta.models.qwen3_vl import Qwen3VLConfig, get_rope_index


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from qwen3_vl_tiny import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("qwen3vl_tiny"))



@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpt, case):
    hf, model, _, _ = ckpt
    ids, mask, pv, grid = make_batch(CASES[case])
    ref = hf_logits(hf, ids, mask, pv, grid)
    logits, hidden, out = jd_bucketed(model, ids, mask, pv, grid)
    assert logits.shape == ref.shape and hidden.shape == (*ids.shape, 64)
    assert_parity(ref, logits, mask)
    # hidden states + lm_head_weight() reproduce the logits (the chunked-loss path)
    np.testing.assert_allclose(np.asarray(out.hidden_states @ model.lm_head_weight()), np.asarray(out.logits),
                               atol=1e-5)


def test_return_logits_false_and_eager_call(ckpt):
    _, model, _, _ = ckpt
    ids, mask, pv, grid = make_batch(CASES["one_image"])
    pos, _ = get_rope_index(ids, grid, mask, model.config)
    shapes = nnx.eval_shape(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                        position_ids=jnp.asarray(pos), pixel_values=jnp.asarray(pv),
                                        image_grid_thw=jnp.asarray(grid), return_logits=False), model)
    assert shapes.logits is None and shapes.hidden_states.shape == (*ids.shape, 64)
    with pytest.raises(ValueError, match="under jit compute them with get_rope_index"):
        nnx.eval_shape(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), model)
    cache = model.init_cache(1, 8).replace(index=jnp.int32(3))
    with pytest.raises(ValueError, match="only valid for a prefill"):
        model(jnp.asarray(ids[:, :1]), attention_mask=jnp.ones((1, 1), bool), cache=cache)
    with pytest.raises(ValueError, match="image tokens"):
        model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.zeros((3, *ids.shape), jnp.int32),
              pixel_values=jnp.asarray(pv), image_grid_thw=jnp.asarray([[1, 4, 4]]))


def test_rope_index_matches_transformers(ckpt):
    hf, _, config, _ = ckpt
    ids, mask, _, grid = make_batch(CASES["batch_left_padding"])
    pos, deltas = get_rope_index(ids, grid, mask, config)
    ref_pos, ref_deltas = hf.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
        image_grid_thw=torch.tensor(grid), attention_mask=torch.tensor(mask))
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], ref_pos.numpy()[:, valid])
    # jdelta's deltas are relative to the padded length: HF's minus the left padding
    np.testing.assert_array_equal(deltas, ref_deltas.numpy()[:, 0] - (mask == 0).sum(1))
    assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape)
    with pytest.raises(ValueError, match="more image-token runs than images"):
        get_rope_index(ids, grid[:1], mask, config)


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


def _greedy_with_cache(model, ids, mask, pv, grid, steps):
    """Prefill + greedy decode in a jax.lax.while_loop, as the sampler does."""
    b, s = ids.shape
    pos, _ = get_rope_index(ids, grid, mask, model.config)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, pos, pv, grid):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(b, s + steps)
        out = m(ids, attention_mask=mask, position_ids=pos, pixel_values=pv, image_grid_thw=grid, cache=cache)
        first = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
        toks = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)
        logits = jnp.zeros((b, steps, out.logits.shape[-1]), out.logits.dtype).at[:, 0].set(out.logits[:, -1])

        def body(carry):
            i, cache, toks, logits = carry
            p = jnp.broadcast_to((cache.index + out.rope_deltas)[None, :, None], (3, b, 1))
            o = m(jax.lax.dynamic_slice_in_dim(toks, i - 1, 1, axis=1), attention_mask=jnp.ones((b, 1), bool),
                  position_ids=p, cache=cache)
            nxt = jnp.argmax(o.logits[:, -1], -1).astype(jnp.int32)
            return i + 1, o.cache, toks.at[:, i].set(nxt), logits.at[:, i].set(o.logits[:, -1])

        _, cache, toks, logits = jax.lax.while_loop(lambda c: c[0] < steps, body,
                                                    (jnp.int32(1), out.cache, toks, logits))
        return toks, logits, cache, out.rope_deltas

    return run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(pv),
               jnp.asarray(grid, jnp.int32))


def test_kv_cache_decode_matches_full_forward_and_hf_generate(ckpt):
    hf, model, config, _ = ckpt
    steps = 5
    ids, mask, pv, grid = make_batch([[3, (1, 4, 6), 2, (1, 2, 2), 4], [6, (1, 6, 4), 3]], pad_to=40)
    toks, logits, cache, deltas = _greedy_with_cache(model, ids, mask, pv, grid, steps)
    toks, logits = np.asarray(toks), np.asarray(logits)
    s = ids.shape[1]
    assert int(cache.index) == s + steps - 1
    assert np.asarray(cache.valid).sum() == mask.sum() + 2 * (steps - 1)
    _, ref_deltas = get_rope_index(ids, grid, mask, config)
    np.testing.assert_array_equal(np.asarray(deltas), ref_deltas)

    # a full forward over prompt + generated tokens gives the same per-step logits
    full_ids = np.concatenate([ids, toks[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones((2, steps - 1), np.int64)], 1)
    full, _, _ = jd_bucketed(model, full_ids, full_mask, pv, grid)
    diff = np.abs(logits - full[:, s - 1:]).max()
    print(f"cache vs full forward: max|diff|={diff:.2e}")
    assert diff <= TOL
    assert_parity(hf_logits(hf, full_ids, full_mask, pv, grid)[:, s - 1:], logits, np.ones((2, steps)))

    # greedy tokens equal transformers' generate(do_sample=False)
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                          mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
                          max_new_tokens=steps, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    np.testing.assert_array_equal(toks, gen[:, s:].numpy())


def test_config_roundtrip(ckpt):
    _, _, config, _ = ckpt
    assert config.text.mrope_section == (2, 3, 3) and config.vision.deepstack_visual_indexes == (0, 1)
    assert Qwen3VLConfig.from_hf_dict(config.to_hf_dict()) == config
    hf_again = HFConfig.from_dict(config.to_hf_dict())
    assert hf_again.text_config.num_key_value_heads == 2 and hf_again.vision_config.depth == 2
    d = config.to_hf_dict()
    d["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen3VLConfig.from_hf_dict(d)


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
