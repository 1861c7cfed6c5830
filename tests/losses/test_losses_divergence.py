"""Per-token divergences and reductions against direct NumPy (float64) references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from jdelta.losses import (
    batch_mean,
    forward_kl,
    generalized_jsd,
    k1_reverse_kl,
    k3_reverse_kl,
    reduce_masked,
    reverse_kl,
    sequence_mean,
    token_divergence,
    token_mean,
    token_sum_normalized,
    topk_forward_kl,
    topk_forward_kl_from_logprobs,
)

TOL = 1e-5


def _logits(seed, shape=(3, 7, 40), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _np_logp(x, temperature=1.0, vocab_size=None):
    x = np.asarray(x, np.float64) / temperature
    if vocab_size is not None:
        x = x[..., :vocab_size]
    return log_softmax(x, axis=-1)


def np_kl(lp, lq):
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def np_jsd(ls, lt, beta):
    ps, pt = np.exp(ls), np.exp(lt)
    m = beta * pt + (1 - beta) * ps
    lm = np.log(m)
    return beta * np.sum(pt * (lt - lm), -1) + (1 - beta) * np.sum(ps * (ls - lm), -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_size", [None, 33])
def test_kls_match_numpy(temperature, vocab_size):
    s, t = _logits(0), _logits(1)
    ls, lt = _np_logp(s, temperature, vocab_size), _np_logp(t, temperature, vocab_size)
    kw = dict(temperature=temperature, vocab_size=vocab_size)
    np.testing.assert_allclose(reverse_kl(s, t, **kw), np_kl(ls, lt), atol=TOL, rtol=0)
    np.testing.assert_allclose(forward_kl(s, t, **kw), np_kl(lt, ls), atol=TOL, rtol=0)
    for beta in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(generalized_jsd(s, t, beta=beta, **kw), np_jsd(ls, lt, beta), atol=TOL, rtol=0)
    # the references are not trivially zero
    assert np_kl(ls, lt).min() > 0.05


def test_padded_vocab_columns_are_ignored():
    s, t = _logits(2), _logits(3)
    # Huge logits in the padded columns would dominate if they were not excluded.
    s_pad, t_pad = s.copy(), t.copy()
    s_pad[..., 33:] = 50.0
    t_pad[..., 33:] = -50.0
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        a = token_divergence(s_pad, t_pad, kind=kind, vocab_size=33)
        b = token_divergence(s[..., :33], t[..., :33], kind=kind)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        g = jax.grad(lambda x, kind=kind: token_divergence(x, t_pad, kind=kind, vocab_size=33).sum())(jnp.asarray(s_pad))
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_array_equal(np.asarray(g)[..., 33:], 0.0)


def test_gjsd_beta_limits_are_the_kls():
    s, t = _logits(4, scale=1.5), _logits(5, scale=1.5)
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    np.testing.assert_allclose(generalized_jsd(s, t, beta=0.0), fkl, atol=TOL, rtol=0)
    np.testing.assert_allclose(generalized_jsd(s, t, beta=1.0), rkl, atol=TOL, rtol=0)
    # ... and these are the limits of the scaled divergence (GKD): JSD_b / b -> KL(t||s), JSD_b / (1-b) -> KL(s||t)
    ls, lt = _np_logp(s), _np_logp(t)
    for b in (1e-6, 1e-7):
        np.testing.assert_allclose(np_jsd(ls, lt, b) / b, np.asarray(fkl, np.float64), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np_jsd(ls, lt, 1 - b) / b, np.asarray(rkl, np.float64), rtol=1e-4, atol=1e-5)
    # the two KLs differ here, so the limits are not the same number
    assert np.abs(np.asarray(fkl) - np.asarray(rkl)).max() > 0.05
    assert np.asarray(generalized_jsd(s, t, beta=0.5)).max() < np.asarray(fkl).max()


def test_teacher_gets_no_gradient_and_student_gradient_matches_numpy():
    s, t = _logits(6, (2, 3, 20)), _logits(7, (2, 3, 20))
    gt = jax.grad(lambda x: reverse_kl(s, x).sum())(jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(gt), 0.0)
    # d KL(s||t) / d s_logits = p_s * (log p_s - log p_t - KL)
    gs = jax.grad(lambda x: reverse_kl(x, t).sum())(jnp.asarray(s))
    ls, lt = _np_logp(s), _np_logp(t)
    ref = np.exp(ls) * (ls - lt - np_kl(ls, lt)[..., None])
    np.testing.assert_allclose(gs, ref, atol=TOL, rtol=0)


def test_vocab_mismatch_and_bad_args_raise():
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        reverse_kl(_logits(0, (2, 3, 10)), _logits(1, (2, 3, 12)))
    with pytest.raises(ValueError, match="vocab_size"):
        reverse_kl(_logits(0, (2, 3, 10)), _logits(1, (2, 3, 10)), vocab_size=11)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(_logits(0), _logits(1), kind="tv")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(_logits(0), _logits(1), beta=1.5)


def test_sampled_token_estimators():
    rng = np.random.default_rng(8)
    ls = np.log(rng.uniform(0.01, 1, size=(4, 9)))
    lt = np.log(rng.uniform(0.01, 1, size=(4, 9)))
    np.testing.assert_allclose(k1_reverse_kl(ls, lt), ls - lt, atol=TOL, rtol=0)
    r = np.exp(lt - ls)
    np.testing.assert_allclose(k3_reverse_kl(ls, lt), (r - 1) - np.log(r), atol=TOL, rtol=1e-6)
    assert np.asarray(k3_reverse_kl(ls, lt)).min() >= 0
    # Both are unbiased estimators of KL(p_s || p_t) for y ~ p_s.
    s, t = _logits(9, (1, 1, 12), 1.0)[0, 0], _logits(10, (1, 1, 12), 1.0)[0, 0]
    lps, lpt = _np_logp(s), _np_logp(t)
    y = rng.choice(12, size=200_000, p=np.exp(lps))
    exact = np_kl(lps, lpt)
    k1 = np.asarray(k1_reverse_kl(lps[y], lpt[y]), np.float64).mean()
    k3 = np.asarray(k3_reverse_kl(lps[y], lpt[y]), np.float64).mean()
    assert abs(k1 - exact) < 0.02 and abs(k3 - exact) < 0.02, (k1, k3, exact)


def test_topk_forward_kl_matches_numpy():
    s, t = _logits(11, (2, 5, 30)), _logits(12, (2, 5, 30))
    k = 6
    lt = _np_logp(t)
    ids = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    t_top = np.take_along_axis(lt, ids, -1).astype(np.float32)
    ls = _np_logp(s, 0.8)
    q = t_top - logsumexp(t_top, axis=-1, keepdims=True)
    ref = np.sum(np.exp(q) * (q - np.take_along_axis(ls, ids, -1)), -1)
    got = topk_forward_kl(s, t_top, ids, temperature=0.8)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert np.asarray(got).min() >= 0
    np.testing.assert_allclose(
        topk_forward_kl_from_logprobs(np.take_along_axis(ls, ids, -1).astype(np.float32), t_top), ref, atol=TOL
    )
    # with k = V it is the exact forward KL
    ids_all = np.argsort(-lt, axis=-1)
    full = topk_forward_kl(s, np.take_along_axis(lt, ids_all, -1).astype(np.float32), ids_all)
    np.testing.assert_allclose(full, forward_kl(s, t), atol=TOL, rtol=0)


def test_reductions():
    rng = np.random.default_rng(13)
    v = rng.normal(size=(4, 6)).astype(np.float32)
    m = (rng.uniform(size=(4, 6)) < 0.6).astype(np.float32)
    m[2] = 0  # a fully-masked row
    m[0, 0] = 1
    seq = [(v[i] * m[i]).sum() / m[i].sum() if m[i].sum() else 0.0 for i in range(4)]
    np.testing.assert_allclose(sequence_mean(v, m), seq, atol=TOL)
    rows = [seq[i] for i in range(4) if m[i].sum()]
    np.testing.assert_allclose(batch_mean(v, m), np.mean(rows), atol=TOL)
    np.testing.assert_allclose(token_mean(v, m), (v * m).sum() / m.sum(), atol=TOL)
    np.testing.assert_allclose(reduce_masked(v, m, "batch_mean"), np.mean(rows), atol=TOL)
    np.testing.assert_allclose(token_sum_normalized(v, m, 100.0), (v * m).sum() / 100.0, atol=TOL)
    # token_mean and batch_mean genuinely differ on unequal lengths
    assert abs(float(token_mean(v, m)) - float(batch_mean(v, m))) > 1e-4


def test_all_zero_mask_is_an_error_eagerly_and_nan_under_jit():
    v = np.ones((2, 3), np.float32)
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="all zeros"):
        token_mean(v, z)
    with pytest.raises(ValueError, match="all zeros"):
        batch_mean(v, z)
    assert np.isnan(jax.jit(token_mean)(v, z))
    assert np.isnan(jax.jit(batch_mean)(v, z))
