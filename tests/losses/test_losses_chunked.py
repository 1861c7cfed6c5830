"""Chunked divergences from hidden states equal the unchunked ones, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

from jdelta.losses import (
    chunked_token_divergence,
    token_divergence,
)

B, T, HS, HT, V, VREAL = 2, 37, 16, 24, 300, 290


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(r.normal(size=s).astype(np.float32) * scale)
    sh, sw = f(B, T, HS), f(HS, V, scale=0.4)
    th, tw = f(B, T, HT), f(HT, V, scale=0.4)
    mask = jnp.asarray((r.uniform(size=(B, T)) < 0.8).astype(np.float32))
    cot = f(B, T)  # a random cotangent, so every position's gradient is checked
    return sh, sw, th, tw, mask, cot


def _naive(sh, sw, th, tw, mask, **kw):
    out = token_divergence(sh @ sw, th @ tw, **kw)  # float64 in, float64 out under enable_x64
    return jnp.where(mask > 0, out, 0.0)


@pytest.mark.parametrize(
    "kind,beta,temperature,chunk_size,backward",
    [
        ("reverse_kl", 0.5, 1.0, 8, "tiled"),
        ("forward_kl", 0.5, 0.7, 8, "tiled"),
        ("jsd", 0.3, 1.0, 8, "tiled"),
        ("jsd", 1.0, 0.7, 16, "tiled"),
        ("reverse_kl", 0.5, 0.7, 8, "remat"),
        ("forward_kl", 0.5, 1.0, 64, "remat"),
    ],
)
def test_chunked_equals_unchunked_value_and_grad(kind, beta, temperature, chunk_size, backward):
    sh, sw, th, tw, mask, cot = _inputs()
    kw = dict(kind=kind, beta=beta, temperature=temperature, vocab_size=VREAL)
    # vocab_tile=64: the tiled backward runs over 5 strided tiles of 60 columns (V = 300)
    chunked = lambda sh, sw, th, tw: chunked_token_divergence(
        sh, sw, th, tw, mask, chunk_size=chunk_size, backward=backward, vocab_tile=64, **kw
    )
    naive = lambda sh, sw, th, tw: _naive(sh, sw, th, tw, mask, **kw)
    a, b = jax.jit(chunked)(sh, sw, th, tw), jax.jit(naive)(sh, sw, th, tw)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert float(jnp.abs(b).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(mask) == 0], 0.0)

    # Gradients against the unchunked loss evaluated in float64 (the truth), so that float32
    # summation-order noise of the reference itself does not count against the chunked version.
    loss_c = lambda *args: jnp.sum(chunked(*args) * cot)
    gc = jax.jit(jax.grad(loss_c, argnums=(0, 1, 2, 3)))(sh, sw, th, tw)
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
        args64 = [f64(x) for x in (sh, sw, th, tw)]
        loss_n = lambda *args: jnp.sum(_naive(*args, f64(mask), **kw) * f64(cot))
        gn = [np.asarray(g) for g in jax.jit(jax.grad(loss_n, argnums=(0, 1)))(*args64)]
    for x, y in zip(gc[:2], gn, strict=True):
        # <= 1e-5 absolute (rtol covers float32 rounding of the larger LM-head entries, |g| ~ 10)
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-6)
        assert np.abs(y).max() > 1e-3
    # the teacher gets no gradient
    np.testing.assert_array_equal(np.asarray(gc[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(gc[3]), 0.0)


def test_chunked_reverse_kl_matches_numpy():
    sh, sw, th, tw, mask, _ = _inputs(1)
    got = chunked_token_divergence(sh, sw, th, tw, None, chunk_size=16, vocab_size=VREAL)
    ls = log_softmax((np.asarray(sh, np.float64) @ np.asarray(sw, np.float64))[..., :VREAL], -1)
    lt = log_softmax((np.asarray(th, np.float64) @ np.asarray(tw, np.float64))[..., :VREAL], -1)
    np.testing.assert_allclose(got, np.sum(np.exp(ls) * (ls - lt), -1), atol=1e-5, rtol=0)


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
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_token_divergence(sh, sw, th, tw, mask, kind="tv")
    with pytest.raises(ValueError, match="backward"):
        chunked_token_divergence(sh, sw, th, tw, mask, backward="none")
