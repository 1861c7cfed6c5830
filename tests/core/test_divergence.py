"""Answer divergence Δ: properties, SciPy references, zero-delta tests and summaries."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.special import gammaln, xlogy

from jdelta import divergence as D

BOUNDED = ("tv", "js", "hellinger")


@st.composite
def count_pairs(draw, num_p=6, num_c=7, max_n=12):
    """(teacher [P, C], student [P, C], mask [P, C]) with every row non-empty on both sides.

    Shapes are fixed (prompts differ in their number of real classes through the mask) so that
    each jitted function compiles once per test rather than once per example.
    """
    p, c = num_p, num_c
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    width = rng.integers(1, c + 1, size=p)
    mask = np.arange(c)[None, :] < width[:, None]
    t = rng.integers(0, max_n + 1, size=(p, c)) * mask
    s = rng.integers(0, max_n + 1, size=(p, c)) * mask
    # Force equal rows sometimes, and make every row non-empty.
    same = rng.random(p) < 0.3
    s[same] = t[same] * rng.integers(1, 3)
    t[:, 0] += t.sum(1) == 0
    s[:, 0] += s.sum(1) == 0
    # Garbage in padding columns must be ignored.
    t = t + (~mask) * rng.integers(0, 5, size=(p, c))
    return t.astype(np.int32), s.astype(np.int32), mask


def _np_dists(t, s, m):
    t = np.where(m, t, 0).astype(np.float64)
    s = np.where(m, s, 0).astype(np.float64)
    return t / t.sum(1, keepdims=True), s / s.sum(1, keepdims=True)


@settings(max_examples=40, deadline=None)
@given(count_pairs())
def test_matches_scipy_and_numpy_references(data):
    t, s, m = data
    p, q = _np_dists(t, s, m)
    got = {k: np.asarray(v) for k, v in D.all_divergences(t, s, m, smoothing=0.5).items()}
    for i in range(t.shape[0]):
        np.testing.assert_allclose(got["tv"][i], 0.5 * np.abs(p[i] - q[i]).sum(), atol=1e-6)
        np.testing.assert_allclose(got["js"][i], jensenshannon(p[i], q[i], base=2) ** 2, atol=2e-6)
        hel = np.sqrt(0.5 * ((np.sqrt(p[i]) - np.sqrt(q[i])) ** 2).sum())
        np.testing.assert_allclose(got["hellinger"][i], hel, atol=2e-6)
        real = m[i]
        ps = (t[i][real] + 0.5) / (t[i][real].sum() + 0.5 * real.sum())
        qs = (s[i][real] + 0.5) / (s[i][real].sum() + 0.5 * real.sum())
        np.testing.assert_allclose(got["kl_ts"][i], stats.entropy(ps, qs), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["kl_st"][i], stats.entropy(qs, ps), rtol=1e-4, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(count_pairs())
def test_symmetry_bounds_and_zero_iff_equal(data):
    t, s, m = data
    p, q = _np_dists(t, s, m)
    equal = np.all(np.abs(p - q) < 1e-12, axis=1)
    for metric in BOUNDED:
        d = np.asarray(D.answer_divergence(t, s, m, metric=metric))
        d_rev = np.asarray(D.answer_divergence(s, t, m, metric=metric))
        np.testing.assert_allclose(d, d_rev, atol=1e-6)
        assert np.all((d >= 0) & (d <= 1))
        np.testing.assert_array_equal(d < 1e-6, equal)
    kl_ts = np.asarray(D.answer_divergence(t, s, m, metric="kl_ts"))
    kl_st_rev = np.asarray(D.answer_divergence(s, t, m, metric="kl_st"))
    np.testing.assert_allclose(kl_ts, kl_st_rev, rtol=1e-5, atol=1e-7)
    assert np.all(kl_ts >= 0)
    np.testing.assert_array_equal(np.asarray(D.is_zero_delta(t, s, m)), equal)


@settings(max_examples=30, deadline=None)
@given(count_pairs(), st.integers(0, 2**32 - 1))
def test_relabelling_invariance(data, seed):
    t, s, m = data
    perm = np.random.default_rng(seed).permutation(t.shape[1])
    for metric in D.METRICS:
        a = np.asarray(D.answer_divergence(t, s, m, metric=metric))
        b = np.asarray(D.answer_divergence(t[:, perm], s[:, perm], m[:, perm], metric=metric))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_worked_values_and_edge_cases():
    t = np.array([[8, 8, 0], [16, 0, 0], [4, 4, 8], [0, 0, 0], [3, 1, 0]])
    s = np.array([[8, 8, 0], [0, 16, 0], [8, 4, 4], [5, 0, 0], [6, 2, 0]])
    tv = np.asarray(D.answer_divergence(t, s))
    np.testing.assert_allclose(tv[:3], [0.0, 1.0, 0.25])
    assert np.isnan(tv[3])  # no teacher samples: undefined, not zero
    assert tv[4] == 0.0  # same distribution, different n
    np.testing.assert_allclose(np.asarray(D.answer_divergence(t[1:2], s[1:2], metric="js")), [1.0])
    np.testing.assert_allclose(np.asarray(D.answer_divergence(t[1:2], s[1:2], metric="hellinger")), [1.0])
    np.testing.assert_array_equal(np.asarray(D.is_zero_delta(t, s)), [True, False, False, False, True])
    # Integer TV (exact int32 path, float fallback past int32-safe totals) equals float TV.
    big_t, big_s = np.array([[60000, 0, 1], [3, 1, 0]]), np.array([[25000, 25000, 0], [1, 1, 0]])
    want = [0.5 * (abs(60000 / 60001 - 0.5) + 0.5 + 1 / 60001), 0.25]
    np.testing.assert_allclose(np.asarray(D.answer_divergence(big_t, big_s)), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(D.answer_divergence(big_t[1:], big_s[1:])), [0.25])
    np.testing.assert_allclose(np.asarray(D.answer_divergence(big_t * 1.0, big_s * 1.0)), want, rtol=1e-6)
    # KL with smoothing: equal counts -> 0; disjoint support stays finite.
    kl = np.asarray(D.answer_divergence(t[:2], s[:2], metric="kl_ts", smoothing=1.0))
    assert kl[0] == 0.0 and np.isfinite(kl[1]) and kl[1] > 1.0


def test_bad_input_errors():
    t = np.ones((2, 3), np.int32)
    with pytest.raises(ValueError, match="unknown divergence metric 'kl'"):
        D.answer_divergence(t, t, metric="kl")
    with pytest.raises(
        ValueError, match=r"shape mismatch: teacher_counts \(2, 3\) vs student_counts \(2, 4\)"
    ):
        D.answer_divergence(t, np.ones((2, 4)))
    with pytest.raises(ValueError, match="mask"):
        D.answer_divergence(t, t, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match=r"\[prompts, classes\]"):
        D.answer_divergence(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="smoothing"):
        D.answer_divergence(t, t, metric="kl_ts", smoothing=0.0)
    with pytest.raises(ValueError, match="correct"):
        D.accuracy_gap(t, t, np.ones((2, 2), bool))


def test_jit_and_vmap_compose():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, size=(4, 6))
    s = rng.integers(0, 5, size=(4, 6))
    t[:, 0] += 1
    s[:, 0] += 1
    f = jax.jit(D.answer_divergence, static_argnames=("metric",))
    np.testing.assert_allclose(
        np.asarray(f(t, s, None, metric="js")), np.asarray(D.answer_divergence(t, s, metric="js"))
    )
    per_row = jax.vmap(lambda a, b: D.answer_divergence(a[None], b[None])[0])(t, s)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(D.answer_divergence(t, s)), atol=1e-7)


def test_counts_from_class_ids():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 6, size=(50, 16))
    got = np.asarray(D.counts_from_class_ids(ids, 6))
    want = np.stack([np.bincount(r[r >= 0], minlength=6) for r in ids])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="integer"):
        D.counts_from_class_ids(ids.astype(float), 6)


def test_accuracy_gap_agreement_and_majority():
    t = np.array([[6, 2, 0], [1, 1, 0], [0, 0, 0]])
    s = np.array([[2, 6, 0], [0, 4, 0], [1, 0, 0]])
    correct = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], bool)
    gap = D.accuracy_gap(t, s, correct)
    np.testing.assert_allclose(np.asarray(gap.teacher_accuracy)[:2], [0.75, 0.5])
    np.testing.assert_allclose(np.asarray(gap.student_accuracy), [0.25, 1.0, 1.0])
    np.testing.assert_allclose(np.asarray(gap.gap)[:2], [0.5, -0.5])
    assert np.isnan(np.asarray(gap.teacher_accuracy)[2])
    np.testing.assert_allclose(np.asarray(D.reference_agreement(s, correct)), [0.25, 1.0, 1.0])
    # Majority vote; the 1-1 tie in row 1 goes to class 0 (wrong); an empty row is not correct.
    np.testing.assert_array_equal(np.asarray(D.majority_correct(t, correct)), [True, False, False])
    np.testing.assert_array_equal(np.asarray(D.majority_correct(s, correct)), [False, True, True])
    # A padding class is never correct nor counted.
    mask = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(D.reference_agreement(t, correct, mask))[:2], [1.0, 0.5])


# ----------------------------------------------------------------------------- statistical tests


def test_permutation_pvalue_matches_exact_hypergeometric_test():
    # Two classes: under H0 the teacher's count of class 0 is hypergeometric; the exact p-value is
    # P(|T/nt - (K-T)/ns| >= observed). The Monte-Carlo p-value must agree within its error.
    nt = ns = 16
    t = np.array([[12, 4], [9, 7], [16, 0], [8, 8], [16, 0]])
    s = np.array([[6, 10], [7, 9], [10, 6], [8, 8], [0, 16]])
    b = 3999
    pv = np.asarray(D.delta_permutation_pvalue(jax.random.key(0), t, s, num_permutations=b))
    for i in range(len(t) - 1):
        k = t[i, 0] + s[i, 0]
        obs = abs(t[i, 0] / nt - s[i, 0] / ns)
        x = np.arange(0, min(k, nt) + 1)
        tv = np.abs(x / nt - (k - x) / ns)
        exact = stats.hypergeom(nt + ns, k, nt).pmf(x)[tv >= obs - 1e-9].sum()
        assert abs(pv[i] - exact) < 0.025, (i, pv[i], exact)
    # Disjoint answers: the exact p-value is 2 / C(32, 16) ~ 3e-9, so no permutation is as extreme.
    np.testing.assert_allclose(pv[-1], 1 / (b + 1))


def test_permutation_test_is_calibrated_under_h0():
    # Pairs drawn from one distribution: the rejection rate at level 0.05 is at most nominal
    # (conservative with ties) and about nominal with randomised ties. 1000 prompts: SE ~ 0.007.
    rng = np.random.default_rng(0)
    probs = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    t = rng.multinomial(16, probs, size=1000)
    s = rng.multinomial(16, probs, size=1000)
    level = 0.05
    p_cons = np.asarray(D.delta_permutation_pvalue(jax.random.key(0), t, s, num_permutations=99))
    p_rand = np.asarray(
        D.delta_permutation_pvalue(jax.random.key(0), t, s, num_permutations=99, randomize_ties=True)
    )
    rate_cons = (p_cons <= level).mean()
    rate_rand = (p_rand <= level).mean()
    assert 0.015 <= rate_cons <= level + 0.02, rate_cons
    assert abs(rate_rand - level) <= 0.022, rate_rand  # a loose check; the exact ones follow


# Exact reference for two answer classes. A prompt's table is (teacher x of n_t in class 0, student
# k - x of n_s). Under H0 (one shared distribution), given the pooled k the teacher count of a
# random re-split is hypergeometric(n_t + n_s, k, n_t), so the B Monte-Carlo statistics are i.i.d.
# and (#greater, #equal) than the observed Δ is multinomial. The p-value is (rank) / (B + 1) with
# rank = 1 + #greater + U: U = #equal for the conservative rule, U uniform on {0..#equal} for
# randomised ties. Both distributions are enumerated exactly below.


def _two_class_delta_key(x, k, nt, ns, metric):
    """A value per teacher count ``x`` that is equal exactly where Δ ties (TV: an integer)."""
    x = np.asarray(x, np.int64)
    if metric == "tv":
        return np.abs(x * ns - (k - x) * nt)  # = n_t n_s |x/n_t - (k-x)/n_s|
    p = np.stack([x / nt, 1 - x / nt], -1)
    q = np.stack([(k - x) / ns, 1 - (k - x) / ns], -1)
    m = (p + q) / 2
    js = 0.5 * (xlogy(p, p / np.where(m > 0, m, 1)).sum(-1) + xlogy(q, q / np.where(m > 0, m, 1)).sum(-1))
    return np.round(js / np.log(2), 9)


def _exact_rank_pmf(x0, k, nt, ns, b, metric="tv", randomize=True):
    """``[B + 1]``: P(rank = r), r = 1..B+1, of the Monte-Carlo p-value ``rank / (B + 1)`` given the
    observed teacher count ``x0`` of class 0 and the pooled count ``k``."""
    xs = np.arange(max(0, k - ns), min(k, nt) + 1)
    pmf = stats.hypergeom(nt + ns, k, nt).pmf(xs)
    d, d0 = _two_class_delta_key(xs, k, nt, ns, metric), _two_class_delta_key(x0, k, nt, ns, metric)
    q_gt, q_eq, q_lt = pmf[d > d0].sum(), pmf[d == d0].sum(), pmf[d < d0].sum()
    g, e = np.meshgrid(np.arange(b + 1), np.arange(b + 1), indexing="ij")
    ok = g + e <= b
    rest = np.where(ok, b - g - e, 0)
    log_w = (gammaln(b + 1) - gammaln(g + 1) - gammaln(e + 1) - gammaln(rest + 1)
             + xlogy(g, q_gt) + xlogy(e, q_eq) + xlogy(rest, q_lt))
    w = np.where(ok, np.exp(log_w), 0.0)  # P(#greater = g, #equal = e)
    out = np.zeros(b + 2)
    for gi, ei in zip(*np.nonzero(ok), strict=True):
        if randomize:
            out[gi + 1 : gi + ei + 2] += w[gi, ei] / (ei + 1)
        else:
            out[gi + ei + 1] += w[gi, ei]
    return out[1:]


def _assert_ranks_follow(pvalues, pmf, b, what):
    """p-values on the grid r / (B + 1), with rank counts passing a chi-square test against ``pmf``."""
    ranks = np.asarray(pvalues, np.float64) * (b + 1)
    np.testing.assert_allclose(ranks, np.round(ranks), atol=1e-3, err_msg=f"{what}: p off the r/(B+1) grid")
    counts = np.bincount(np.round(ranks).astype(int) - 1, minlength=b + 1)
    assert counts.size == b + 1, what
    expected = pmf * len(ranks)
    assert not counts[pmf < 1e-12].any(), (what, "ranks of probability 0", counts, np.round(expected, 1))
    big = expected >= 5  # pool the sparse ranks into one bin
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 1e-9
    if keep.sum() > 1:
        pv = stats.chisquare(obs[keep], exp[keep]).pvalue
        assert pv > 1e-4, (what, pv, counts, np.round(expected, 1))


# (n_t, n_s, pooled k, observed teacher count x0): ties with the mirror table, Δ = 0 (every
# re-split ties or exceeds), a Δ in the tail, unequal sample sizes.
TWO_CLASS_TABLES = [(8, 8, 8, 6), (8, 8, 8, 4), (8, 8, 7, 1), (6, 10, 7, 4)]


@pytest.mark.parametrize("metric", ["tv", "js"])
def test_permutation_pvalues_follow_the_exact_two_class_distribution(metric):
    """Given the table, the p-value's distribution over the Monte-Carlo draws is known exactly (see
    above); 2500 replicas of each table check it rank by rank, for both tie rules. A tie rank off
    by one or a mid-p rule (ties counted half) moves mass between ranks and fails here."""
    b, reps = 19, 2500
    t = np.concatenate([np.tile([[x0, nt - x0]], (reps, 1)) for nt, ns, k, x0 in TWO_CLASS_TABLES])
    s = np.concatenate([np.tile([[k - x0, ns - k + x0]], (reps, 1)) for nt, ns, k, x0 in TWO_CLASS_TABLES])
    for randomize in (True, False):
        pv = np.asarray(D.delta_permutation_pvalue(jax.random.key(7), t, s, metric=metric, num_permutations=b,
                                                   randomize_ties=randomize))
        for i, (nt, ns, k, x0) in enumerate(TWO_CLASS_TABLES):
            pmf = _exact_rank_pmf(x0, k, nt, ns, b, metric, randomize)
            _assert_ranks_follow(pv[i * reps : (i + 1) * reps], pmf, b, (metric, randomize, nt, ns, k, x0))
    # The reference itself: averaged over the observed table under H0, randomised ranks are exactly
    # uniform (size = level at every r / (B + 1)); the conservative rule never exceeds the level.
    for nt, ns, k, _ in TWO_CLASS_TABLES:
        xs = np.arange(max(0, k - ns), min(k, nt) + 1)
        h0 = stats.hypergeom(nt + ns, k, nt).pmf(xs)
        rand = sum(w * _exact_rank_pmf(x, k, nt, ns, b, metric) for x, w in zip(xs, h0, strict=True))
        cons = sum(w * _exact_rank_pmf(x, k, nt, ns, b, metric, False) for x, w in zip(xs, h0, strict=True))
        np.testing.assert_allclose(rand, 1 / (b + 1), rtol=1e-9)
        assert (np.cumsum(cons) <= np.arange(1, b + 2) / (b + 1) + 1e-12).all()


def test_randomised_permutation_test_exact_size_and_power():
    """Prompts drawn under H0 and under a shift (two classes, n_t = n_s = 12, B = 19): the rejection
    rate at level 0.1 (rank <= 2) must equal its exact value, 0.1 under H0 and the power computed
    from the binomial tables under the shift, within 4 standard errors (4000 prompts, SE <= 0.008)."""
    n, b, rows, level_rank = 12, 19, 4000, 2
    rng = np.random.default_rng(3)
    for p_t, p_s in ((0.4, 0.4), (0.75, 0.3)):
        xt, xs = rng.binomial(n, p_t, rows), rng.binomial(n, p_s, rows)
        pv = np.asarray(D.delta_permutation_pvalue(
            jax.random.key(11), np.stack([xt, n - xt], 1), np.stack([xs, n - xs], 1), num_permutations=b,
            randomize_ties=True))
        # exact: P(rank <= 2) = sum over the tables of P(table) P(rank <= 2 | table)
        exact = sum(
            stats.binom.pmf(a, n, p_t) * stats.binom.pmf(c, n, p_s)
            * _exact_rank_pmf(a, a + c, n, n, b)[:level_rank].sum()
            for a in range(n + 1) for c in range(n + 1)
        )
        rate = (pv <= level_rank / (b + 1) + 1e-6).mean()
        se = np.sqrt(exact * (1 - exact) / rows)
        assert abs(rate - exact) <= 4 * se, (p_t, p_s, rate, exact)
        if p_t == p_s:
            np.testing.assert_allclose(exact, level_rank / (b + 1), rtol=1e-9)  # exact size under H0
        else:
            assert exact > 0.6  # the shift is really detectable, so the comparison has teeth


def test_posterior_delta_exceeds_matches_numpy_monte_carlo():
    t = np.array([[10, 6, 0], [16, 0, 0], [200, 200, 0], [400, 0, 0], [0, 0, 0]])
    s = np.array([[6, 10, 0], [0, 16, 0], [200, 200, 0], [0, 400, 0], [3, 0, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]], bool)
    got = np.asarray(D.posterior_delta_exceeds(jax.random.key(0), t, s, mask, epsilon=0.1, num_draws=4000))
    rng = np.random.default_rng(0)
    for i in range(4):
        real = mask[i]
        pt = rng.dirichlet(t[i][real] + 0.5, size=20000)
        ps = rng.dirichlet(s[i][real] + 0.5, size=20000)
        ref = (0.5 * np.abs(pt - ps).sum(1) > 0.1).mean()
        assert abs(got[i] - ref) < 0.03, (i, got[i], ref)
    assert got[1] > 0.99 and got[2] < 0.01 and got[3] > 0.99
    assert np.isnan(got[4])  # no teacher samples
    with pytest.raises(ValueError, match="alpha"):
        D.posterior_delta_exceeds(jax.random.key(0), t, s, alpha=0.0)


def test_zero_delta_test_methods_agree_on_clear_cases():
    # Shapes and sizes match the tests above so the jitted kernels are reused (no recompilation).
    t = np.array([[8, 8], [16, 0], [0, 0], [12, 4], [10, 6]])
    s = np.array([[8, 8], [0, 16], [4, 4], [4, 12], [10, 6]])
    ex = D.zero_delta_test(t, s)
    np.testing.assert_array_equal(np.asarray(ex.zero), [True, False, False, False, True])
    np.testing.assert_array_equal(np.asarray(ex.valid), [True, True, False, True, True])
    perm = D.zero_delta_test(t, s, method="permutation", key=jax.random.key(0), num_samples=3999)
    np.testing.assert_array_equal(np.asarray(perm.zero), [True, False, False, False, True])
    np.testing.assert_allclose(np.asarray(perm.value)[[0, 4]], 1.0)
    big_t = np.array([[200, 200, 0], [400, 0, 0], [0, 0, 0], [300, 100, 0], [16, 0, 0]])
    big_s = np.array([[200, 200, 0], [0, 400, 0], [3, 0, 0], [100, 300, 0], [16, 0, 0]])
    mask = np.array([[1, 1, 0]] * 5, bool)
    post = D.zero_delta_test(
        big_t, big_s, mask, method="posterior", key=jax.random.key(0), num_samples=4000, epsilon=0.1
    )
    np.testing.assert_array_equal(np.asarray(post.zero), [True, False, False, False, True])
    with pytest.raises(ValueError, match="needs a jax.random key"):
        D.zero_delta_test(t, s, method="permutation")
    with pytest.raises(ValueError, match="unknown zero-delta method 'bayes'"):
        D.zero_delta_test(t, s, method="bayes")


# ----------------------------------------------------------------------------- summaries


def test_proportion_intervals_reference_values():
    np.testing.assert_allclose(D.proportion_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(D.proportion_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(
        D.proportion_interval(5, 10, method="clopper-pearson"), (0.1871, 0.8129), atol=1e-4
    )
    np.testing.assert_allclose(
        D.proportion_interval(0, 10, method="clopper-pearson"), (0.0, 0.3085), atol=1e-4
    )
    assert np.isnan(D.proportion_interval(0, 0)[0])
    with pytest.raises(ValueError, match="interval method"):
        D.proportion_interval(1, 2, method="exact")


def test_zero_delta_summary_per_group():
    zero = np.array([1, 1, 0, 0, 1, 0], bool)
    valid = np.array([1, 1, 1, 1, 1, 0], bool)
    out = D.zero_delta_summary(
        zero, {"dataset": ["chartqa"] * 3 + ["docvqa"] * 3, "category": [0, 1, 0, 1, 0, 1]}, valid=valid
    )
    assert (
        out["overall"]["prompts"] == 5
        and out["overall"]["zero_delta"] == 3
        and out["overall"]["skipped"] == 1
    )
    assert out["overall"]["fraction"] == pytest.approx(0.6)
    lo, hi = D.proportion_interval(3, 5)
    assert out["overall"]["ci_low"] == pytest.approx(lo) and out["overall"]["ci_high"] == pytest.approx(hi)
    assert out["dataset"]["chartqa"]["fraction"] == pytest.approx(2 / 3)
    assert out["dataset"]["docvqa"]["prompts"] == 2 and out["dataset"]["docvqa"]["skipped"] == 1
    assert out["category"][0]["zero_delta"] == 2 and out["category"][1]["zero_delta"] == 1
    with pytest.raises(ValueError, match="group 'dataset' has 2 labels for 6 prompts"):
        D.zero_delta_summary(zero, {"dataset": ["a", "b"]})
