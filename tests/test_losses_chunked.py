"""Chunked divergences from hidden states equal the unchunked ones, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from jdelta.losses import (
    chunked_token_divergence,
    chunked_topk_forward_kl,
    token_divergence,
    topk_forward_kl,
)

B, T, HS, HT, V, VREAL = 2, 37, 16, 24, 300, 290


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(r.normal(size=s).astype(np.float32) * scale)
    sh, sw = f(B, T, HS), f(HS, V, scale=0.5)
    th, tw = f(B, T, HT), f(HT, V, scale=0.5)
    mask = jnp.asarray((r.uniform(size=(B, T)) < 0.8).astype(np.float32))
    cot = f(B, T)  # a random cotangent, so every position's gradient is checked
    return sh, sw, th, tw, mask, cot


def _naive(sh, sw, th, tw, mask, **kw):
    out = token_divergence(sh @ sw, th @ tw, **kw)
    return jnp.where(mask > 0, out, 0.0)


@pytest.mark.parametrize(
    "kind,beta,temperature", [("reverse_kl", 0.5, 1.0), ("forward_kl", 0.5, 0.7), ("jsd", 0.3, 1.0)]
)
@pytest.mark.parametrize("chunk_size", [8, 64])
def test_chunked_equals_unchunked_value_and_grad(kind, beta, temperature, chunk_size):
    sh, sw, th, tw, mask, cot = _inputs()
    kw = dict(kind=kind, beta=beta, temperature=temperature, vocab_size=VREAL)
    chunked = lambda sh, sw, th, tw: chunked_token_divergence(sh, sw, th, tw, mask, chunk_size=chunk_size, **kw)
    naive = lambda sh, sw, th, tw: _naive(sh, sw, th, tw, mask, **kw)
    a, b = jax.jit(chunked)(sh, sw, th, tw), jax.jit(naive)(sh, sw, th, tw)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert float(jnp.abs(b).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(mask) == 0], 0.0)

    loss_c = lambda *args: jnp.sum(chunked(*args) * cot)
    loss_n = lambda *args: jnp.sum(naive(*args) * cot)
    gc = jax.jit(jax.grad(loss_c, argnums=(0, 1, 2, 3)))(sh, sw, th, tw)
    gn = jax.jit(jax.grad(loss_n, argnums=(0, 1)))(sh, sw, th, tw)
    for x, y in zip(gc[:2], gn, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        assert float(jnp.abs(y).max()) > 1e-3
    # the teacher gets no gradient
    np.testing.assert_array_equal(np.asarray(gc[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(gc[3]), 0.0)


def test_chunked_reverse_kl_matches_numpy():
    sh, sw, th, tw, mask, _ = _inputs(1)
    got = chunked_token_divergence(sh, sw, th, tw, None, chunk_size=16, vocab_size=VREAL)
    ls = log_softmax((np.asarray(sh, np.float64) @ np.asarray(sw, np.float64))[..., :VREAL], -1)
    lt = log_softmax((np.asarray(th, np.float64) @ np.asarray(tw, np.float64))[..., :VREAL], -1)
    np.testing.assert_allclose(got, np.sum(np.exp(ls) * (ls - lt), -1), atol=1e-5, rtol=0)


def test_chunked_topk_forward_kl_equals_unchunked():
    sh, sw, th, tw, mask, cot = _inputs(2)
    lt = jax.nn.log_softmax((th @ tw)[..., :VREAL], -1)
    top_lp, top_ids = jax.lax.top_k(lt, 8)
    f_c = lambda sh, sw: jnp.sum(
        chunked_topk_forward_kl(sh, sw, top_lp, top_ids, mask, chunk_size=8, temperature=0.9, vocab_size=VREAL) * cot
    )
    f_n = lambda sh, sw: jnp.sum(
        jnp.where(mask > 0, topk_forward_kl(sh @ sw, top_lp, top_ids, temperature=0.9, vocab_size=VREAL), 0.0) * cot
    )
    np.testing.assert_allclose(jax.jit(f_c)(sh, sw), jax.jit(f_n)(sh, sw), atol=1e-4, rtol=1e-6)
    gc, gn = jax.jit(jax.grad(f_c, (0, 1)))(sh, sw), jax.jit(jax.grad(f_n, (0, 1)))(sh, sw)
    for x, y in zip(gc, gn, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


def test_chunked_bad_inputs_raise():
    sh, sw, th, tw, mask, _ = _inputs()
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        chunked_token_divergence(sh, sw, th, tw[:, :-4], mask)
    with pytest.raises(ValueError, match="hidden size"):
        chunked_token_divergence(sh, tw, th, tw, mask)
    with pytest.raises(ValueError, match="same"):
        chunked_token_divergence(sh[:, :-1], sw, th, tw, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_divergence(sh, sw, th, tw, mask, chunk_size=0)


def test_chunked_loss_and_grad_never_hold_full_logits():
    """Compiled temp memory of loss+grad: chunked is far below the naive [B, T, V] version."""
    b, t, h, v, c = 2, 256, 32, 4096, 16
    shapes = [
        jax.ShapeDtypeStruct((b, t, h), jnp.float32),
        jax.ShapeDtypeStruct((h, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t, h), jnp.float32),
        jax.ShapeDtypeStruct((h, v), jnp.float32),
    ]

    def temp(fn):
        g = jax.jit(jax.value_and_grad(lambda *a: fn(*a).mean(), argnums=(0, 1)))
        return g.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    chunked = temp(lambda sh, sw, th, tw: chunked_token_divergence(sh, sw, th, tw, chunk_size=c))
    naive = temp(lambda sh, sw, th, tw: token_divergence(sh @ sw, th @ tw))
    full_logits = b * t * v * 4
    assert naive >= full_logits  # the naive loss keeps at least one [B, T, V] buffer
    assert chunked < full_logits / 2, (chunked, naive)
    assert naive / chunked > 4, (chunked, naive)
