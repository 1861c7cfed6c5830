"""Qwen3-VL KV cache: prefill + greedy decode in a lax.while_loop equals a full forward and
transformers' generate (CPU, fp32, tiny random checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_vl_tiny import IMG, PAD, TOL, assert_parity, hf_logits, jd_bucketed, make_batch, tiny_checkpoint

from jdelta.models.qwen3_vl import get_rope_index


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("qwen3vl_tiny"))


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
