"""Gemma 3 port: logits equal transformers' (CPU, fp32) on a tiny random checkpoint -- text only,
one image, two images, a left-padded batch mixing them -- and the pieces that make them so
(sliding window, bidirectional image blocks) each matter. Soft-capping and remat: test_gemma3_variants.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gemma3_tiny import (
    CASES,
    IMG,
    WINDOW,
    assert_parity,
    hf_logits,
    hf_positions,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
)

from jdelta.models.gemma3 import Gemma3Config, image_blocks, text_positions


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma3_tiny"))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(ckpt, case):
    hf, model, _, _ = ckpt
    ids, mask, pv = make_batch(CASES[case])
    assert ids.shape[1] > 2 * WINDOW  # the local layers' window cuts every prompt
    ref = hf_logits(hf, ids, mask, pv)
    logits, hidden, out = jd_bucketed(model, ids, mask, pv)
    assert logits.shape == ref.shape and hidden.shape == (*ids.shape, 64)
    assert_parity(ref, logits, mask)
    # hidden states + lm_head_weight() reproduce the logits (the chunked-loss path)
    np.testing.assert_allclose(np.asarray(out.hidden_states @ model.lm_head_weight()), np.asarray(out.logits),
                               atol=1e-5)


def test_image_blocks_and_window_matter(ckpt):
    """Without the bidirectional image blocks, or with the window ignored, transformers' logits
    move far beyond the tolerance: the parity above tests both."""
    hf, model, config, _ = ckpt
    ids, mask, pv = make_batch(CASES["batch_left_padding"])
    logits, _, _ = jd_bucketed(model, ids, mask, pv)
    valid = mask.astype(bool)
    with torch.no_grad():
        causal_only = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pv),
                         position_ids=torch.tensor(hf_positions(mask))).logits.numpy()
    assert np.abs(causal_only[valid] - logits[valid]).max() > 1e-2
    wide = nnx.merge(*nnx.split(model))
    wide.config = config.replace(text=config.text.__class__(**{**config.text.__dict__, "sliding_window": 10_000}))
    wide_logits, _, _ = jd_bucketed(wide, ids, mask, pv)
    assert np.abs(wide_logits[valid] - logits[valid]).max() > 1e-2


def test_image_blocks_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    ids, mask, _ = make_batch(CASES["batch_left_padding"])
    ref = get_block_sequence_ids_for_mask(torch.tensor((ids == IMG).astype(np.int64))).numpy()
    np.testing.assert_array_equal(np.asarray(image_blocks(jnp.asarray(ids == IMG))), ref)
    pos, deltas = text_positions(mask)
    assert pos.shape == (3, *ids.shape) and (pos[0] == pos[2]).all()
    np.testing.assert_array_equal(pos[0], hf_positions(mask))
    np.testing.assert_array_equal(deltas, mask.sum(1) - ids.shape[1])


def test_config_roundtrip_and_errors(ckpt):
    hf, _, config, _ = ckpt
    assert config.text.rope_global.factor == 4.0 and config.text.is_sliding == (True, False, True, True)
    assert Gemma3Config.from_hf_dict(config.to_hf_dict()) == config
    from transformers import Gemma3Config as HFConfig

    again = HFConfig.from_dict(config.to_hf_dict())
    assert again.text_config.layer_types == list(config.text.layer_types)
    assert again.text_config.rope_parameters["full_attention"]["factor"] == 4.0
    # transformers-4 style rotary keys (the released checkpoints' config.json)
    d = config.to_hf_dict()
    t = d["text_config"]
    del t["rope_parameters"], t["layer_types"]
    t.update(rope_theta=1000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
             sliding_window_pattern=2)
    old = Gemma3Config.from_hf_dict(d)
    assert old.text.rope_global == config.text.rope_global and old.text.rope_local == config.text.rope_local
    assert old.text.is_sliding == (True, False, True, False)
    t["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        Gemma3Config.from_hf_dict(d)
    with pytest.raises(ValueError, match="model_type='qwen3_vl': expected 'gemma3'"):
        Gemma3Config.from_hf_dict({"model_type": "qwen3_vl"})


def test_call_checks_and_position_forms(ckpt):
    _, model, _, _ = ckpt
    ids, mask, pv = make_batch(CASES["one_image"])
    with pytest.raises(ValueError, match="input_ids hold 4 image tokens"):
        model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.zeros((0, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 16, 16\]"):
        model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.zeros((1, 3, 8, 8)))
    pos, _ = text_positions(mask)
    fwd = jax.jit(lambda m, p: m(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=p,
                                 pixel_values=jnp.asarray(pv)).logits)
    a = fwd(model, jnp.asarray(pos))
    b = fwd(model, jnp.asarray(pos[0]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

