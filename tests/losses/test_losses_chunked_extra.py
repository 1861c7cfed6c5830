"""Chunked top-k forward KL, and the compiled memory of the chunked loss + gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from jdelta.losses import chunked_token_divergence, chunked_topk_forward_kl, token_divergence, topk_forward_kl

B, T, HS, V, VREAL = 2, 37, 16, 300, 290


def _inputs(seed):
    r = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(r.normal(size=s).astype(np.float32) * scale)
    sh, sw, th, tw = f(B, T, HS), f(HS, V, scale=0.4), f(B, T, 24), f(24, V, scale=0.4)
    mask = jnp.asarray((r.uniform(size=(B, T)) < 0.8).astype(np.float32))
    return sh, sw, th, tw, mask, f(B, T)


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

    naive = temp(lambda sh, sw, th, tw: token_divergence(sh @ sw, th @ tw))
    full_logits = b * t * v * 4
    assert naive >= 2 * full_logits  # the naive loss keeps [B, T, V] buffers for the backward pass
    tiled = temp(lambda sh, sw, th, tw: chunked_token_divergence(sh, sw, th, tw, chunk_size=c, vocab_tile=1024))
    assert tiled < full_logits / 2, (tiled, naive)
    assert naive / tiled > 8, (tiled, naive)
    remat = temp(lambda sh, sw, th, tw: chunked_token_divergence(sh, sw, th, tw, chunk_size=c, backward="remat"))
    assert remat < full_logits, (remat, naive)


def test_tiled_backward_under_a_sharded_mesh_matches_single_device():
    """FSDP x tensor mesh (4 x 2 host devices): LM heads sharded [embed->fsdp, vocab->tensor]."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("fsdp", "tensor"))
    r = np.random.default_rng(5)
    f = lambda *s, scale=1.0: jnp.asarray(r.normal(size=s).astype(np.float32) * scale)
    sh, sw, th, tw = f(4, 24, 16), f(16, 320, scale=0.4), f(4, 24, 8), f(8, 320, scale=0.4)
    cot = f(4, 24)

    def loss(sh, sw, th, tw):
        div = chunked_token_divergence(sh, sw, th, tw, chunk_size=8, vocab_size=300, vocab_tile=40)
        return jnp.sum(div * cot)

    vg = jax.value_and_grad(loss, argnums=(0, 1))
    ref_v, ref_g = jax.jit(vg)(sh, sw, th, tw)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (
        put(sh, P("fsdp", None, None)),
        put(sw, P("fsdp", "tensor")),
        put(th, P("fsdp", None, None)),
        put(tw, P("fsdp", "tensor")),
    )
    v, g = jax.jit(vg)(*args)
    np.testing.assert_allclose(v, ref_v, atol=1e-5, rtol=1e-6)
    for x, y in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-6)
