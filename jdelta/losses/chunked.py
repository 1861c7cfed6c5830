"""Per-token divergences computed from hidden states, a chunk of positions at a time.

The student and teacher forward passes give final hidden states ``[B, T, H_s]`` /
``[B, T, H_t]`` (``Qwen3VLOutput.hidden_states``) and LM heads ``[H_s, V]`` / ``[H_t, V]``
(``model.lm_head_weight()``). The logits of both models are formed here for ``chunk_size``
positions at a time, never as ``[B, T, V]``:

* ``backward="tiled"`` (default): a custom VJP. The forward pass keeps only per-token
  statistics; the backward pass recomputes both models' logits on ``[B, chunk, V / n]`` tiles
  (vocabulary tiles outer, sequence chunks inner) and writes the LM-head gradient tile by tile,
  so neither ``[B, T, V]`` nor an ``[H, V]`` float32 temporary exists.
* ``backward="remat"``: ``jax.checkpoint`` of each chunk under ``lax.map``, differentiated by
  JAX (the backward pass rematerialises the chunk's logits).

Gradients reach the student hidden states and the student LM head; the teacher side is under
``stop_gradient``. Logits are accumulated in float32 whatever the input dtype. Memory figures:
``benchmarks/loss_memory.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdelta.chunking import from_chunks, to_chunks
from jdelta.losses.token_divergence import (
    DIVERGENCE_KINDS,
    check_same_vocab,
    token_divergence,
    topk_forward_kl,
)


def _logits(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    return jnp.einsum("bch,hv->bcv", hidden, lm_head, preferred_element_type=jnp.float32)


def _check_hidden(name: str, hidden: jax.Array, lm_head: jax.Array) -> None:
    if hidden.ndim != 3 or lm_head.ndim != 2:
        raise ValueError(f"{name}: hidden must be [B, T, H] and lm_head [H, V]; got {hidden.shape}, {lm_head.shape}")
    if hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(
            f"{name}: hidden size {hidden.shape[-1]} does not match the LM head's input dim {lm_head.shape[0]}"
        )


def _apply_mask(out: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return out
    if mask.shape != out.shape:
        raise ValueError(f"mask shape {mask.shape} != [B, T] = {out.shape}")
    return jnp.where(mask.astype(bool), out, 0.0)


def _phi(kind: str, beta: float):
    """Elementwise term ``phi(ls_v, lt_v)`` with ``divergence = sum_v phi`` (valid columns only)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "reverse_kl":
        return lambda ls, lt: jnp.exp(ls) * (ls - lt)
    if kind == "forward_kl":
        return lambda ls, lt: jnp.exp(lt) * (lt - ls)
    if kind == "jsd":
        log_b, log_1mb = math.log(beta), math.log1p(-beta)

        def phi(ls, lt):
            lm = jnp.logaddexp(lt + log_b, ls + log_1mb)
            return beta * jnp.exp(lt) * (lt - lm) + (1.0 - beta) * jnp.exp(ls) * (ls - lm)

        return phi
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")


def _phi_and_grad(phi, ls, lt):
    """``phi`` and its elementwise derivative in ``ls`` (phi is elementwise, so a ones-tangent JVP)."""
    return jax.jvp(lambda x: phi(x, lt), (ls,), (jnp.ones_like(ls),))


def _scaled_logits(hidden, w, temperature, valid):
    x = _logits(hidden, w)
    if temperature != 1.0:
        x = x / temperature
    return x if valid is None else jnp.where(valid, x, -jnp.inf)


def _vocab_tiles(v: int, tile: int) -> int:
    """Number of vocabulary tiles: the smallest divisor ``n`` of ``v`` with ``v / n <= tile``."""
    for n in range(1, v + 1):
        if v % n == 0 and v // n <= tile:
            return n
    return v


def _fused_divergence(sh, sw, th, tw, *, kind, beta, temperature, vocab_size, chunk_size, vocab_tile):
    """Divergence ``[B, T]`` with a hand-written, tiled backward pass (``backward="tiled"``).

    Forward: sequence chunks, full vocabulary; keeps per-token statistics only (the two
    softmax normalisers as (max, log-sum) and ``S = sum_v dphi/dls_v``). Backward: for each vocabulary tile (outer) and
    sequence chunk (inner) recompute both models' logits on the ``[B, chunk, V / n_tiles]`` tile
    and form ``d div / d x_v = (dphi_v/dls_v - p_s,v S) / temperature``, accumulating ``dW_s``'s
    tile in float32 and writing it in place. Tiles are *strided* (tile ``j`` holds columns
    ``j, j + n, j + 2n, ...``: a free reshape ``[H, V] -> [H, V/n, n]``), so a vocab-sharded
    LM head stays sharded within every tile. No ``[H, V]`` float32 temporary and no ``[B, T, V]``.
    """
    b, t, _ = sh.shape
    v = sw.shape[1]
    phi = _phi(kind, beta)
    n_tiles = _vocab_tiles(v, vocab_tile)
    vt = v // n_tiles
    real_v = v if vocab_size is None else vocab_size
    full_valid = None if real_v == v else jnp.arange(v) < real_v

    def stats_chunk(s_h, t_h, s_w, t_w):
        xs = _scaled_logits(s_h, s_w, temperature, full_valid)
        xt = _scaled_logits(t_h, t_w, temperature, full_valid)
        # log p = (x - max) - log sum exp(x - max), with (max, log-sum) kept per token: x - max is
        # exact near the max, so the backward pass recomputes log p as accurately as log_softmax.
        ms, mt = jnp.max(xs, axis=-1), jnp.max(xt, axis=-1)
        zs = jnp.log(jnp.sum(jnp.exp(xs - ms[..., None]), axis=-1))
        zt = jnp.log(jnp.sum(jnp.exp(xt - mt[..., None]), axis=-1))
        ls = xs - ms[..., None] - zs[..., None]
        lt = xt - mt[..., None] - zt[..., None]
        if full_valid is not None:
            ls, lt = jnp.where(full_valid, ls, 0.0), jnp.where(full_valid, lt, 0.0)
        f, df = _phi_and_grad(phi, ls, lt)
        if full_valid is not None:
            f, df = jnp.where(full_valid, f, 0.0), jnp.where(full_valid, df, 0.0)
        return f.sum(-1), jnp.stack([ms, zs, mt, zt], -1), df.sum(-1)

    def forward(sh, sw, th, tw):
        c_sh, c_th = to_chunks(sh, chunk_size), to_chunks(th, chunk_size)
        div, norm, s_sum = jax.lax.map(lambda c: stats_chunk(c[0], c[1], sw, tw), (c_sh, c_th))
        return div, (norm, s_sum)  # chunked layout [n, B, c, (4)]

    @jax.custom_vjp
    def f(sh, sw, th, tw):
        return from_chunks(forward(sh, sw, th, tw)[0], t)

    def f_fwd(sh, sw, th, tw):
        div, st = forward(sh, sw, th, tw)
        return from_chunks(div, t), (sh, sw, th, tw, st)

    def f_bwd(res, ct):
        sh, sw, th, tw, (norm, s_sum) = res
        c_sh, c_th = to_chunks(sh, chunk_size), to_chunks(th, chunk_size)
        c_ct = to_chunks(ct.astype(jnp.float32)[..., None], chunk_size)[..., 0]
        sw3 = sw.reshape(sw.shape[0], vt, n_tiles)
        tw3 = tw.reshape(tw.shape[0], vt, n_tiles)

        def tile_body(carry, j):
            dh, dw = carry
            sw_j = jax.lax.dynamic_index_in_dim(sw3, j, axis=2, keepdims=False)  # [H_s, V/n]
            tw_j = jax.lax.dynamic_index_in_dim(tw3, j, axis=2, keepdims=False)
            valid = None if real_v == v else (jnp.arange(vt) * n_tiles + j) < real_v

            def chunk_body(dw_j, xs):
                s_h, t_h, nrm, s_c, ct_c = xs
                ms, zs, mt, zt = (nrm[..., i : i + 1] for i in range(4))
                ls = _scaled_logits(s_h, sw_j, temperature, valid) - ms - zs
                lt = _scaled_logits(t_h, tw_j, temperature, valid) - mt - zt
                if valid is not None:
                    ls, lt = jnp.where(valid, ls, 0.0), jnp.where(valid, lt, 0.0)
                _, df = _phi_and_grad(phi, ls, lt)
                g = (df - jnp.exp(ls) * s_c[..., None]) * (ct_c / temperature)[..., None]
                if valid is not None:
                    g = jnp.where(valid, g, 0.0)
                dw_j = dw_j + jnp.einsum("bch,bcv->hv", s_h, g.astype(s_h.dtype), preferred_element_type=jnp.float32)
                dh_c = jnp.einsum("bcv,hv->bch", g.astype(sw_j.dtype), sw_j, preferred_element_type=jnp.float32)
                return dw_j, dh_c

            dw_j, dh_chunks = jax.lax.scan(
                chunk_body,
                jnp.zeros((sw.shape[0], vt), jnp.float32),
                (c_sh, c_th, norm, s_sum, c_ct),
            )
            dw = jax.lax.dynamic_update_index_in_dim(dw, dw_j.astype(sw.dtype), j, axis=2)
            return (dh + dh_chunks, dw), None

        init = (jnp.zeros(c_sh.shape, jnp.float32), jnp.zeros(sw3.shape, sw.dtype))
        (dh, dw), _ = jax.lax.scan(tile_body, init, jnp.arange(n_tiles))
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, -1, sh.shape[-1])[:, :t].astype(sh.dtype)
        return dh, dw.reshape(sw.shape), None, None

    f.defvjp(f_fwd, f_bwd)
    return f(sh, sw, th, tw)


def chunked_token_divergence(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    mask: jax.Array | None = None,
    *,
    kind: str = "reverse_kl",
    chunk_size: int = 128,
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: int | None = None,
    backward: str = "tiled",
    vocab_tile: int = 8192,
) -> jax.Array:
    """Per-token divergence ``[B, T]`` (float32) from hidden states and LM heads, chunked.

    Args:
      student_hidden: ``[B, T, H_s]``; position ``t`` predicts token ``t + 1`` (align it with
        the teacher's hidden states for the same sampled tokens before calling).
      student_lm_head: ``[H_s, V]``.
      teacher_hidden: ``[B, T, H_t]`` (``H_t`` may differ from ``H_s``); no gradient.
      teacher_lm_head: ``[H_t, V]``; the same ``V`` as the student (``ValueError`` otherwise).
      mask: ``[B, T]``, positions with 0 give 0 (they are still computed), or ``None``.
      kind: ``"reverse_kl"`` (KL(p_s || p_t)), ``"forward_kl"`` (KL(p_t || p_s)) or ``"jsd"``
        (generalized JSD, GKD's β convention: see :mod:`jdelta.losses.token_divergence`).
      chunk_size: positions per chunk (``T`` is padded up to a multiple; padded positions are
        dropped). Peak loss memory is about ``5 * B * chunk_size * V`` float32 (B=2, V=151,936:
        0.32 GiB at 64, 0.61 GiB at 128, against 3.5 GiB for the naive loss at T=1024).
      temperature: divides both models' logits.
      beta: the JSD's β (``kind="jsd"`` only).
      vocab_size: real vocabulary; LM-head columns ``>= vocab_size`` are excluded.
      backward: ``"tiled"`` (default): a custom VJP whose backward pass loops over vocabulary
        tiles x sequence chunks and writes the LM-head gradient tile by tile (lowest memory:
        no ``[H, V]`` float32 temporary); ``"remat"``: ``jax.checkpoint`` of each chunk under
        ``lax.map``, differentiated by JAX (simpler; its scan transpose keeps an ``[H, V]``
        float32 gradient temporary per step).
      vocab_tile: ``"tiled"`` only: the most LM-head columns per backward tile (the tile count
        is the smallest divisor of ``V`` that respects it).

    Returns ``[B, T]``, equal (to float32 rounding) to :func:`token_divergence` on the full
    logits, in value and gradient.
    """
    _check_hidden("student", student_hidden, student_lm_head)
    _check_hidden("teacher", teacher_hidden, teacher_lm_head)
    check_same_vocab(student_lm_head.shape[1], teacher_lm_head.shape[1], vocab_size)
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"student hidden {student_hidden.shape} and teacher hidden {teacher_hidden.shape} must cover the same "
            "[B, T] positions"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    t = student_hidden.shape[1]
    chunk_size = min(chunk_size, t) if t else 1

    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_lm_head = jax.lax.stop_gradient(teacher_lm_head)
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backward == "tiled":
        out = _fused_divergence(
            student_hidden,
            student_lm_head,
            teacher_hidden,
            teacher_lm_head,
            kind=kind,
            beta=float(beta),
            temperature=float(temperature),
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            vocab_tile=vocab_tile,
        )
        return _apply_mask(out, mask)
    if backward != "remat":
        raise ValueError(f"backward must be 'tiled' or 'remat', got {backward!r}")

    @jax.checkpoint
    def one_chunk(s_h, t_h, s_w, t_w):
        return token_divergence(
            _logits(s_h, s_w),
            _logits(t_h, t_w),
            kind=kind,
            beta=beta,
            temperature=temperature,
            vocab_size=vocab_size,
        )

    xs = (to_chunks(student_hidden, chunk_size), to_chunks(teacher_hidden, chunk_size))
    out = jax.lax.map(lambda c: one_chunk(c[0], c[1], student_lm_head, teacher_lm_head), xs)
    return _apply_mask(from_chunks(out, t), mask)


def chunked_topk_forward_kl(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """Forward KL against the teacher's top-k (renormalised over the top-k), chunked: ``[B, T]``.

    Args:
      student_hidden: ``[B, T, H_s]``; student_lm_head: ``[H_s, V]``.
      teacher_topk_logprobs, teacher_topk_ids: ``[B, T, k]`` (ids ``< vocab_size``).
      mask, chunk_size, temperature, vocab_size: as in :func:`chunked_token_divergence`.

    See :func:`jdelta.losses.token_divergence.topk_forward_kl` for the definition.
    """
    _check_hidden("student", student_hidden, student_lm_head)
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or teacher_topk_ids.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(
            f"teacher top-k log-probs {teacher_topk_logprobs.shape} / ids {teacher_topk_ids.shape} must be "
            f"[B, T, k] with [B, T] = {student_hidden.shape[:2]}"
        )
    if vocab_size is not None and not 0 < vocab_size <= student_lm_head.shape[1]:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {student_lm_head.shape[1]}]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    t = student_hidden.shape[1]
    chunk_size = min(chunk_size, t) if t else 1

    @jax.checkpoint
    def one_chunk(s_h, lp, ids, s_w):
        return topk_forward_kl(_logits(s_h, s_w), lp, ids, temperature=temperature, vocab_size=vocab_size)

    xs = (
        to_chunks(student_hidden, chunk_size),
        to_chunks(jax.lax.stop_gradient(teacher_topk_logprobs), chunk_size),
        to_chunks(teacher_topk_ids, chunk_size),
    )
    out = jax.lax.map(lambda c: one_chunk(c[0], c[1], c[2], student_lm_head), xs)
    return _apply_mask(from_chunks(out, t), mask)
