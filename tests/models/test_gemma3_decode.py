"""Gemma 3 KV cache: prefill + greedy decode in a lax.while_loop equals a full forward and
transformers' generate, with more decode steps than the sliding window (CPU, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gemma3_tiny import (
    IMG,
    PAD,
    TOL,
    WINDOW,
    assert_parity,
    hf_logits,
    jd_bucketed,
    make_batch,
    tiny_checkpoint,
)

from jdelta.models.gemma3 import text_positions

STEPS = WINDOW + 4  # late steps see only generated tokens through the local layers' window


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma3_tiny"))


def _greedy_with_cache(model, ids, mask, pv, steps):
    """Prefill + greedy decode in a jax.lax.while_loop; decode positions ``index + rope_deltas``
    on three equal axes, as jdelta's sampler passes them."""
    b, s = ids.shape
    pos, _ = text_positions(mask)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, pos, pv):
        m = nnx.merge(graphdef, state)
        out = m(ids, attention_mask=mask, position_ids=pos, pixel_values=pv, cache=m.init_cache(b, s + steps))
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

    return run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(pv))


def test_kv_cache_decode_matches_full_forward_and_hf_generate(ckpt):
    hf, model, _, _ = ckpt
    rows = [[3, "img", 2, "img", 4], [6, "img", 3], [2, "img", 9]]
    ids, mask, pv = make_batch(rows, pad_to=24)
    toks, logits, cache, deltas = _greedy_with_cache(model, ids, mask, pv, STEPS)
    toks, logits = np.asarray(toks), np.asarray(logits)
    b, s = ids.shape
    assert int(cache.index) == s + STEPS - 1
    assert np.asarray(cache.valid).sum() == mask.sum() + b * (STEPS - 1)
    np.testing.assert_array_equal(np.asarray(deltas), text_positions(mask)[1])

    # a full forward over prompt + generated tokens gives the same per-step logits
    full_ids = np.concatenate([ids, toks[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones((b, STEPS - 1), np.int64)], 1)
    full, _, _ = jd_bucketed(model, full_ids, full_mask, pv)
    diff = np.abs(logits - full[:, s - 1:]).max()
    print(f"cache vs full forward: max|diff|={diff:.2e}")
    assert diff <= TOL
    assert_parity(hf_logits(hf, full_ids, full_mask, pv)[:, s - 1:], logits, np.ones((b, STEPS)))

    # greedy tokens equal transformers' generate(do_sample=False) (its sliding-window cache)
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pv), token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
                          max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    np.testing.assert_array_equal(toks, gen[:, s:].numpy())


def test_positions_default_from_cache(ckpt):
    """position_ids=None: prefill numbers the real tokens, a decode step continues from the
    count of valid cache slots -- the same logits as the explicit positions."""
    _, model, _, _ = ckpt
    ids, mask, pv = make_batch([[5, "img", 3], [4]])
    b, s = ids.shape
    pos, deltas = text_positions(mask)

    @nnx.jit(static_argnums=1)
    def two_steps(m, explicit: bool):
        cache = m.init_cache(b, s + 2)
        out = m(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pv), cache=cache,
                position_ids=jnp.asarray(pos) if explicit else None)
        nxt = jnp.argmax(out.logits[:, -1:], -1)
        p = (out.cache.index + jnp.asarray(deltas))[:, None] if explicit else None
        return out.logits, m(nxt, attention_mask=jnp.ones((b, 1), bool), position_ids=p, cache=out.cache).logits

    a, b_ = two_steps(model, True), two_steps(model, False)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b_[0]))
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b_[1]), atol=1e-6)
