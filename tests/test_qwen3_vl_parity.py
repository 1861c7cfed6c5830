"""Qwen3-VL port: parity with transformers (CPU, fp32) on a tiny random checkpoint.

The HF model is built once per module (2 text layers, 2 vision layers with DeepStack at
[0, 1], interleaved M-RoPE, GQA), saved with ``save_pretrained`` and loaded with jdelta.
Random weights are drawn at std 0.1 (HF's default 0.02 gives near-zero logits, which would
make a 1e-4 tolerance meaningless); the logits' scale is asserted to be O(1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3VLConfig as HFConfig
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.models.qwen3_vl import Qwen3VLConfig, get_rope_index
from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

IMG, VSTART, VEND, PAD = 250, 252, 253, 0
PATCH_DIM = 3 * 2 * 16 * 16
TOL = 1e-4


def tiny_hf_config(tie=True):
    return HFConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMG, video_token_id=251, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


def randomize(hf):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(HFModel(tiny_hf_config()).eval())
    path = tmp_path_factory.mktemp("qwen3vl_tiny")
    hf.save_pretrained(path)
    model, config = load_hf_checkpoint(path)
    return hf, model, config, path


def image_tokens(grid):
    t, h, w = grid
    return [VSTART] + [IMG] * (t * h * w // 4) + [VEND]


def make_batch(rows, pad_to=None, seed=0):
    """rows: list of lists of segments (int count of text tokens, or a (t,h,w) image grid).
    Returns left-padded numpy inputs in HF format."""
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for row in rows:
        seq = []
        for seg in row:
            if isinstance(seg, tuple):
                seq += image_tokens(seg)
                grids.append(seg)
            else:
                seq += list(rng.integers(1, 240, seg))
        seqs.append(seq)
    s = pad_to or max(len(q) for q in seqs)
    ids = np.full((len(seqs), s), PAD, np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, q in enumerate(seqs):
        ids[i, s - len(q):] = q
        mask[i, s - len(q):] = 1
    grid = np.array(grids, np.int64).reshape(-1, 3) if grids else None
    pv = rng.normal(size=(int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32) if grids else None
    return ids, mask, pv, grid


# One static shape for every test input, so a test file compiles the model a handful of
# times (XLA:CPU compiles are seconds each) -- and padding is exercised everywhere.
BUCKET = dict(batch=3, seq=48, patches=128, images=4)


def to_bucket(ids, mask, pv, grid, rng_seed=1):
    """Pad a batch to BUCKET: extra all-padding rows, more left padding, random extra patch
    rows and (0,0,0) grid rows."""
    b, s = ids.shape
    nb, ns = BUCKET["batch"], BUCKET["seq"]
    assert b <= nb and s <= ns
    ids_p = np.full((nb, ns), PAD, np.int64)
    mask_p = np.zeros((nb, ns), np.int64)
    ids_p[:b, ns - s:], mask_p[:b, ns - s:] = ids, mask
    if pv is None:
        return ids_p, mask_p, None, None
    rng = np.random.default_rng(rng_seed)
    pv_p = np.concatenate([pv, rng.normal(size=(BUCKET["patches"] - len(pv), PATCH_DIM))]).astype(np.float32)
    grid_p = np.concatenate([grid, np.zeros((BUCKET["images"] - len(grid), 3), np.int64)])
    return ids_p, mask_p, pv_p, grid_p


def unbucket(x, ids):
    """The rows/columns of a bucketed ``[B, S, ...]`` output that correspond to ``ids``."""
    b, s = ids.shape
    return np.asarray(x)[:b, BUCKET["seq"] - s:]


def hf_logits(hf, ids, mask, pv=None, grid=None):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        return hf(**kw).logits.numpy()


@functools.cache
def _jitted(graphdef):
    @jax.jit
    def fwd(state, ids, mask, pos, pv, grid):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, position_ids=pos, pixel_values=pv,
                                          image_grid_thw=grid)
    return fwd


def jd_forward(model, ids, mask, pv=None, grid=None):
    """Jitted forward on host-computed positions (eager dispatch is slow on CPU)."""
    graphdef, state = nnx.split(model)
    pos, _ = get_rope_index(ids, grid, mask, model.config)
    return _jitted(graphdef)(
        state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos),
        None if pv is None else jnp.asarray(pv), None if grid is None else jnp.asarray(grid, jnp.int32))


def jd_bucketed(model, ids, mask, pv=None, grid=None):
    """Forward on the BUCKET-padded batch; logits and hidden states cut back to ``ids``' shape."""
    out = jd_forward(model, *to_bucket(ids, mask, pv, grid))
    return unbucket(out.logits, ids), unbucket(out.hidden_states, ids), out


def assert_parity(ref, got, mask, tol=TOL):
    valid = mask.astype(bool)
    ref, got = ref[valid], np.asarray(got)[valid]
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    print(f"max|diff|={diff:.2e}  logits max|x|={scale:.2f} std={ref.std():.2f}")
    assert scale > 0.5, "logits too small for the tolerance to mean anything"
    assert diff <= tol, f"max abs diff {diff} > {tol} (logits scale {scale})"
    return diff


CASES = {
    "text_only": [[17]],
    "one_image": [[5, (1, 4, 6), 7]],
    "two_images_different_sizes": [[3, (1, 4, 6), 4, (1, 6, 2), 5]],
    "batch_left_padding": [[3, (1, 4, 6), 2, (1, 2, 2), 4], [6, (1, 6, 4), 3], [9]],
}


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
    fwd = _jitted(nnx.graphdef(model))
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
