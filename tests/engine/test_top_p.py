"""Exact top-p without a full-vocabulary sort (jdelta.top_p) == the sorted nucleus, in value and in distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdelta.sampling import DecodeOptions, SamplingParams, apply_top_k, apply_top_p, sample_step
from jdelta.top_p import nucleus_fits, nucleus_threshold_preselected, nucleus_threshold_sorted


def _logits(seed, rows, vocab, scale, *, ties=False, masked=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, vocab)) * scale
    if ties:  # many exact ties, also around the thresholds
        x = np.round(x * 2) / 2
    if masked:  # -inf entries, as left by a top-k filter
        x[:, rng.choice(vocab, masked, replace=False)] = -np.inf
    return jnp.asarray(x, jnp.float32)


CASES = [  # (scale, ties, masked, p, k, group)
    (5.0, False, 0, 0.9, 64, 0),
    (5.0, False, 0, 0.9, 64, 128),
    (3.0, False, 0, 0.5, 128, 0),
    (6.0, True, 0, 0.95, 32, 0),
    (6.0, True, 0, 0.95, 32, 64),
    (4.0, False, 3000, 0.99, 256, 0),
    (0.3, False, 0, 0.9, 16, 0),  # flat: the nucleus never fits, the fallback decides
]


@pytest.mark.parametrize("scale,ties,masked,p,k,group", CASES)
def test_preselected_threshold_equals_sorted_where_contained(scale, ties, masked, p, k, group):
    x = _logits(int(scale * 10) + k, 64, 4096, scale, ties=ties, masked=masked)
    ref = np.asarray(nucleus_threshold_sorted(x, p))
    thr, contained = (np.asarray(a) for a in nucleus_threshold_preselected(x, p, k, group=group))
    np.testing.assert_array_equal(thr[contained], ref[contained])
    # The whole filter (with the batch fallback) equals the sorted one on every row.
    np.testing.assert_array_equal(np.asarray(apply_top_p(x, p, candidates=k, group=group)),
                                  np.asarray(apply_top_p(x, p)))
    if scale < 1:
        assert not contained.any()  # the fallback path ran
    else:
        assert contained.mean() > 0.5
    # "contained" is a proof, never a guess: a contained row's kept set has fewer than k tokens.
    kept = (np.asarray(x) >= ref).sum(-1)
    assert (kept[contained] < k).all()


@pytest.mark.parametrize("flat", [[3], [3, 11], [0, 3, 7, 11, 15]])
def test_fallback_rows(flat):
    """Flat rows among peaked ones (16 rows): up to 16 // 8 = 2 of them are sorted alone, 5 make the
    whole batch sort; the result is exact either way, also with a leading batch shape."""
    x = np.array(_logits(1, 16, 2048, 6.0))
    x[flat] = np.asarray(_logits(2, len(flat), 2048, 0.05))
    x = jnp.asarray(x)
    fits = np.asarray(nucleus_fits(x, 0.9, 32))
    assert set(np.flatnonzero(~fits)) == set(flat)
    ref = np.asarray(apply_top_p(x, 0.9))
    np.testing.assert_array_equal(np.asarray(apply_top_p(x, 0.9, candidates=32)), ref)
    got = apply_top_p(x.reshape(4, 4, 2048), 0.9, candidates=32)
    np.testing.assert_array_equal(np.asarray(got).reshape(16, 2048), ref)


@pytest.mark.parametrize("k", [256, 8])  # 256 > top_k: always fits; 8: some rows do not (fallback)
def test_same_keys_same_tokens(k):
    x = jnp.concatenate([_logits(3, 24, 1000, 4.0), _logits(4, 8, 1000, 1.0)])
    keys = jax.random.split(jax.random.key(0), 32)
    params = SamplingParams(temperature=0.8, top_k=200, top_p=0.9)
    ref = sample_step(keys, x, params, options=DecodeOptions(top_p_candidates=0))
    got = sample_step(keys, x, params, options=DecodeOptions(top_p_candidates=k))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fits = np.asarray(nucleus_fits(apply_top_k(x / 0.8, 200), 0.9, k))
    assert fits.all() if k == 256 else (fits.any() and not fits.all())


def _nucleus_probs(row, p):
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(row), bool)
    keep[order[before < p]] = True
    q = np.where(keep, probs, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("k", [16, 3])  # 3 < the nucleus size (6): every draw goes through the fallback
def test_distribution_chi_square(k):
    row = np.asarray(_logits(5, 1, 50, 2.5))[0]
    expected = _nucleus_probs(row, 0.8)
    assert (expected > 0).sum() == 6
    draws = 20000
    logits = jnp.broadcast_to(jnp.asarray(row), (draws, 50))
    keys = jax.random.split(jax.random.key(42), draws)
    params = SamplingParams(temperature=1.0, top_p=0.8)
    tok = np.asarray(sample_step(keys, logits, params, options=DecodeOptions(top_p_candidates=k))[0])
    counts = np.bincount(tok, minlength=50)
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus
    exp = expected[support].astype(np.float64)
    chi2 = stats.chisquare(counts[support], draws * exp / exp.sum())
    assert chi2.pvalue > 1e-3
    assert (k < 6) == (not bool(np.asarray(nucleus_fits(jnp.asarray(row)[None], 0.8, k))[0]))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's lowering")
def test_preselection_uses_the_topk_kernel_not_a_sort():
    """With top-k's indices dead XLA:CPU sorts the whole row (30x slower at V = 151,936)."""
    x = jnp.zeros((4, 151936), jnp.float32)
    txt = jax.jit(lambda x: nucleus_threshold_preselected(x, 0.9, 1024)).lower(x).compile().as_text()
    assert "TopK" in txt and " sort(" not in txt


def test_sampler_with_preselection_equals_full_sort():
    """End to end on the tiny LM (vocab 64): the same completions with and without preselection."""
    from sampling_tiny_lm import left_padded_batch, make_model, tiny_rope_index

    from jdelta.sampling import Sampler

    model = make_model(0)
    batch = left_padded_batch([[5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8]])
    params = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=12, n=3)
    out = [Sampler(model, rope_index_fn=tiny_rope_index, seq_buckets=(8,),
                   decode_options=DecodeOptions(top_p_candidates=k)).generate(batch, params, rng=4) for k in (0, 8)]
    np.testing.assert_array_equal(out[1].tokens, out[0].tokens)
    np.testing.assert_array_equal(out[1].logprobs, out[0].logprobs)
    np.testing.assert_array_equal(out[1].raw_logprobs, out[0].raw_logprobs)
