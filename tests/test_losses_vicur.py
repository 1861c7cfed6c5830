"""ViCuR's clipped sampled-token advantage surrogate against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdelta.losses import vicur_advantage, vicur_loss


def reference(lp_new, lp_old, lp_t, mask, eps=0.2, c=3.0, lp_min=-10.0, clamp=10.0):
    """Returns (loss, d loss / d lp_new) with VeRL's vanilla PPO loss and the authors' clamps."""
    lp_new, lp_old, lp_t = (np.asarray(x, np.float64) for x in (lp_new, lp_old, lp_t))
    k1 = np.clip(np.maximum(lp_old, lp_min) - np.maximum(lp_t, lp_min), -clamp, clamp)
    adv = -k1
    ratio = np.exp(np.clip(lp_new - lp_old, -20, 20))
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    per = np.maximum(l1, l2)
    d_per = np.where(l1 >= l2, -adv * ratio, 0.0)  # only the unclipped branch depends on lp_new
    dual = (adv < 0) & (-adv * c < per)
    per = np.where(dual, -adv * c, per)
    d_per = np.where(dual, 0.0, d_per)
    n = mask.sum()
    return (per * mask).sum() / n, d_per * mask / n


def _batch(seed):
    r = np.random.default_rng(seed)
    shape = (4, 16)
    lp_old = np.log(r.uniform(1e-6, 1.0, size=shape))
    lp_old[0, :3] = [-12.0, -25.0, -0.5]  # below the log-prob clamp
    lp_t = lp_old + r.normal(scale=2.0, size=shape)
    lp_t[1, :2] = [-30.0, -0.01]  # large |k1|: hits the loss clamp
    lp_new = lp_old + r.normal(scale=0.3, size=shape)  # ratios both inside and outside [0.8, 1.2]
    lp_t[2, 0], lp_old[2, 0], lp_new[2, 0] = -9.0, -1.0, 1.0  # A = -8 < 0 and ratio e^2 > 3: dual clip
    mask = (r.uniform(size=shape) < 0.85).astype(np.float32)
    mask[2, 0] = 1
    return [x.astype(np.float32) for x in (lp_new, lp_old, lp_t)] + [mask]


@pytest.mark.parametrize("seed", [0, 1])
def test_vicur_loss_and_gradient_match_numpy(seed):
    lp_new, lp_old, lp_t, mask = _batch(seed)
    ref, ref_grad = reference(lp_new, lp_old, lp_t, mask)
    fn = jax.jit(jax.value_and_grad(lambda x: vicur_loss(x, lp_old, lp_t, mask), has_aux=True))
    (loss, metrics), grad = fn(jnp.asarray(lp_new))
    np.testing.assert_allclose(loss, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # every regime is exercised: clipped, unclipped, dual-clipped, clamped
    assert 0 < float(metrics["vicur_clip_fraction"]) < 1
    assert float(metrics["vicur_clamped_fraction"]) > 0
    assert (np.asarray(grad) == 0).sum() > (mask == 0).sum()
    # the advantage is a stop-gradient quantity: no gradient to old or teacher log-probs
    g_old = jax.grad(lambda x: vicur_loss(jnp.asarray(lp_new), x, lp_t, mask)[0])(jnp.asarray(lp_old))
    g_t = jax.grad(lambda x: vicur_loss(jnp.asarray(lp_new), lp_old, x, mask)[0])(jnp.asarray(lp_t))
    np.testing.assert_array_equal(np.asarray(g_old), 0.0)
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)


def test_on_policy_gradient_is_minus_advantage_and_grows_with_it():
    """At lp_new == lp_old the gradient is -A / N: a larger A pushes the sampled token's log-prob up more."""
    lp_old = jnp.full((1, 4), -2.0)
    lp_t = jnp.asarray([[-3.0, -2.0, -1.5, -0.5]])  # A = -1, 0, 0.5, 1.5
    mask = jnp.ones((1, 4))
    g = np.asarray(jax.grad(lambda x: vicur_loss(x, lp_old, lp_t, mask)[0])(lp_old))[0]
    np.testing.assert_allclose(g, -np.array([-1.0, 0.0, 0.5, 1.5]) / 4, atol=1e-7)
    assert g[3] < g[2] < g[1] < g[0]  # gradient descent raises log p most where A is largest
    # a step of gradient descent raises the loss-weighted log-prob of good tokens, lowers bad ones
    new = lp_old - 0.1 * g
    assert float(new[0, 3]) > -2.0 > float(new[0, 0])


def test_advantage_clamps_and_errors():
    a = vicur_advantage(jnp.asarray([[-30.0, -0.1, -1.0]]), jnp.asarray([[-0.1, -30.0, -2.0]]))
    np.testing.assert_allclose(a, [[-9.9, 9.9, 1.0]], rtol=1e-6)
    a = vicur_advantage(
        jnp.asarray([[-30.0, -0.1]]), jnp.asarray([[-0.1, -30.0]]), log_prob_min=None, loss_clamp=10.0
    )
    np.testing.assert_allclose(a, [[-10.0, 10.0]], rtol=1e-6)
    a = vicur_advantage(jnp.asarray([[-30.0]]), jnp.asarray([[-0.1]]), log_prob_min=None, loss_clamp=None)
    np.testing.assert_allclose(a, [[-29.9]], rtol=1e-6)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="all zeros"):
        vicur_loss(x, x, x, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="must all be"):
        vicur_loss(x, x, x[:, :2], jnp.ones((2, 3)))
    assert np.isnan(jax.jit(lambda m: vicur_loss(x, x, x, m)[0])(jnp.zeros((2, 3))))
