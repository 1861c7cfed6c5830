"""VA-OPD (Visual-Advantage On-Policy Distillation, arXiv 2605.21924) and the standard OPD loss.

Definitions follow ``METHODS.md`` (the authors' public code, ``va_opd/objective.py``):

* The teacher scores each student rollout twice: with the original image and with a
  *pixelated* copy (:func:`jdelta.data.pixelate`: bilinear down to 10% per side, nearest back up, so
  the visual-token layout is unchanged). The pixelated view only serves the visual advantage;
  the KL target is always the teacher on the original image.
* Visual advantage of response token ``t`` (stop-gradient):
  ``a_t = max(log p_T(y_t | v) - log p_T(y_t | v_pix), 0)``, 0 outside the response.
* Rollout weights: ``m_k`` = mean of ``a_t`` over rollout ``k``'s response tokens; within the
  ``K`` rollouts of one prompt ``z_k = (m_k - mean) / (population std + eps)`` and
  ``w_k = softmax_k(z_k / tau_w)`` (weights sum to 1 per prompt; no clipping).
* Token groups per response of ``T_k`` tokens: ``H`` = the ``ceil(high_fraction * T_k)``
  tokens with the largest ``a_t`` (ties broken by token order: a stable sort); ``L`` = the rest.
* ``loss = (1 / P) sum_prompts sum_k w_k [λ/|H| sum_H KL_t + (1-λ)/|L| sum_L KL_t]``, and if
  ``L`` is empty (``T_k = 1``) the whole response mass goes to ``H``: ``w_k / |H| sum_H KL_t``.
  ``KL_t`` is the exact reverse KL(p_S || p_T) over the full vocabulary
  (:func:`jdelta.losses.chunked.chunked_token_divergence`); only it carries gradients.

``ceil`` is exact (rational arithmetic on ``high_fraction``): 15 tokens at 0.2 give 3.
Defaults: ``λ = 0.5``, ``tau_w = 1``, ``high_fraction = 0.2``, ``eps = 1e-6``.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from jdelta.losses.token_divergence import batch_mean, check_mask_nonempty


@dataclasses.dataclass(frozen=True)
class VAOPDConfig:
    """VA-OPD hyperparameters (``METHODS.md`` defaults)."""

    high_weight: float = 0.5  # λ: mass of the high-VA group
    weight_temperature: float = 1.0  # τ_w of the rollout-weight softmax
    high_fraction: float = 0.2  # share of a response's tokens in the high-VA group (ceil)
    eps: float = 1e-6  # added to the population std in the z-score


def visual_advantage(
    teacher_logprobs: jax.Array, teacher_logprobs_pixelated: jax.Array, response_mask: jax.Array
) -> jax.Array:
    """``a_t = max(lp_orig - lp_pix, 0)`` on response tokens, 0 elsewhere; stop-gradient. ``[B, T]``."""
    if teacher_logprobs.shape != teacher_logprobs_pixelated.shape or teacher_logprobs.shape != response_mask.shape:
        raise ValueError(
            f"teacher log-probs {teacher_logprobs.shape}, pixelated-view log-probs "
            f"{teacher_logprobs_pixelated.shape} and response mask {response_mask.shape} must all be [B, T]"
        )
    diff = teacher_logprobs.astype(jnp.float32) - teacher_logprobs_pixelated.astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.where(response_mask.astype(bool), jnp.maximum(diff, 0.0), 0.0))


def _group_layout(
    batch: int, rollouts_per_prompt: int | None, group_ids: jax.Array | None, num_groups: int | None
) -> tuple[jax.Array, int]:
    if (rollouts_per_prompt is None) == (group_ids is None):
        raise ValueError("give exactly one of rollouts_per_prompt (prompt-major [P, K] layout) or group_ids")
    if rollouts_per_prompt is not None:
        k = int(rollouts_per_prompt)
        if k < 1 or batch % k:
            raise ValueError(f"rollouts_per_prompt={k} must divide the number of rollouts {batch}")
        return jnp.arange(batch, dtype=jnp.int32) // k, batch // k
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must be [B] = [{batch}], got {group_ids.shape}")
    if num_groups is None:
        if isinstance(group_ids, jax.core.Tracer):
            raise ValueError("num_groups (static) is required when group_ids is traced")
        num_groups = int(np.max(np.asarray(group_ids))) + 1
    return group_ids.astype(jnp.int32), int(num_groups)


def rollout_weights(
    mean_va: jax.Array,
    group_ids: jax.Array,
    num_groups: int,
    *,
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> jax.Array:
    """Per-rollout weights ``[B]``: softmax of the z-scored mean VA within each prompt group.

    Args:
      mean_va: ``[B]`` mean visual advantage ``m_k`` of each rollout.
      group_ids: ``[B]`` int in ``[0, num_groups)``: the prompt of each rollout.
      num_groups: static number of group ids.
    Equal means within a group (and a single-rollout group) give uniform weights.
    """
    seg = lambda x: jax.ops.segment_sum(x, group_ids, num_segments=num_groups)
    m = jax.lax.stop_gradient(mean_va.astype(jnp.float32))
    count = jnp.maximum(seg(jnp.ones_like(m)), 1.0)
    mu = (seg(m) / count)[group_ids]
    std = jnp.sqrt(seg((m - mu) ** 2) / count)[group_ids]
    z = (m - mu) / (std + eps) / temperature
    z_max = jax.ops.segment_max(z, group_ids, num_segments=num_groups)[group_ids]
    e = jnp.exp(z - z_max)
    return e / seg(e)[group_ids]


def high_count(response_lengths: jax.Array, high_fraction: float) -> jax.Array:
    """``ceil(high_fraction * n)`` computed exactly (``high_fraction`` as a rational p/q). ``[B]`` int32."""
    if not 0.0 < high_fraction <= 1.0:
        raise ValueError(f"high_fraction must be in (0, 1], got {high_fraction}")
    frac = Fraction(str(high_fraction)).limit_denominator(10_000)
    p, q = frac.numerator, frac.denominator
    n = response_lengths.astype(jnp.int32)
    # ceil(p n / q) = p (n // q) + ceil(p (n % q) / q), which stays small in int32.
    return p * (n // q) + (p * (n % q) + q - 1) // q


def high_va_mask(va: jax.Array, response_mask: jax.Array, high_fraction: float = 0.2) -> jax.Array:
    """``[B, T]`` bool: per response, the ``ceil(high_fraction * T_k)`` tokens with the largest VA.

    Ties keep token order (earlier tokens first): the order is a stable sort on ``-a_t``.
    """
    b, t = va.shape
    mask = response_mask.astype(bool)
    neg = jnp.where(va == 0, 0.0, -va.astype(jnp.float32))  # no -0.0: it would sort before +0.0
    key = jnp.where(mask, neg, jnp.inf)  # non-response tokens rank last
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, order = jax.lax.sort((key, pos), dimension=-1, is_stable=True, num_keys=1)
    rank = jnp.argsort(order, axis=-1)  # inverse permutation: the rank of each position
    n_high = high_count(mask.sum(-1), high_fraction)
    return mask & (rank < n_high[:, None])


def opd_loss(token_kl: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Standard OPD: mean token KL within each response, then mean over responses. ``[B, T] -> []``.

    Fully-masked responses are left out; an all-zero mask is a ``ValueError`` (concrete) or NaN (jit).
    """
    return batch_mean(token_kl, response_mask)


def va_opd_loss(
    teacher_logprobs: jax.Array,
    teacher_logprobs_pixelated: jax.Array,
    token_kl: jax.Array,
    response_mask: jax.Array,
    *,
    rollouts_per_prompt: int | None = None,
    group_ids: jax.Array | None = None,
    num_groups: int | None = None,
    high_weight: float = 0.5,
    weight_temperature: float = 1.0,
    high_fraction: float = 0.2,
    eps: float = 1e-6,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The VA-OPD loss (module docstring) and its diagnostics.

    Args:
      teacher_logprobs: ``[B, T]`` teacher log-prob of each sampled token, original image.
      teacher_logprobs_pixelated: ``[B, T]`` the same with the pixelated image.
      token_kl: ``[B, T]`` per-token reverse KL(p_S || p_T) (original image), with gradient.
      response_mask: ``[B, T]`` 1 on response tokens (the first EOS included), 0 on prompt/padding.
      rollouts_per_prompt: ``K`` for a prompt-major layout (rows ``p*K .. p*K+K-1`` share prompt
        ``p``), or
      group_ids: ``[B]`` int prompt id of each rollout in ``[0, num_groups)`` (``num_groups``
        static; required under ``jit``). The ``1/P`` factor counts the groups present.
      high_weight, weight_temperature, high_fraction, eps: λ, τ_w, the high-group share, the
        z-score epsilon.

    Returns ``(loss, metrics)``; metrics (float32 scalars): ``va_mean`` (token mean of a_t),
    ``va_positive_fraction``, ``va_rollout_mean`` (mean of m_k), ``va_weight_entropy`` (mean over
    prompts of -Σ w log w), ``va_weight_max`` / ``va_weight_min``, ``va_high_fraction``
    (Σ|H| / Σ T_k), ``va_high_share`` (share of Σ a_t in H), ``va_high_zero_fraction`` (H tokens
    with a_t = 0), ``va_kl_high`` / ``va_kl_low`` (token-mean KL in H / L; 0 if L is empty
    everywhere), ``kl_token_mean``, ``opd_loss`` (the standard OPD value of the same KL).

    Bad input: an all-zero response mask is a ``ValueError`` (concrete) or a NaN loss (jit). A
    fully-masked rollout (concrete: ``ValueError``, as in the authors' code; under jit:
    ``m_k = 0``, it still takes part in its group's z-score and weights, and adds 0).
    """
    b, t = token_kl.shape
    if not 0.0 <= high_weight <= 1.0:
        raise ValueError(f"high_weight (λ) must be in [0, 1], got {high_weight}")
    if not weight_temperature > 0 or not eps > 0:
        raise ValueError("weight_temperature and eps must be > 0")
    if response_mask.shape != (b, t):
        raise ValueError(f"response_mask {response_mask.shape} must match token_kl {token_kl.shape}")
    check_mask_nonempty(response_mask, "response mask")
    if not isinstance(response_mask, jax.core.Tracer):
        empty = np.flatnonzero(~np.asarray(response_mask).astype(bool).any(-1))
        if empty.size:
            raise ValueError(f"VA-OPD: rollouts {empty.tolist()} have no response token")
    gid, n_groups = _group_layout(b, rollouts_per_prompt, group_ids, num_groups)

    mask = response_mask.astype(bool)
    mf = mask.astype(jnp.float32)
    kl = jnp.where(mask, token_kl.astype(jnp.float32), 0.0)
    va = visual_advantage(teacher_logprobs, teacher_logprobs_pixelated, response_mask)

    lengths = mf.sum(-1)
    mean_va = va.sum(-1) / jnp.maximum(lengths, 1.0)
    w = jax.lax.stop_gradient(
        rollout_weights(mean_va, gid, n_groups, temperature=weight_temperature, eps=eps)
    )

    high = high_va_mask(va, mask, high_fraction)
    low = mask & ~high
    hf, lf = high.astype(jnp.float32), low.astype(jnp.float32)
    n_h, n_l = hf.sum(-1), lf.sum(-1)
    kl_h = (kl * hf).sum(-1) / jnp.maximum(n_h, 1.0)
    kl_l = (kl * lf).sum(-1) / jnp.maximum(n_l, 1.0)
    per_rollout = jnp.where(n_l > 0, high_weight * kl_h + (1.0 - high_weight) * kl_l, kl_h)

    present = jax.ops.segment_sum(jnp.ones((b,), jnp.float32), gid, num_segments=n_groups) > 0
    n_prompts = present.sum().astype(jnp.float32)
    total = mf.sum()
    loss = jnp.sum(w * per_rollout) / n_prompts
    loss = jnp.where(total > 0, loss, jnp.nan)

    safe = lambda num, den: num / jnp.maximum(den, 1.0)
    ent_rollout = -w * jnp.log(jnp.maximum(w, 1e-30))
    ent_prompt = jax.ops.segment_sum(ent_rollout, gid, num_segments=n_groups)
    metrics = {
        "va_mean": safe(va.sum(), total),
        "va_positive_fraction": safe(((va > 0) & mask).sum().astype(jnp.float32), total),
        "va_rollout_mean": mean_va.mean(),
        "va_weight_entropy": jnp.sum(jnp.where(present, ent_prompt, 0.0)) / n_prompts,
        "va_weight_max": w.max(),
        "va_weight_min": w.min(),
        "va_high_fraction": safe(n_h.sum(), total),
        "va_high_share": jnp.where(va.sum() > 0, (va * hf).sum() / jnp.maximum(va.sum(), 1e-30), 0.0),
        "va_high_zero_fraction": safe(((va == 0) & high).sum().astype(jnp.float32), n_h.sum()),
        "va_kl_high": safe((kl * hf).sum(), n_h.sum()),
        "va_kl_low": safe((kl * lf).sum(), n_l.sum()),
        "kl_token_mean": safe(kl.sum(), total),
        "opd_loss": jnp.sum(jnp.where(lengths > 0, kl.sum(-1) / jnp.maximum(lengths, 1.0), 0.0))
        / jnp.maximum((lengths > 0).sum(), 1),
    }
    metrics = {k: jax.lax.stop_gradient(v.astype(jnp.float32)) for k, v in metrics.items()}
    return loss, metrics


def va_opd_token_coefficients(
    teacher_logprobs: jax.Array,
    teacher_logprobs_pixelated: jax.Array,
    response_mask: jax.Array,
    **kwargs,
) -> jax.Array:
    """``[B, T]`` stop-gradient coefficients ``c`` with ``va_opd_loss == sum(c * token_kl)``.

    Useful to log or to fold VA-OPD into another reducer; ``kwargs`` as in :func:`va_opd_loss`.
    """
    return jax.grad(
        lambda kl: va_opd_loss(teacher_logprobs, teacher_logprobs_pixelated, kl, response_mask, **kwargs)[0]
    )(jnp.zeros(response_mask.shape, jnp.float32))
