"""Pure distillation losses (jit-able, no I/O).

* :mod:`.token_divergence` -- per-token reverse/forward KL, generalized JSD (GKD's β
  convention), sampled-token estimators (k1, k3), forward KL against teacher top-k, masked
  reductions.
* :mod:`.chunked` -- the same divergences from hidden states + LM heads, chunked over the
  sequence with rematerialisation (never ``[B, T, V]`` of two models at once).
* :mod:`.va_opd` -- VA-OPD (visual-advantage weighting) and the standard OPD loss.
* :mod:`.vicur` -- ViCuR's clipped sampled-token advantage surrogate.
"""

from jdelta.losses.chunked import chunked_token_divergence, chunked_topk_forward_kl
from jdelta.losses.token_divergence import (
    DIVERGENCE_KINDS,
    batch_mean,
    check_mask_nonempty,
    check_same_vocab,
    forward_kl,
    generalized_jsd,
    k1_reverse_kl,
    k3_reverse_kl,
    masked_log_probs,
    reduce_masked,
    reverse_kl,
    sequence_mean,
    token_divergence,
    token_mean,
    token_sum_normalized,
    topk_forward_kl,
    topk_forward_kl_from_logprobs,
)
from jdelta.losses.va_opd import (
    VAOPDConfig,
    high_count,
    high_va_mask,
    opd_loss,
    rollout_weights,
    va_opd_loss,
    va_opd_token_coefficients,
    visual_advantage,
)
from jdelta.losses.vicur import vicur_advantage, vicur_loss

__all__ = [
    "DIVERGENCE_KINDS",
    "VAOPDConfig",
    "batch_mean",
    "check_mask_nonempty",
    "check_same_vocab",
    "chunked_token_divergence",
    "chunked_topk_forward_kl",
    "forward_kl",
    "generalized_jsd",
    "high_count",
    "high_va_mask",
    "k1_reverse_kl",
    "k3_reverse_kl",
    "masked_log_probs",
    "opd_loss",
    "reduce_masked",
    "reverse_kl",
    "rollout_weights",
    "sequence_mean",
    "token_divergence",
    "token_mean",
    "token_sum_normalized",
    "topk_forward_kl",
    "topk_forward_kl_from_logprobs",
    "va_opd_loss",
    "va_opd_token_coefficients",
    "vicur_advantage",
    "vicur_loss",
    "visual_advantage",
]
