"""ViCuR's loss (METHODS.md) against a NumPy reference: both clamps (k1 to ±10, log-ratio to ±20)
and both clips (PPO 0.2/0.2, dual clip 3) active; gradient against finite differences; token-mean
over the global batch under gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdelta.losses import vicur_advantage, vicur_loss


def reference(lp_new, lp_old, lp_t, mask, *, adv=None, eps=0.2, c=3.0, clamp=10.0, num_tokens=None):
    """float64 NumPy, written from METHODS.md / verl's compute_policy_loss_vanilla. ``adv`` given:
    the surrogate with the advantage held fixed (what stop-gradient differentiates)."""
    lp_new, lp_old, lp_t, mask = (np.asarray(x, np.float64) for x in (lp_new, lp_old, lp_t, mask))
    if adv is None:
        adv = -np.clip(lp_new - lp_t, -clamp, clamp)  # k1 from the *current* log-probs
    ratio = np.exp(np.clip(lp_new - lp_old, -20.0, 20.0))
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    clip1 = np.maximum(pg1, pg2)
    per = np.where(adv < 0, np.minimum(clip1, -adv * c), clip1)
    return (per * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)


def make_batch(seed):
    """[4, 16] log-probs with every regime present (and away from the kinks, for finite differences)."""
    r = np.random.default_rng(seed)
    shape = (4, 16)
    lp_old = np.log(r.uniform(1e-4, 1.0, size=shape))
    lp_new = lp_old + r.normal(scale=0.3, size=shape)  # ratios inside and outside [0.8, 1.2]
    lp_t = lp_new + r.normal(scale=2.0, size=shape)
    lp_t[0, 0], lp_new[0, 0] = -15.0, -1.0  # k1 = 14 > 10: clamped, A = -10
    lp_t[0, 1], lp_new[0, 1] = -0.5, -13.0  # k1 = -12.5 < -10: clamped, A = 10
    lp_old[1, 0], lp_new[1, 0], lp_t[1, 0] = -30.0, -2.0, -1.0  # log-ratio 28 > 20: clamped; A = 1, PPO clip
    lp_old[1, 1], lp_new[1, 1], lp_t[1, 1] = -1.0, -26.0, -20.0  # log-ratio -25 < -20: clamped; A = 6
    lp_old[1, 2], lp_new[1, 2], lp_t[1, 2] = -105.0, -5.0, -5.0  # exp(100) overflows f32; A = 0: 0 * inf without the clamp
    lp_old[2, 0], lp_new[2, 0], lp_t[2, 0] = -3.0, -1.5, -4.0  # A = -2.5 < 0, ratio e^1.5 > 3: dual clip
    mask = (r.uniform(size=shape) < 0.85).astype(np.float32)
    mask[:3, :3] = 1
    return [x.astype(np.float32) for x in (lp_new, lp_old, lp_t)] + [mask]


def away_from_kinks(lp_new, lp_old, lp_t, margin=1e-3):
    ratio = np.exp(np.clip(lp_new - lp_old, -30, 30))
    near = [np.abs(ratio - b) / b < margin for b in (0.8, 1.2, 3.0)]
    near += [np.abs(np.abs(lp_new - lp_old) - 20) < margin, np.abs(np.abs(lp_new - lp_t) - 10) < margin]
    return not np.any(np.logical_or.reduce(near))


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_numpy_with_every_clamp_and_clip_active(seed):
    lp_new, lp_old, lp_t, mask = make_batch(seed)
    loss, metrics = jax.jit(vicur_loss)(lp_new, lp_old, lp_t, mask)
    assert np.isfinite(float(loss))  # the token with exp(100) (A = 0) would be 0 * inf without the ±20 clamp
    np.testing.assert_allclose(float(loss), reference(lp_new, lp_old, lp_t, mask), rtol=1e-5, atol=1e-6)
    real = mask.astype(bool)
    assert (np.abs(lp_new - lp_t)[real] > 10).any() and (np.abs(lp_new - lp_old)[real] > 20).any()
    assert 0 < float(metrics["vicur_clip_fraction"]) < 1
    assert float(metrics["vicur_dual_clip_fraction"]) > 0
    np.testing.assert_allclose(float(metrics["vicur_clamped_fraction"]),
                               (np.abs(lp_new - lp_t)[real] > 10).mean(), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_matches_finite_differences(seed):
    """d loss / d lp_new against central differences of the reference with the advantage held fixed
    (the advantage is a stop-gradient quantity); no gradient reaches lp_old or the teacher."""
    lp_new, lp_old, lp_t, mask = make_batch(seed)
    assert away_from_kinks(lp_new, lp_old, lp_t)
    grad = np.asarray(jax.jit(jax.grad(lambda x: vicur_loss(x, lp_old, lp_t, mask)[0]))(jnp.asarray(lp_new)))
    assert np.all(np.isfinite(grad))
    adv = -np.clip(lp_new.astype(np.float64) - lp_t, -10, 10)
    x0, h = lp_new.astype(np.float64), 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        up, down = x0.copy(), x0.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (reference(up, lp_old, lp_t, mask, adv=adv) - reference(down, lp_old, lp_t, mask, adv=adv)) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-5, rtol=1e-4)
    assert (grad[mask > 0] == 0).sum() >= 4  # clipped, dual-clipped and ratio-clamped tokens have none
    assert (grad[mask > 0] != 0).sum() > 20
    g_old = jax.grad(lambda x: vicur_loss(jnp.asarray(lp_new), x, lp_t, mask)[0])(jnp.asarray(lp_old))
    g_t = jax.grad(lambda x: vicur_loss(jnp.asarray(lp_new), lp_old, x, mask)[0])(jnp.asarray(lp_t))
    np.testing.assert_array_equal(np.asarray(g_old), 0.0)
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)


def test_gradient_accumulation_normalises_by_the_global_token_count():
    """Two micro-batches with different token counts: with num_tokens = the global count their losses
    and gradients add up to the full batch's; per-micro-batch means would not."""
    lp_new, lp_old, lp_t, mask = make_batch(2)
    mask[2:, 8:] = 0  # the second micro-batch holds fewer tokens
    total = float(mask.sum())
    fn = jax.value_and_grad(lambda x, o, t, m, n: vicur_loss(x, o, t, m, num_tokens=n)[0])
    full_loss, full_grad = fn(lp_new, lp_old, lp_t, mask, None)
    parts = [fn(lp_new[s], lp_old[s], lp_t[s], mask[s], total) for s in (slice(0, 2), slice(2, 4))]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(full_loss), rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grad, rtol=1e-6, atol=1e-9)
    local = sum(float(vicur_loss(lp_new[s], lp_old[s], lp_t[s], mask[s])[0]) for s in (slice(0, 2), slice(2, 4)))
    assert abs(local / 2 - float(full_loss)) > 1e-3


def test_on_policy_gradient_is_minus_advantage_over_n():
    """At lp_new == lp_old the gradient is -A / N with A = lp_T - lp_new: descent raises log p where
    the hinted teacher is more confident than the student."""
    lp = jnp.full((1, 4), -2.0)
    lp_t = jnp.asarray([[-3.0, -2.0, -1.5, -0.5]])  # A = -1, 0, 0.5, 1.5
    g = np.asarray(jax.grad(lambda x: vicur_loss(x, lp, lp_t, jnp.ones((1, 4)))[0])(lp))[0]
    np.testing.assert_allclose(g, -np.array([-1.0, 0.0, 0.5, 1.5]) / 4, atol=1e-7)


def test_advantage_uses_current_logprobs_and_the_k1_clamp_only():
    """No log-prob clamp (verl's -10 floor is for its top-k mode): A = -(lp_S - lp_T) clamped to ±10."""
    a = vicur_advantage(jnp.asarray([[-0.1, -30.0, -2.0, -25.0]]), jnp.asarray([[-30.0, -0.1, -1.0, -24.0]]))
    np.testing.assert_allclose(a, [[-10.0, 10.0, 1.0, 1.0]], rtol=1e-6)  # -25 vs -24: no -10 floor
    a = vicur_advantage(jnp.asarray([[-0.1]]), jnp.asarray([[-30.0]]), loss_clamp=None)
    np.testing.assert_allclose(a, [[-29.9]], rtol=1e-6)


def test_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="all zeros"):
        vicur_loss(x, x, x, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="must all be"):
        vicur_loss(x, x, x[:, :2], jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        vicur_loss(x, x, x, jnp.ones((2, 3)), clip_ratio_c=1.0)
    assert np.isnan(jax.jit(lambda m: vicur_loss(x, x, x, m)[0])(jnp.zeros((2, 3))))
