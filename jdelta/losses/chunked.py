"""Per-token divergences computed from hidden states, a chunk of positions at a time.

The student and teacher forward passes give final hidden states ``[B, T, H_s]`` /
``[B, T, H_t]`` (``Qwen3VLOutput.hidden_states``) and LM heads ``[H_s, V]`` / ``[H_t, V]``
(``model.lm_head_weight()``). The logits of both models are formed here for ``chunk_size``
positions at a time inside ``lax.map``; each chunk's function is wrapped in
``jax.checkpoint``, so the backward pass recomputes the chunk's logits instead of storing
them. Peak logits memory is therefore ``O(B * chunk_size * V)`` in both passes, never
``[B, T, V]`` (the naive loss keeps several ``[B, T, V]`` float32 buffers alive for the
backward pass: see ``benchmarks/loss_memory.py``).

Gradients reach the student hidden states and the student LM head; the teacher side is under
``stop_gradient``. Logits are accumulated in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdelta.losses.token_divergence import (
    check_same_vocab,
    token_divergence,
    topk_forward_kl,
)


def _logits(hidden: jax.Array, lm_head: jax.Array) -> jax.Array:
    return jnp.einsum("bch,hv->bcv", hidden, lm_head, preferred_element_type=jnp.float32)


def _to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, ...] -> [n_chunks, B, chunk_size, ...]`` (T zero-padded up to a multiple)."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(y: jax.Array, t: int) -> jax.Array:
    """``[n_chunks, B, chunk_size] -> [B, T]``."""
    n, b, c = y.shape
    return jnp.moveaxis(y, 0, 1).reshape(b, n * c)[:, :t]


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


def chunked_token_divergence(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    mask: jax.Array | None = None,
    *,
    kind: str = "reverse_kl",
    chunk_size: int = 256,
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: int | None = None,
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
        dropped). Peak logits memory is about ``4 * B * chunk_size * V`` float32.
      temperature: divides both models' logits.
      beta: the JSD's β (``kind="jsd"`` only).
      vocab_size: real vocabulary; LM-head columns ``>= vocab_size`` are excluded.

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

    xs = (_to_chunks(student_hidden, chunk_size), _to_chunks(teacher_hidden, chunk_size))
    out = jax.lax.map(lambda c: one_chunk(c[0], c[1], student_lm_head, teacher_lm_head), xs)
    return _apply_mask(_from_chunks(out, t), mask)


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
        _to_chunks(student_hidden, chunk_size),
        _to_chunks(jax.lax.stop_gradient(teacher_topk_logprobs), chunk_size),
        _to_chunks(teacher_topk_ids, chunk_size),
    )
    out = jax.lax.map(lambda c: one_chunk(c[0], c[1], c[2], student_lm_head), xs)
    return _apply_mask(_from_chunks(out, t), mask)
