"""Gemma 3 variants of the forward: final-logit soft-capping (against ``Gemma3ForCausalLM``) and
rematerialised decoder layers (same loss and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gemma3_tiny import (
    CASES,
    assert_parity,
    hf_positions,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
    tiny_hf_config,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma3_tiny"))


def test_final_softcap_matches_gemma3_for_causal_lm(tmp_path):
    """Final-logit soft-capping, text only, against ``Gemma3ForCausalLM`` (which applies it;
    transformers' ``Gemma3ForConditionalGeneration`` ignores it). ``attn_logit_softcapping`` is set
    too: transformers' Gemma 3 ignores it, and so does jdelta (kept in ``extra`` for the export)."""
    from transformers import Gemma3ForCausalLM

    hf, model, config, _ = tiny_checkpoint(tmp_path / "capped", attn_softcap=0.5, final_softcap=3.0)
    assert config.text.final_logit_softcapping == 3.0 and config.text.extra["attn_logit_softcapping"] == 0.5
    assert config.to_hf_dict()["text_config"]["attn_logit_softcapping"] == 0.5
    text_cfg = tiny_hf_config(attn_softcap=0.5, final_softcap=3.0).text_config
    text_cfg._attn_implementation = "eager"
    lm = Gemma3ForCausalLM(text_cfg).eval()
    sd = {k.replace("model.language_model.", "model."): v for k, v in hf.state_dict().items()
          if k.startswith("model.language_model.") or k == "lm_head.weight"}
    lm.load_state_dict(sd)
    ids, mask, _ = make_batch([[20], [13]])
    with torch.no_grad():
        ref = lm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(hf_positions(mask))).logits.numpy()
    assert np.abs(ref).max() < 3.0  # capped
    logits, _, _ = jd_bucketed(model, ids, mask)
    assert_parity(ref, logits, mask)
    # the uncapped model is far from it
    plain = nnx.merge(*nnx.split(model))
    plain.config = config.replace(text=config.text.__class__(**{**config.text.__dict__, "final_logit_softcapping": None}))
    assert np.abs(jd_bucketed(plain, ids, mask)[0] - logits)[mask.astype(bool)].max() > 1e-2


def test_remat_gives_the_same_loss_and_gradients(ckpt):
    """``remat_policy="full"`` recomputes decoder layers in the backward pass: same values."""
    _, model, config, _ = ckpt
    ids, mask, pv = make_batch(CASES["one_image"])

    def loss_and_grads(m):
        def loss(m):
            out = m(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pv))
            return jnp.mean(jax.nn.log_softmax(out.logits)[..., 7])
        return nnx.jit(nnx.value_and_grad(loss))(m)

    remat = nnx.merge(*nnx.split(model))
    remat.language_model.remat_policy = "full"
    (v0, g0), (v1, g1) = loss_and_grads(model), loss_and_grads(remat)
    assert abs(float(v0) - float(v1)) < 1e-6
    q0 = g0.language_model.layers[1].self_attn.q_proj.kernel.get_value()
    q1 = g1.language_model.layers[1].self_attn.q_proj.kernel.get_value()
    assert float(jnp.abs(q0).max()) > 0
    np.testing.assert_allclose(np.asarray(q1), np.asarray(q0), atol=1e-6)
