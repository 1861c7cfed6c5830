"""ViCuR's distillation objective (arXiv 2606.05718; ``shared/METHODS.md``): verl's distillation
loss with ``use_policy_gradient`` (k1 mode), then verl's vanilla PPO policy loss.

Per response token ``ŷ_n`` of a student rollout:

* ``k1_n = log p_θ(ŷ_n | v, q, ŷ_<n) - log p_T(ŷ_n | v, q, hint, ŷ_<n)`` from the **current**
  student log-probs (``lp_new``) and the hinted teacher's (``lp_T``), clamped to ``[-10, 10]``
  (``loss_max_clamp``; the log-probs themselves are *not* clamped: verl's ``log_prob_min_clamp``
  applies only to its top-k forward-KL mode);
* advantage ``A_n = stop_gradient(-k1_n)``;
* importance ratio against the rollout policy ``r_n = exp(clamp(lp_new - lp_old, -20, 20))``;
* PPO clip and dual clip (verl ``compute_policy_loss_vanilla``)::

      l_n = max(-A_n r_n, -A_n clip(r_n, 1 - eps_low, 1 + eps_high))
      l_n = min(l_n, -A_n c)                 where A_n < 0     (c = 3)

* loss = ``sum_n l_n / N`` over all response tokens of the **global** batch (``token-mean``):
  under gradient accumulation pass ``num_tokens`` = the global batch's response-token count, so
  the micro-batch losses (and gradients) add up to the full batch's.

At ``lp_new == lp_old`` (one update per rollout) the gradient is ``-(1/N) sum_n A_n ∇ log p_θ(ŷ_n)``:
tokens the hinted teacher likes more than the student are pushed up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdelta.losses.token_divergence import check_mask_nonempty

LOG_RATIO_CLAMP = 20.0  # verl clamps the PPO log-ratio to [-20, 20] before exp (no overflow, no 0 * inf)


def vicur_advantage(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *,
                    loss_clamp: float | None = 10.0) -> jax.Array:
    """``A = stop_gradient(-clamp(lp_S - lp_T, -loss_clamp, loss_clamp))``: ``[B, T] -> [B, T]`` float32.

    ``student_logprobs``: the current student's log-probs of the sampled tokens (no hint);
    ``teacher_logprobs``: the hinted teacher's. ``loss_clamp`` None disables the clamp.
    """
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"shapes differ: student {student_logprobs.shape} vs teacher {teacher_logprobs.shape}")
    k1 = student_logprobs.astype(jnp.float32) - teacher_logprobs.astype(jnp.float32)
    if loss_clamp is not None:
        k1 = jnp.clip(k1, -loss_clamp, loss_clamp)
    return jax.lax.stop_gradient(-k1)


def vicur_loss(
    student_logprobs: jax.Array,
    student_logprobs_old: jax.Array,
    teacher_logprobs: jax.Array,
    mask: jax.Array,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    loss_clamp: float | None = 10.0,
    num_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ViCuR's loss (module docstring) and diagnostics.

    Args:
      student_logprobs: ``[B, T]`` current student log-probs of the sampled tokens (with gradient),
        from the student *without* the hint (with its cue-recovery module, if any).
      student_logprobs_old: ``[B, T]`` the rollout policy's log-probs of the same tokens (no
        gradient; pass ``student_logprobs`` itself when each rollout gets one update: ratio 1).
      teacher_logprobs: ``[B, T]`` the teacher's log-probs with the ``[Hint]`` cue (no gradient).
      mask: ``[B, T]`` response tokens.
      clip_ratio_low, clip_ratio_high: PPO ε (0.2 / 0.2, verl's defaults, the authors' run).
      clip_ratio_c: dual-clip constant for negative advantages (3; None = off).
      loss_clamp: clamp of ``k1`` (10; None = off).
      num_tokens: the normaliser: the global batch's response-token count (gradient
        accumulation); None: this mask's count.

    Returns ``(loss, metrics)``; metrics (masked token means, no gradient): ``vicur_k1_mean`` (the
    sampled reverse-KL estimate, unclamped), ``vicur_advantage_mean``, ``vicur_clamped_fraction``
    (``|k1| > loss_clamp``), ``vicur_clip_fraction`` (PPO clip binds), ``vicur_dual_clip_fraction``,
    ``vicur_ratio_mean``, ``vicur_approx_kl`` (``lp_old - lp_new``). An all-zero mask: ``ValueError``
    (concrete) / NaN (under jit).
    """
    if not (student_logprobs.shape == student_logprobs_old.shape == teacher_logprobs.shape == mask.shape):
        raise ValueError(
            "student_logprobs, student_logprobs_old, teacher_logprobs and mask must all be [B, T]; got "
            f"{student_logprobs.shape}, {student_logprobs_old.shape}, {teacher_logprobs.shape}, {mask.shape}"
        )
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(f"clip ratios must be >= 0, got {clip_ratio_low}, {clip_ratio_high}")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
    check_mask_nonempty(mask)

    lp_new = student_logprobs.astype(jnp.float32)
    adv = vicur_advantage(lp_new, teacher_logprobs, loss_clamp=loss_clamp)
    lp_old = jax.lax.stop_gradient(student_logprobs_old.astype(jnp.float32))
    ratio = jnp.exp(jnp.clip(lp_new - lp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = jnp.maximum(l1, l2)
    per_token = clipped
    dual = jnp.zeros_like(clipped, bool)
    if clip_ratio_c is not None:
        l3 = -adv * clip_ratio_c
        dual = (adv < 0) & (l3 < clipped)
        per_token = jnp.where(adv < 0, jnp.minimum(clipped, l3), clipped)

    m = mask.astype(jnp.float32)
    count = m.sum()
    norm = count if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    loss = jnp.sum(per_token * m) / jnp.where(norm > 0, norm, jnp.nan)

    n = jnp.maximum(count, 1.0)
    mean = lambda x: jax.lax.stop_gradient(jnp.sum(x.astype(jnp.float32) * m) / n)
    k1_raw = jax.lax.stop_gradient(lp_new - teacher_logprobs.astype(jnp.float32))
    clamp = jnp.inf if loss_clamp is None else loss_clamp
    metrics = {
        "vicur_k1_mean": mean(k1_raw),
        "vicur_advantage_mean": mean(adv),
        "vicur_clamped_fraction": mean(jnp.abs(k1_raw) > clamp),
        "vicur_clip_fraction": mean(l2 > l1),
        "vicur_dual_clip_fraction": mean(dual),
        "vicur_ratio_mean": mean(ratio),
        "vicur_approx_kl": mean(lp_old - jax.lax.stop_gradient(lp_new)),
    }
    return loss, metrics
