"""Chunked scoring against full-vocabulary log_softmax references, on the tiny stand-in LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from mesh_checks import assert_layout
from sampling_tiny_lm import full_logits, left_padded_batch, make_model, tiny_rope_index

from jdelta.logprobs import chunked_token_logprobs, score_completions
from jdelta.sharding import make_mesh

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8]]


@pytest.fixture(scope="module")
def model():
    return make_model(1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    comp = rng.integers(1, 64, size=(3, 7)).astype(np.int32)
    cmask = np.ones((3, 7), np.int32)
    cmask[1, 4:] = 0
    cmask[2, 1:] = 0
    return left_padded_batch(PROMPTS), comp, cmask


def reference(model, batch, comp, cmask, temperature=1.0):
    """log_softmax over the full vocabulary of an uncached forward, gathered at the completion."""
    ids = np.concatenate([batch["input_ids"], comp], 1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(comp)], 1)
    logits = full_logits(model, ids, mask)[:, -comp.shape[1] - 1 : -1] / temperature
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    tok = np.take_along_axis(logp, comp[..., None], -1)[..., 0] * cmask
    return logp, tok


@pytest.mark.parametrize("chunk_size", [7, 3, 1])
def test_scores_match_log_softmax(model, data, chunk_size):
    batch, comp, cmask = data
    res = score_completions(model, batch, comp, cmask, chunk_size=chunk_size, top_k=4, return_logsumexp=True,
                            rope_index_fn=tiny_rope_index)
    logp, tok = reference(model, batch, comp, cmask)
    np.testing.assert_allclose(np.asarray(res.token_logprobs), tok, atol=1e-4)
    assert (np.asarray(res.token_logprobs)[cmask == 0] == 0).all()
    top_ref = -np.sort(-logp, -1)[..., :4] * cmask[..., None]
    np.testing.assert_allclose(np.asarray(res.topk_logprobs), top_ref, atol=1e-4)
    ids = np.asarray(res.topk_ids)
    gathered = np.take_along_axis(logp, ids, -1) * cmask[..., None]
    np.testing.assert_allclose(gathered, top_ref, atol=1e-4)
    # logsumexp: logit - lse is the log-prob
    ids_full = np.concatenate([batch["input_ids"], comp], 1)
    mask_full = np.concatenate([batch["attention_mask"], np.ones_like(comp)], 1)
    logits = full_logits(model, ids_full, mask_full)[:, -8:-1]
    lse_ref = np.log(np.exp(logits.astype(np.float64)).sum(-1)) * cmask
    np.testing.assert_allclose(np.asarray(res.logsumexp), lse_ref, atol=1e-4)


def test_temperature(model, data):
    batch, comp, cmask = data
    res = score_completions(model, batch, comp, cmask, chunk_size=4, temperature=0.5, rope_index_fn=tiny_rope_index)
    _, tok = reference(model, batch, comp, cmask, temperature=0.5)
    np.testing.assert_allclose(np.asarray(res.token_logprobs), tok, atol=1e-4)
    assert res.topk_ids is None and res.logsumexp is None


def test_padded_vocab_columns_excluded():
    h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    w = jax.random.normal(jax.random.key(1), (8, 12))
    tgt = jnp.asarray(np.random.default_rng(0).integers(0, 10, (2, 5)))
    res = chunked_token_logprobs(h, w, tgt, chunk_size=2, vocab_size=10)
    ref = jax.nn.log_softmax(h @ w[:, :10], -1)
    np.testing.assert_allclose(np.asarray(res.token_logprobs),
                               np.take_along_axis(np.asarray(ref), np.asarray(tgt)[..., None], -1)[..., 0], atol=1e-5)


def test_chunked_peak_memory_does_not_grow_with_vocab_times_seq():
    """Compiled temp memory: chunked stays ~B*chunk*V; unchunked holds B*T*V."""
    b, t, h, v = 2, 512, 16, 8192
    hidden = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    head = jax.ShapeDtypeStruct((h, v), jnp.float32)
    tgt = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(chunk):
        fn = jax.jit(lambda x, w, y: chunked_token_logprobs(x, w, y, chunk_size=chunk).token_logprobs)
        return fn.lower(hidden, head, tgt).compile().memory_analysis().temp_size_in_bytes

    full = b * t * v * 4  # one [B, T, V] float32
    unchunked, chunked = temp_bytes(t), temp_bytes(16)
    assert unchunked >= full
    assert chunked < full / 8
    assert temp_bytes(64) > chunked  # grows with the chunk, not with T * V


def test_mesh_matches_single_device(model, data):
    batch, comp, cmask = data
    rows = [np.concatenate([x, x[:1]]) for x in (batch["input_ids"], batch["attention_mask"], comp, cmask)]
    b = {"input_ids": rows[0], "attention_mask": rows[1]}
    a = score_completions(model, b, rows[2], rows[3], chunk_size=3, top_k=2, rope_index_fn=tiny_rope_index)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    m = score_completions(model, b, rows[2], rows[3], chunk_size=3, top_k=2, rope_index_fn=tiny_rope_index,
                          mesh=mesh)
    np.testing.assert_allclose(np.asarray(a.token_logprobs), np.asarray(m.token_logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.topk_ids), np.asarray(m.topk_ids))
    # really sharded: the 4 rows' results are split over fsdp=4 on all 8 devices
    for name in ("token_logprobs", "topk_logprobs", "topk_ids"):
        x = getattr(m, name)
        assert_layout(name, x.sharding, x.shape, mesh, P("fsdp", *([None] * (x.ndim - 1))))


def test_bad_input(model, data):
    batch, comp, cmask = data
    with pytest.raises(ValueError, match="completion_tokens"):
        score_completions(model, batch, comp[:2], cmask[:2], chunk_size=2, rope_index_fn=tiny_rope_index)
    with pytest.raises(ValueError, match="chunk_size"):
        score_completions(model, batch, comp, cmask, chunk_size=0, rope_index_fn=tiny_rope_index)
