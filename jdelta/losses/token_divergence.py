"""Per-token divergences between a student and a teacher, and masked reductions.

Conventions shared by every function here:

* Logits are ``[..., V]`` (typically ``[B, T, V]``); both models must share the vocabulary
  axis ``V`` (a mismatch is a ``ValueError`` at trace time). Results are ``float32`` and
  have the logits' shape without the last axis.
* ``temperature`` divides the logits of *both* models before the softmax.
* ``vocab_size``: the real vocabulary when the LM head is padded to a multiple (Qwen3-VL:
  151,936 rows of which fewer are real tokens). Columns ``>= vocab_size`` get logit
  ``-inf`` (probability exactly 0) and are excluded from every sum; their gradient is 0.
* The teacher side is wrapped in ``stop_gradient``: only the student receives gradients.
* ``p_s`` = student distribution, ``p_t`` = teacher distribution.

Generalized JSD (GKD, Agarwal et al. 2024, eq. for ``D_JSD(β)``), with ``P = p_t`` and
``Q = p_s`` and mixture ``M = β p_t + (1 - β) p_s``::

    JSD_β = β KL(p_t || M) + (1 - β) KL(p_s || M)

As ``β -> 0``, ``JSD_β / β -> KL(p_t || p_s)`` (forward KL) and as ``β -> 1``,
``JSD_β / (1 - β) -> KL(p_s || p_t)`` (reverse KL); the raw value tends to 0 at both ends.
Following the GKD paper's reading (and TRL's ``GKDTrainer``), ``β = 0`` *is* the forward KL
and ``β = 1`` *is* the reverse KL; ``0 < β < 1`` is the unscaled ``JSD_β`` above.
``β`` must be a Python float (it selects the branch at trace time).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DIVERGENCE_KINDS = ("reverse_kl", "forward_kl", "jsd")


# --------------------------------------------------------------------------- validation


def check_same_vocab(student_vocab: int, teacher_vocab: int, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` unless the two vocabulary axes match (and hold ``vocab_size``)."""
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"vocabulary mismatch: student has {student_vocab} logits/LM-head columns, teacher has "
            f"{teacher_vocab}; distillation needs the same tokenizer and the same (padded) LM-head width"
        )
    if vocab_size is not None and not 0 < vocab_size <= student_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {student_vocab}] (the LM-head width)")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_mask_nonempty(mask, what: str = "completion mask") -> None:
    """Raise ``ValueError`` if a *concrete* mask has no non-zero entry.

    Under ``jit`` the mask is a tracer and cannot be inspected; the reductions then return NaN
    for an all-zero mask instead (which the train step counts as a skipped, non-finite step).
    """
    if mask is None or not _is_concrete(mask):
        return
    if not np.asarray(mask).astype(bool).any():
        raise ValueError(f"the {what} is all zeros: there is no token to compute a loss on")


# --------------------------------------------------------------------------- log-probs


def masked_log_probs(
    logits: jax.Array, *, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(log_probs, probs)`` in float32 over the real vocabulary.

    ``log_probs`` is finite everywhere: padded columns (``>= vocab_size``) hold 0 there (not
    ``-inf``) so that products and differences never make NaN, and ``probs`` is exactly 0 on
    them, so any ``sum(probs * f(log_probs))`` ignores them. Use ``probs`` (not
    ``exp(log_probs)``) for the weights.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays f64
    if temperature != 1.0:
        x = x / temperature
    if vocab_size is None or vocab_size == x.shape[-1]:
        logp = jax.nn.log_softmax(x, axis=-1)
        return logp, jnp.exp(logp)
    valid = jnp.arange(x.shape[-1]) < vocab_size
    logp = jax.nn.log_softmax(jnp.where(valid, x, -jnp.inf), axis=-1)
    logp = jnp.where(valid, logp, 0.0)
    probs = jnp.where(valid, jnp.exp(logp), 0.0)
    return logp, probs


def _kl(p: jax.Array, logp: jax.Array, logq: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis."""
    return jnp.sum(p * (logp - logq), axis=-1)


def _prepare(student_logits, teacher_logits, temperature, vocab_size):
    check_same_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape} must cover "
            "the same token positions"
        )
    ls, ps = masked_log_probs(student_logits, temperature=temperature, vocab_size=vocab_size)
    lt, pt = masked_log_probs(
        jax.lax.stop_gradient(teacher_logits), temperature=temperature, vocab_size=vocab_size
    )
    return ls, ps, lt, pt


# --------------------------------------------------------------------------- full-vocabulary divergences


def reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """Exact per-token ``KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)``: ``[..., V] -> [...]``."""
    ls, ps, lt, _ = _prepare(student_logits, teacher_logits, temperature, vocab_size)
    return _kl(ps, ls, lt)


def forward_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """Exact per-token ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)``: ``[..., V] -> [...]``."""
    ls, _, lt, pt = _prepare(student_logits, teacher_logits, temperature, vocab_size)
    return _kl(pt, lt, ls)


def generalized_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """Per-token generalized JSD (GKD convention, see the module docstring): ``[..., V] -> [...]``.

    ``beta = 0`` returns :func:`forward_kl`, ``beta = 1`` :func:`reverse_kl`, otherwise
    ``β KL(p_t || M) + (1 - β) KL(p_s || M)`` with ``M = β p_t + (1 - β) p_s``.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ls, ps, lt, pt = _prepare(student_logits, teacher_logits, temperature, vocab_size)
    if beta == 0.0:
        return _kl(pt, lt, ls)
    if beta == 1.0:
        return _kl(ps, ls, lt)
    log_m = jnp.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * _kl(pt, lt, log_m) + (1.0 - beta) * _kl(ps, ls, log_m)


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """Dispatch on ``kind`` in ``("reverse_kl", "forward_kl", "jsd")``: ``[..., V] -> [...]``.

    ``beta`` is used only by ``"jsd"``.
    """
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size)
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size)
    if kind == "jsd":
        return generalized_jsd(
            student_logits, teacher_logits, beta=beta, temperature=temperature, vocab_size=vocab_size
        )
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")


# --------------------------------------------------------------------------- sampled-token estimators


def k1_reverse_kl(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
    """k1 estimator of ``KL(p_s || p_t)`` at the sampled token: ``log p_s(y) - log p_t(y)``.

    Args: both ``[B, T]`` log-probs of the same sampled tokens ``y ~ p_s``; teacher under
    ``stop_gradient``. Unbiased, can be negative per token.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(f"shapes differ: {student_logprobs.shape} vs {teacher_logprobs.shape}")
    return student_logprobs.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logprobs).astype(jnp.float32)


def k3_reverse_kl(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
    """k3 estimator of ``KL(p_s || p_t)``: ``(r - 1) - log r`` with ``r = p_t(y) / p_s(y)``.

    Args: both ``[B, T]``; teacher under ``stop_gradient``. Unbiased for ``y ~ p_s`` and >= 0.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(f"shapes differ: {student_logprobs.shape} vs {teacher_logprobs.shape}")
    log_r = jax.lax.stop_gradient(teacher_logprobs).astype(jnp.float32) - student_logprobs.astype(jnp.float32)
    return jnp.expm1(log_r) - log_r


def topk_forward_kl_from_logprobs(
    student_topk_logprobs: jax.Array, teacher_topk_logprobs: jax.Array
) -> jax.Array:
    """Forward KL against the teacher's top-k, given the student's log-probs at the same ids.

    ``sum_i q_i (log q_i - log p_s(id_i))`` with ``q = softmax(teacher_topk_logprobs)``: the
    teacher is **renormalised over its top-k** (the mass outside the top-k is dropped), the
    student's log-probs are full-vocabulary ones (not renormalised). The result is >= 0 (it is
    at least ``KL(q || p_s renormalised over the top-k)``) and 0 iff the student puts exactly
    ``q`` on the top-k ids and nothing elsewhere. Shapes ``[B, T, k] -> [B, T]``.
    """
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"shapes differ: {student_topk_logprobs.shape} vs {teacher_topk_logprobs.shape}")
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - student_topk_logprobs.astype(jnp.float32)), axis=-1)


def topk_forward_kl(
    student_logits: jax.Array,
    teacher_topk_logprobs: jax.Array,
    teacher_topk_ids: jax.Array,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> jax.Array:
    """:func:`topk_forward_kl_from_logprobs` from student logits ``[B, T, V]``.

    ``teacher_topk_logprobs`` / ``teacher_topk_ids``: ``[B, T, k]`` (e.g. from
    ``jdelta.logprobs.chunked_token_logprobs(top_k=k)``), used as given (their temperature is
    whatever they were scored at); the student's log-softmax uses ``temperature``. Ids must be
    ``< vocab_size``.
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"top-k ids {teacher_topk_ids.shape} and log-probs {teacher_topk_logprobs.shape} differ")
    ls, _ = masked_log_probs(student_logits, temperature=temperature, vocab_size=vocab_size)
    s_at = jnp.take_along_axis(ls, teacher_topk_ids.astype(jnp.int32), axis=-1)
    return topk_forward_kl_from_logprobs(s_at, teacher_topk_logprobs)


# --------------------------------------------------------------------------- masked reductions


def _f32_mask(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(values.shape, jnp.float32)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} != values shape {values.shape}")
    return mask.astype(jnp.float32)


def _nan_if_zero(count: jax.Array) -> jax.Array:
    """``count`` where > 0, else NaN (so 0/0 never silently reads as a zero loss)."""
    return jnp.where(count > 0, count, jnp.nan)


def sequence_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-sequence masked token mean: ``[B, T] -> [B]``. A fully-masked row gives 0."""
    m = _f32_mask(values, mask)
    n = m.sum(-1)
    return jnp.sum(values * m, -1) / jnp.maximum(n, 1.0)


def batch_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over sequences of the per-sequence token mean: ``[B, T] -> []``.

    Fully-masked rows are left out of the mean. All rows masked: ``ValueError`` for a concrete
    mask, NaN under ``jit``.
    """
    check_mask_nonempty(mask)
    m = _f32_mask(values, mask)
    has = (m.sum(-1) > 0).astype(jnp.float32)
    return jnp.sum(sequence_mean(values, m) * has) / _nan_if_zero(has.sum())


def token_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``sum(values * mask) / sum(mask)`` over all tokens of the batch: ``[B, T] -> []``.

    All-zero mask: ``ValueError`` for a concrete mask, NaN under ``jit``.
    """
    check_mask_nonempty(mask)
    m = _f32_mask(values, mask)
    return jnp.sum(values * m) / _nan_if_zero(m.sum())


def token_sum_normalized(values: jax.Array, mask: jax.Array | None, num_tokens: jax.Array | float) -> jax.Array:
    """``sum(values * mask) / num_tokens`` with a given normaliser: ``[B, T] -> []``.

    For gradient accumulation: pass the token count of the *whole* batch so that the
    micro-batch losses add up to the full batch's :func:`token_mean`.
    """
    m = _f32_mask(values, mask)
    return jnp.sum(values * m) / jnp.asarray(num_tokens, jnp.float32)


REDUCTIONS = {"token_mean": token_mean, "batch_mean": batch_mean}


def reduce_masked(values: jax.Array, mask: jax.Array | None, reduction: str = "token_mean") -> jax.Array:
    """Apply a named reduction: ``"token_mean"`` (sum / total tokens) or ``"batch_mean"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {tuple(REDUCTIONS)}")
    return REDUCTIONS[reduction](values, mask)
