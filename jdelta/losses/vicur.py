"""ViCuR's distillation objective (arXiv 2606.05718): a sampled-token advantage surrogate.

From ``METHODS.md`` and the authors' VeRL script (``run_qwen3_vl_geo3k.sh``:
``loss_mode=k1``, ``use_policy_gradient=True``, ``loss_max_clamp=10``,
``log_prob_min_clamp=-10``, vanilla PPO policy loss):

* per sampled token ``ŷ_n`` of a student rollout, the k1 distillation loss
  ``d_n = clamp(lp_old, min=-10) - clamp(lp_T, min=-10)`` with ``lp_T`` the teacher's log-prob
  given the ``[Hint]`` cue (privileged) and ``lp_old`` the student's log-prob when sampling
  (no hint), clamped to ``[-10, 10]``;
* advantage ``A_n = stop_gradient(-d_n) = lp_T - lp_old`` (after the clamps);
* PPO-clipped surrogate with ratio ``r_n = exp(lp_new - lp_old)`` (log-ratio clamped to
  ``[-20, 20]`` as in VeRL)::

      l_n = max(-A_n r_n, -A_n clip(r_n, 1 - eps_low, 1 + eps_high))
      l_n = min(l_n, -A_n c)  where A_n < 0      (VeRL's dual clip, c = 3; None disables)

* loss = masked token mean of ``l_n`` (VeRL's default ``token-mean``).

At ``lp_new == lp_old`` the gradient is ``-mean_n A_n ∇ log p_θ(ŷ_n)``, the published surrogate
``-mean_n A_n log p_θ(ŷ_n)``. The clip ε is not published: default 0.2 (VeRL's default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdelta.losses.token_divergence import reduce_masked


def vicur_advantage(
    teacher_logprobs: jax.Array,
    student_logprobs_old: jax.Array,
    *,
    log_prob_min: float | None = -10.0,
    loss_clamp: float | None = 10.0,
) -> jax.Array:
    """``A = stop_gradient(lp_T - lp_old)`` after the authors' clamps. ``[B, T] -> [B, T]`` float32.

    ``log_prob_min`` clamps both log-probs from below; ``loss_clamp`` clamps the k1 loss
    ``lp_old - lp_T`` (hence ``A``) to ``[-loss_clamp, loss_clamp]``. ``None`` disables either.
    """
    if teacher_logprobs.shape != student_logprobs_old.shape:
        raise ValueError(f"shapes differ: teacher {teacher_logprobs.shape} vs student {student_logprobs_old.shape}")
    lt = teacher_logprobs.astype(jnp.float32)
    ls = student_logprobs_old.astype(jnp.float32)
    if log_prob_min is not None:
        lt, ls = jnp.maximum(lt, log_prob_min), jnp.maximum(ls, log_prob_min)
    k1 = ls - lt
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
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = 3.0,
    log_prob_min: float | None = -10.0,
    loss_clamp: float | None = 10.0,
    reduction: str = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ViCuR's clipped advantage surrogate (module docstring) and diagnostics.

    Args:
      student_logprobs: ``[B, T]`` current student log-probs of the sampled tokens (with gradient),
        from the student *without* the hint (and with the cue-recovery module).
      student_logprobs_old: ``[B, T]`` the student's log-probs at sampling time (no gradient);
        pass ``student_logprobs`` itself for a single on-policy update (ratio 1).
      teacher_logprobs: ``[B, T]`` teacher log-probs of the same tokens with the ``[Hint]`` cue.
      mask: ``[B, T]`` response tokens.
      clip_ratio_low, clip_ratio_high: PPO ε (``high`` defaults to ``low``).
      clip_ratio_c: dual-clip constant for negative advantages (``None`` = off).
      log_prob_min, loss_clamp: the authors' clamps (see :func:`vicur_advantage`).
      reduction: ``"token_mean"`` (sum / total tokens) or ``"batch_mean"``.

    Returns ``(loss, metrics)`` with ``vicur_advantage_mean``, ``vicur_k1_mean`` (sampled reverse-KL
    estimate ``lp_old - lp_T``, unclamped), ``vicur_clip_fraction``, ``vicur_ratio_mean``,
    ``vicur_approx_kl`` (``lp_old - lp_new``), ``vicur_clamped_fraction`` (tokens whose advantage a
    clamp changed; with both clamps at 10 the log-prob clamp is the one that binds). All-zero mask: ``ValueError`` (concrete) / NaN (jit).
    """
    if not (student_logprobs.shape == student_logprobs_old.shape == teacher_logprobs.shape == mask.shape):
        raise ValueError(
            "student_logprobs, student_logprobs_old, teacher_logprobs and mask must all be [B, T]; got "
            f"{student_logprobs.shape}, {student_logprobs_old.shape}, {teacher_logprobs.shape}, {mask.shape}"
        )
    eps_low = float(clip_ratio_low)
    eps_high = eps_low if clip_ratio_high is None else float(clip_ratio_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError("clip ratios must be >= 0")
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")

    adv = vicur_advantage(teacher_logprobs, student_logprobs_old, log_prob_min=log_prob_min, loss_clamp=loss_clamp)
    lp_new = student_logprobs.astype(jnp.float32)
    lp_old = jax.lax.stop_gradient(student_logprobs_old.astype(jnp.float32))
    log_ratio = jnp.clip(lp_new - lp_old, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(l1, l2)
    if clip_ratio_c is not None:
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, -adv * clip_ratio_c), per_token)
    loss = reduce_masked(per_token, mask, reduction)

    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = lambda x: jax.lax.stop_gradient(jnp.sum(x.astype(jnp.float32) * m) / n)
    k1_raw = student_logprobs_old.astype(jnp.float32) - teacher_logprobs.astype(jnp.float32)
    metrics = {
        "vicur_advantage_mean": mean(adv),
        "vicur_k1_mean": mean(k1_raw),
        "vicur_clip_fraction": mean(l2 > l1),
        "vicur_ratio_mean": mean(ratio),
        "vicur_approx_kl": mean(lp_old - lp_new),
        "vicur_clamped_fraction": mean(adv != -k1_raw),
    }
    return loss, metrics
