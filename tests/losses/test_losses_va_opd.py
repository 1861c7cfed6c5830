"""VA-OPD against a direct Python-loop reference of METHODS.md's definition."""

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdelta.losses import (
    high_count,
    high_va_mask,
    opd_loss,
    rollout_weights,
    va_opd_loss,
    va_opd_token_coefficients,
)

P, K, T = 3, 4, 20


def reference(lp, lpp, kl, mask, groups, lam=0.5, tau=1.0, frac=0.2, eps=1e-6):
    """Loops over prompts, rollouts and tokens; returns (loss, coefficients, extras)."""
    lp, lpp, kl = (np.asarray(x, np.float64) for x in (lp, lpp, kl))
    mask = np.asarray(mask).astype(bool)
    b = lp.shape[0]
    a = np.where(mask, np.maximum(lp - lpp, 0.0), 0.0)
    m = np.array([a[k][mask[k]].mean() for k in range(b)])
    w = np.zeros(b)
    for rows in groups:
        g = m[rows]
        z = (g - g.mean()) / (g.std() + eps) / tau  # np.std is the population std
        e = np.exp(z - z.max())
        w[rows] = e / e.sum()
    coef = np.zeros_like(kl)
    high = np.zeros(mask.shape, bool)
    for k in range(b):
        pos = list(np.flatnonzero(mask[k]))
        n_high = math.ceil(Fraction(str(frac)) * len(pos))
        order = sorted(pos, key=lambda i, k=k: -a[k, i])  # Python's sort is stable: ties keep token order
        hi, lo = order[:n_high], order[n_high:]
        high[k, hi] = True
        if lo:
            coef[k, hi] = w[k] * lam / len(hi)
            coef[k, lo] = w[k] * (1 - lam) / len(lo)
        else:
            coef[k, hi] = w[k] / len(hi)
    coef /= len(groups)
    return (coef * kl).sum(), coef, dict(a=a, m=m, w=w, high=high)


def _batch(seed, lengths=None):
    r = np.random.default_rng(seed)
    b = P * K
    if lengths is None:
        lengths = r.integers(1, T + 1, size=b)
        lengths[0], lengths[5], lengths[7] = 1, 15, T  # empty L group, exact ceil(0.2*15) = 3, full row
    start = r.integers(0, 3, size=b)
    mask = np.zeros((b, T), np.float32)
    for k in range(b):
        s = min(start[k], T - lengths[k])
        mask[k, s : s + lengths[k]] = 1
    # multiples of 1/64: the differences below are exact in float32, so ties are real ties
    lp = (np.round(np.log(r.uniform(0.05, 1.0, size=(b, T))) * 64) / 64).astype(np.float32)
    # quantised differences: many exact ties, many negatives (clipped to 0)
    lpp = (lp - r.choice([-0.5, 0.0, 0.25, 0.25, 0.75, 1.5], size=(b, T))).astype(np.float32)
    kl = r.uniform(0.0, 2.0, size=(b, T)).astype(np.float32)
    return lp, lpp, kl, mask


@functools.cache
def _jitted(lam, tau):
    def f(lp, lpp, kl, mask):
        loss_fn = lambda lp, kl: va_opd_loss(
            lp, lpp, kl, mask, rollouts_per_prompt=K, high_weight=lam, weight_temperature=tau
        )
        (loss, metrics), (g_lp, g_kl) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(lp, kl)
        coef = va_opd_token_coefficients(
            lp, lpp, mask, rollouts_per_prompt=K, high_weight=lam, weight_temperature=tau
        )
        return loss, metrics, g_lp, g_kl, coef

    return jax.jit(f)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam,tau", [(0.5, 1.0), (0.8, 0.5)])
def test_va_opd_matches_reference(seed, lam, tau):
    lp, lpp, kl, mask = _batch(seed)
    groups = [list(range(p * K, (p + 1) * K)) for p in range(P)]
    ref_loss, ref_coef, ex = reference(lp, lpp, kl, mask, groups, lam=lam, tau=tau)
    loss, metrics, g_lp, g_kl, coef = _jitted(lam, tau)(lp, lpp, kl, mask)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # gradient flows to the KL only, with exactly the reference coefficients
    np.testing.assert_allclose(g_kl, ref_coef, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(coef, ref_coef, atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(g_lp), 0.0)

    # the reference is not degenerate: weights are non-uniform, H and L both occur, and empty-L rows exist
    assert np.abs(ex["w"] - 1 / K).max() > 0.05
    assert (ref_coef[0] > 0).sum() == 1 and np.isclose(ref_coef[0].sum(), ex["w"][0] / P)

    # metrics
    m = mask.astype(bool)
    a, hi = ex["a"], ex["high"]
    lo = m & ~hi
    np.testing.assert_allclose(metrics["va_mean"], a[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["va_rollout_mean"], ex["m"].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["va_high_fraction"], hi.sum() / m.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["va_kl_high"], kl[hi].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["va_kl_low"], kl[lo].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["va_high_share"], a[hi].sum() / a.sum(), rtol=1e-5)
    ent = np.mean([-(ex["w"][g] * np.log(ex["w"][g])).sum() for g in groups])
    np.testing.assert_allclose(metrics["va_weight_entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(metrics["va_weight_max"], ex["w"].max(), rtol=1e-5)
    opd = np.mean([kl[k][m[k]].mean() for k in range(P * K)])
    np.testing.assert_allclose(metrics["opd_loss"], opd, rtol=1e-5)
    np.testing.assert_allclose(opd_loss(kl, mask), opd, rtol=1e-5)


def test_group_ids_layout_equals_prompt_major_layout():
    lp, lpp, kl, mask = _batch(3)
    perm = np.random.default_rng(0).permutation(P * K)
    gids = (np.arange(P * K) // K)[perm]
    a, _ = _jitted(0.5, 1.0)(lp, lpp, kl, mask)[:2]
    fn = jax.jit(lambda *x: va_opd_loss(*x[:4], group_ids=x[4], num_groups=P))
    b, _ = fn(lp[perm], lpp[perm], kl[perm], mask[perm], gids)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    # uneven groups (sizes 5, 4, 3) against the reference
    gids = np.array([0] * 5 + [1] * 4 + [2] * 3)
    groups = [list(np.flatnonzero(gids == g)) for g in range(3)]
    ref, _, _ = reference(lp, lpp, kl, mask, groups)
    got, _ = jax.jit(lambda *x: va_opd_loss(*x[:4], group_ids=x[4], num_groups=3))(lp, lpp, kl, mask, gids)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_high_group_ties_keep_token_order():
    va = np.array([[0.5, 1.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.ones_like(va)
    mask[0, -1] = 0  # 10 response tokens -> |H| = 2
    np.testing.assert_array_equal(np.flatnonzero(high_va_mask(va, mask, 0.2)[0]), [0, 1])
    np.testing.assert_array_equal(np.flatnonzero(high_va_mask(va, mask, 0.3)[0]), [0, 1, 2])
    # all-zero VA: the first ceil(0.2 n) response tokens, never prompt/padding positions
    z = np.zeros((1, 12), np.float32)
    m = np.zeros((1, 12), np.float32)
    m[0, 4:9] = 1
    np.testing.assert_array_equal(np.flatnonzero(high_va_mask(z, m, 0.2)[0]), [4])
    # -0.0 ties with +0.0
    neg0 = np.array([[-0.0, 0.0, -0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(np.flatnonzero(high_va_mask(neg0, np.ones_like(neg0), 0.4)[0]), [0, 1])


def test_high_count_is_exact_ceil():
    n = np.arange(0, 200)
    for frac in (0.2, 0.1, 0.3, 1.0, 0.35):
        ref = [math.ceil(Fraction(str(frac)) * int(x)) for x in n]
        np.testing.assert_array_equal(high_count(jnp.asarray(n), frac), ref)
    assert int(high_count(jnp.asarray([15]), 0.2)[0]) == 3


def test_rollout_weights():
    m = jnp.asarray([0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 2.0, 0.5], jnp.float32)
    gids = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1])
    w = np.asarray(rollout_weights(m, gids, 2))
    np.testing.assert_allclose(w[:4], 0.25, rtol=1e-6)  # equal VA -> uniform
    g = np.array([0.0, 1.0, 2.0, 0.5])
    z = (g - g.mean()) / (g.std() + 1e-6)
    np.testing.assert_allclose(w[4:], np.exp(z) / np.exp(z).sum(), rtol=1e-5)
    np.testing.assert_allclose(w[4:].sum(), 1.0, rtol=1e-6)


def test_bad_input():
    lp, lpp, kl, mask = _batch(4)
    with pytest.raises(ValueError, match="all zeros"):
        va_opd_loss(lp, lpp, kl, np.zeros_like(mask), rollouts_per_prompt=K)
    empty = mask.copy()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rollouts \[2\] have no response token"):
        va_opd_loss(lp, lpp, kl, empty, rollouts_per_prompt=K)
    with pytest.raises(ValueError, match="divide"):
        va_opd_loss(lp, lpp, kl, mask, rollouts_per_prompt=5)
    with pytest.raises(ValueError, match="exactly one"):
        va_opd_loss(lp, lpp, kl, mask)
    with pytest.raises(ValueError, match="must all be"):
        va_opd_loss(lp[:, :-1], lpp, kl, mask, rollouts_per_prompt=K)
    loss, _ = jax.jit(lambda m: va_opd_loss(lp, lpp, kl, m, rollouts_per_prompt=K))(np.zeros_like(mask))
    assert np.isnan(loss)
