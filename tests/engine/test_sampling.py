"""Sampling machinery against references, on a tiny real causal LM (tests/sampling_tiny_lm.py).

Qwen3-VL parity against transformers lives in tests/test_sampling_qwen3_vl.py.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from mesh_checks import assert_array_layout, assert_layout, watch_sampler
from sampling_tiny_lm import full_logits, left_padded_batch, make_model, tiny_rope_index
from scipy import stats

from jdelta.sampling import (
    Sampler,
    SamplingParams,
    apply_top_k,
    apply_top_p,
    bucket,
    filter_logits,
    generate,
    pad_batch,
    sample_step,
)
from jdelta.sharding import make_mesh

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8], [11, 12, 13, 14]]


@pytest.fixture(scope="module")
def model():
    return make_model(0)


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, rope_index_fn=tiny_rope_index, seq_buckets=(8, 16))


def naive_greedy(model, rows, steps):
    """Reference: recompute the whole sequence without a cache at every step."""
    b = left_padded_batch(rows)
    ids, mask = b["input_ids"], b["attention_mask"]
    lps = []
    for _ in range(steps):
        lg = full_logits(model, ids, mask)[:, -1]
        nxt = lg.argmax(-1)
        lps.append(jax.nn.log_softmax(lg, -1)[np.arange(len(rows)), nxt])
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int32)], 1)
    return ids[:, -steps:], np.stack(lps, 1)


# ---------------------------------------------------------------------------- filters


def test_top_k_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    out = np.asarray(apply_top_k(logits, 5))
    for row, ref in zip(out, np.asarray(logits), strict=True):
        keep = np.argsort(-ref)[:5]
        assert set(np.flatnonzero(np.isfinite(row))) == set(keep)
        np.testing.assert_array_equal(row[keep], ref[keep])
    np.testing.assert_array_equal(np.asarray(apply_top_k(logits, 0)), np.asarray(logits))


def test_top_p_matches_numpy():
    logits = jax.random.normal(jax.random.key(1), (6, 40)) * 2
    for p in (0.1, 0.5, 0.9):
        out = np.asarray(apply_top_p(logits, p))
        for row, ref in zip(out, np.asarray(logits), strict=True):
            order = np.argsort(-ref)
            probs = np.exp(ref[order] - ref.max())
            probs /= probs.sum()
            n_keep = int(np.sum(np.cumsum(probs) - probs < p))
            assert set(np.flatnonzero(np.isfinite(row))) == set(order[:n_keep])
            assert probs[:n_keep].sum() >= p - 1e-6


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(top_k=10, top_p=0.3)])
def test_filtered_sampling_never_emits_masked_tokens(kw):
    params = SamplingParams(temperature=0.8, **kw)
    logits = jax.random.normal(jax.random.key(2), (5, 64)) * 3
    allowed = np.isfinite(np.asarray(filter_logits(logits, params)))
    keys = jax.random.split(jax.random.key(3), 4000)
    rows = jnp.tile(logits, (800, 1))
    tok, lp, raw = sample_step(keys, rows, params)
    tok = np.asarray(tok).reshape(800, 5)
    for r in range(5):
        assert allowed[r][tok[:, r]].all()
        assert len(np.unique(tok[:, r])) > 1 or allowed[r].sum() == 1  # really sampling
    # Log-probs: under the renormalised filtered distribution, and under the raw model.
    flat = np.asarray(tok).reshape(-1)
    samp_ref = np.asarray(jax.nn.log_softmax(filter_logits(rows, params)))[np.arange(4000), flat]
    raw_ref = np.asarray(jax.nn.log_softmax(rows))[np.arange(4000), flat]
    np.testing.assert_allclose(np.asarray(lp), samp_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(raw), raw_ref, atol=1e-5)


def test_greedy_sample_step_is_argmax():
    logits = jax.random.normal(jax.random.key(4), (7, 33))
    tok, lp, raw = sample_step(jax.random.split(jax.random.key(0), 7), logits, SamplingParams(temperature=0))
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(np.asarray(lp), 0.0)
    np.testing.assert_allclose(np.asarray(raw), np.asarray(jax.nn.log_softmax(logits).max(-1)), atol=1e-6)


# ---------------------------------------------------------------------------- the generation loop


def test_greedy_matches_uncached_reference(model, sampler):
    res = sampler.generate(left_padded_batch(PROMPTS), SamplingParams(temperature=0, max_new_tokens=8), rng=0)
    ref_tok, ref_lp = naive_greedy(model, PROMPTS, 8)
    np.testing.assert_array_equal(res.tokens, ref_tok)
    np.testing.assert_allclose(res.raw_logprobs, ref_lp, atol=1e-5)
    assert res.finish_reason == ["length"] * 4 and (res.lengths == 8).all()


def test_stop_tokens_and_early_exit(model, sampler):
    ref_tok, _ = naive_greedy(model, PROMPTS, 8)
    # Stop at row 0's 3rd token and row 2's 2nd: those rows end there, others continue.
    stop = (int(ref_tok[0, 2]), int(ref_tok[2, 1]))
    res = sampler.generate(left_padded_batch(PROMPTS),
                           SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=stop), rng=0)
    for r in range(4):
        hits = np.flatnonzero(np.isin(ref_tok[r], stop))
        n = hits[0] + 1 if hits.size else 8
        assert res.lengths[r] == n
        assert res.finish_reason[r] == ("stop" if hits.size else "length")
        np.testing.assert_array_equal(res.tokens[r, :n], ref_tok[r, :n])
        assert (res.tokens[r, n:] == 0).all() and (res.raw_logprobs[r, n:] == 0).all()
    # Every row stops at its first token -> the loop exits after one step.
    first = tuple(int(t) for t in ref_tok[:, 0])
    res = sampler.generate(left_padded_batch(PROMPTS),
                           SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=first), rng=0)
    assert res.stats["decode_steps"] == 1 and (res.lengths == 1).all()
    assert res.finish_reason == ["stop"] * 4


def test_first_token_distribution_chi_square(model, sampler):
    """Empirical first-token frequencies at temperature T match softmax(logits / T)."""
    t, n = 0.7, 3000
    res = sampler.generate(left_padded_batch([PROMPTS[1]]), SamplingParams(temperature=t, max_new_tokens=1, n=n),
                           rng=1234)
    logits = full_logits(model, *left_padded_batch([PROMPTS[1]]).values())[0, -1]

    def pvalue(temp):
        z = logits.astype(np.float64) / temp
        p = np.exp(z - z.max())
        p /= p.sum()
        counts = np.bincount(res.tokens[:, 0], minlength=p.size)
        big = p * n >= 5  # pool the rare tokens into one bin
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(p[big], p[~big].sum()) * n
        return stats.chisquare(obs, exp).pvalue

    assert pvalue(t) > 1e-3
    assert pvalue(1.0) < 1e-6  # the test can tell temperatures apart
    # The reported sampling log-prob is log softmax(logits / T) at the drawn token.
    ref = np.asarray(jax.nn.log_softmax(logits / t))[res.tokens[:, 0]]
    np.testing.assert_allclose(res.logprobs[:, 0], ref, atol=1e-5)


def test_seeds_reproducible_and_distinct(sampler):
    batch = left_padded_batch(PROMPTS[:2])
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=4)
    a = sampler.generate(batch, params, rng=7)
    b = sampler.generate(batch, params, rng=7)
    c = sampler.generate(batch, params, rng=jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    assert len({tuple(r) for r in a.tokens}) == 8  # the n samples of a prompt differ
    np.testing.assert_array_equal(a.prompt_index, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(a.sample_index, [0, 1, 2, 3] * 2)


def test_generate_function_equals_a_kept_sampler(model, sampler):
    """generate() is a one-off Sampler (no process-wide cache); a kept Sampler reuses its programs."""
    batch = left_padded_batch(PROMPTS[:2])
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=4)
    a = generate(model, batch, params, rng=7, rope_index_fn=tiny_rope_index, seq_buckets=(8, 16))
    b = sampler.generate(batch, params, rng=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert sampler.generate(batch, params, rng=7).stats["compiled"] == 0


def test_shared_prefill_equals_separate_prefills(sampler):
    """n samples off one shared prefill == the prompts repeated n times, each prefilled."""
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8, n=3)
    shared = sampler.generate(left_padded_batch(PROMPTS), params, rng=5)
    repeated = [p for p in PROMPTS for _ in range(3)]
    separate = sampler.generate(left_padded_batch(repeated), SamplingParams(
        temperature=0.9, top_p=0.95, max_new_tokens=8, n=1), rng=5)
    np.testing.assert_array_equal(shared.tokens, separate.tokens)
    np.testing.assert_allclose(shared.logprobs, separate.logprobs, atol=1e-5)
    np.testing.assert_allclose(shared.raw_logprobs, separate.raw_logprobs, atol=1e-5)


def test_bucketing_bounds_compilations(model):
    s = Sampler(model, rope_index_fn=tiny_rope_index, seq_buckets=(8, 16))
    for i, length in enumerate((3, 5, 8, 9, 12, 16, 4)):
        # temperature, top-p and stop ids are traced: changing them does not recompile
        params = SamplingParams(temperature=0.5 + 0.1 * i, top_p=0.9 - 0.05 * i, max_new_tokens=4,
                                stop_token_ids=tuple(range(1, i % 3 + 1)))
        s.generate(left_padded_batch([list(range(1, length + 1))] * 2), params, rng=0)
    assert s.compile_count == 4  # (prefill + decode) x 2 length buckets, not x 7 lengths
    assert bucket(17, (8, 16)) == 32 and bucket(40, (8, 16)) == 48


def test_pad_batch_images():
    b = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int32),
         "pixel_values": np.ones((10, 4), np.float32), "image_grid_thw": np.array([[1, 2, 5]])}
    out = pad_batch(b, seq_len=5, num_patches=16, num_images=2)
    assert out["input_ids"].shape == (2, 5) and out["attention_mask"][:, :2].sum() == 0
    assert out["pixel_values"].shape == (16, 4) and out["pixel_values"][10:].sum() == 0
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 2, 5], [0, 0, 0]])


def test_bad_input_errors(model, sampler):
    batch = left_padded_batch(PROMPTS)
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="unknown stop token id"):
        sampler.generate(batch, SamplingParams(stop_token_ids=(64,)), rng=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate(batch, SamplingParams(max_new_tokens=5000), rng=0)
    bad = dict(batch)
    bad["attention_mask"] = batch["attention_mask"].copy()
    bad["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sampler.generate(bad, SamplingParams(), rng=0)


@pytest.mark.slow  # the default suite shards the Qwen3-VL sampler the same way (test_sampling_qwen3_vl.py)
def test_mesh_matches_single_device(model):
    """fsdp=4 x tensor=2 on 8 CPU devices gives the same samples as one device, and really runs
    sharded: parameters, the KV cache and the outputs are split over the 8 devices."""
    rows = PROMPTS * 2
    params = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=6, n=2)
    single = Sampler(model, rope_index_fn=tiny_rope_index, seq_buckets=(8,))
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = Sampler(model, mesh=mesh, rope_index_fn=tiny_rope_index, seq_buckets=(8,))
    prefill_out, decode_out = watch_sampler(sharded)
    a = single.generate(left_padded_batch(rows), params, rng=3)
    b = sharded.generate(left_padded_batch(rows), params, rng=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-4)
    # the layout: 8 prompts x n=2 = 16 rows over fsdp=4, KV heads (2) and vocab over tensor=2
    _, state = sharded._state()
    assert_array_layout("embed", state["embed"].get_value(), mesh, P("tensor", "fsdp"))
    assert_array_layout("wq", state["layers"][0]["wq"].get_value(), mesh, P("fsdp", "tensor"))
    assert_array_layout("wd", state["layers"][1]["wd"].get_value(), mesh, P("tensor", "fsdp"))
    (cache, _, deltas), out = prefill_out.shardings[0], decode_out.shardings[0]
    kv_shape = (2, 16, 8 + 6, 2, 8)  # [layers, rows, slots, kv heads, head dim]
    for name, sh in (("prefill k", cache.k), ("prefill v", cache.v), ("decode k", out.cache.k)):
        assert_layout(name, sh, kv_shape, mesh, P(None, "fsdp", None, "tensor", None))
    assert_layout("rope deltas", deltas, (16,), mesh, P("fsdp"))
    for name in ("tokens", "logprobs", "raw_logprobs"):
        assert_layout(name, getattr(out, name), (16, 6), mesh, P("fsdp", None))
    assert_layout("lengths", out.lengths, (16,), mesh, P("fsdp"))
    g = sharded.generate(left_padded_batch(rows), SamplingParams(temperature=0, max_new_tokens=6), rng=0)
    np.testing.assert_array_equal(g.tokens, naive_greedy(model, rows, 6)[0])
