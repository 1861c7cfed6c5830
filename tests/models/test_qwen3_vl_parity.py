"""Qwen3-VL port: parity with transformers (CPU, fp32 and bf16) on a tiny random checkpoint.

The HF model is built once per module, saved with ``save_pretrained`` and loaded with
jdelta; logits are compared at every real token (fp32: max abs diff <= 1e-4, logits O(1);
bf16: see :func:`test_bf16_logits_match_transformers_bf16`).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_vl_tiny import (
    CASES,
    IMG,
    HFConfig,
    assert_parity,
    hf_logits,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
)
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.models.qwen3_vl import Qwen3VLConfig, get_rope_index
from jdelta.models.qwen3_vl.weights import load_hf_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
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


def _hf_bf16_logits(hf16, ids, mask, pv, grid) -> np.ndarray:
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if pv is not None:
        kw.update(pixel_values=torch.tensor(pv, dtype=torch.bfloat16), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        return hf16(**kw).logits.float().numpy()


def test_bf16_logits_match_transformers_bf16(ckpt):
    """bf16 weights and bf16 compute on both sides (CPU), every case: 108 real positions.

    Tolerances, chosen from measurement (logits |x| <= ~3.7, so one bf16 ulp there is ~0.016):
    max |jdelta - transformers| measured 0.080, mean 0.008; bounds 0.15 (~9 ulps) and 0.03.
    Against the fp32 reference each side errs by 0.06-0.10 (within 11% of each other); jdelta's
    error must stay within 1.5x transformers' own bf16 error + 0.02. Top-1 agreement measured
    107/108 (the flip is a tie to 1 ulp: top-2 gap 0.008); required >= 0.95, and every flip at a
    near tie (transformers' top-2 gap < 0.1).

    What this does and does not prove: the bf16 path (bf16 loading, casts, vision tower,
    DeepStack, the head) computes transformers' function to bf16 noise. At this size it cannot
    resolve per-op precision choices: RMSNorm, RoPE or softmax done in bf16 instead of fp32 each
    still pass (tried); those matter only at real widths and lengths.
    """
    hf, _, _, path = ckpt
    half, config = load_hf_checkpoint(path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    hf16 = HFModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref, got, want = [], [], []
    for case in CASES.values():
        ids, mask, pv, grid = make_batch(case)
        valid = mask.astype(bool)
        ref.append(hf_logits(hf, ids, mask, pv, grid)[valid])
        want.append(_hf_bf16_logits(hf16, ids, mask, pv, grid)[valid])
        logits, _, out = jd_bucketed(half, ids, mask, pv, grid)
        assert out.logits.dtype == jnp.bfloat16
        got.append(np.asarray(logits, np.float32)[valid])
    ref, got, want = (np.concatenate(x) for x in (ref, got, want))
    diff = np.abs(got - want)
    err_jd, err_hf = np.abs(got - ref).max(), np.abs(want - ref).max()
    top1 = got.argmax(-1) == want.argmax(-1)
    top2 = -np.sort(-want, -1)[:, :2]
    margin = top2[:, 0] - top2[:, 1]  # transformers' own top-2 gap
    print(f"bf16: max|jd-hf|={diff.max():.3f} mean={diff.mean():.4f}  vs fp32: jd {err_jd:.3f} hf {err_hf:.3f}  "
          f"top-1 {top1.mean():.3f} ({top1.sum()}/{top1.size}), margins at flips {margin[~top1]}")
    assert np.abs(ref).max() > 2.0  # logits large enough for the bounds to mean something
    assert diff.max() <= 0.15 and diff.mean() <= 0.03, (diff.max(), diff.mean())
    assert err_jd <= 1.5 * err_hf + 0.02, (err_jd, err_hf)
    assert top1.mean() >= 0.95, top1.mean()
    assert (margin[~top1] < 0.1).all(), margin[~top1]  # flips only at near ties


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


def test_layer_hook_sees_every_layer_and_changes_the_output(ckpt):
    _, model, config, _ = ckpt
    ids, mask, pv, grid = make_batch(CASES["one_image"])
    pos, _ = get_rope_index(ids, grid, mask, config)
    seen = []

    def record(i, hidden, visual_mask, attention_mask):
        seen.append((i, hidden.shape, visual_mask.shape, attention_mask.shape))
        return hidden

    nnx.eval_shape(lambda m: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
                               pixel_values=jnp.asarray(pv), image_grid_thw=jnp.asarray(grid), layer_hook=record), model)
    assert [s[0] for s in seen] == list(range(config.text.num_hidden_layers))
    assert all(s[1] == (*ids.shape, 64) and s[2] == ids.shape and s[3] == ids.shape for s in seen)

    def zero_last(i, hidden, visual_mask, attention_mask):
        return hidden * 0.0 if i == config.text.num_hidden_layers - 1 else hidden

    out = nnx.jit(lambda m, ids, mask, pos: m(ids, attention_mask=mask, position_ids=pos, layer_hook=zero_last))(
        model, jnp.asarray(ids[:, :4]), jnp.asarray(mask[:, :4]), jnp.asarray(pos[:, :, :4]))
    np.testing.assert_array_equal(np.asarray(out.hidden_states), 0.0)
