"""ViCuR in the distillation loop (arXiv 2606.05718; ``shared/METHODS.md``).

One step: the student (with its cue-recovery module, if on) samples one rollout per prompt from
the plain prompt; the teacher scores the sampled tokens given the privileged prompt (the question
plus ``[Hint]: ...``, or the reference answer; built by the prompt pipeline); the student is
updated with :func:`jdelta.losses.vicur_loss` on its current log-probs of those tokens.

* The rollout policy's log-probs ``lp_old`` are the current student's, recomputed in the train
  step (stop-gradient): each rollout batch gets exactly one optimiser update (as the authors' run:
  one PPO epoch over the whole batch), so the ratio is 1 in value and the PPO clips only bound
  nothing; they act when a caller passes older log-probs to the loss.
* Token mean over all response tokens of the step, also under gradient accumulation
  (:func:`jdelta.distill.on_policy.batch_token_count`).
* Self-distillation: without a teacher checkpoint the teacher is a frozen copy of the student's
  initial weights, without the module (:func:`self_teacher`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jdelta import losses
from jdelta.distill.batch import completion_hidden, model_inputs
from jdelta.logprobs import chunked_token_logprobs
from jdelta.models.cue_recovery import CueRecoveryConfig, attach_cue_recovery

if TYPE_CHECKING:
    from jdelta.distill.on_policy import DistillConfig


def make_vicur_loss(cfg: DistillConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(student, batch, rng, shared) -> (loss, aux)`` for :func:`jdelta.distill.step.make_train_step`.

    ``batch``: the student's ``input_ids, attention_mask, position_ids`` (+ vision), ``completion``,
    ``completion_mask [B, T]``, ``teacher_logprob [B, T]`` (the privileged teacher's log-probs of the
    completion tokens), optional ``batch_tokens`` / ``batch_rows`` (the step's token count).
    """
    from jdelta.distill.on_policy import batch_token_count

    def loss_fn(student, batch, rng, shared):
        del rng, shared
        comp, mask = batch["completion"], batch["completion_mask"]
        hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), comp.shape[1])
        lp = chunked_token_logprobs(hidden, student.lm_head_weight(), comp, mask, chunk_size=cfg.chunk_size,
                                    temperature=cfg.kl_temperature, vocab_size=cfg.vocab_size).token_logprobs
        loss, metrics = losses.vicur_loss(
            lp, jax.lax.stop_gradient(lp), batch["teacher_logprob"], mask,
            clip_ratio_low=cfg.vicur_clip_low, clip_ratio_high=cfg.vicur_clip_high, clip_ratio_c=cfg.vicur_dual_clip,
            loss_clamp=cfg.vicur_k1_clamp, num_tokens=batch_token_count(batch, mask))
        aux = {f"vicur/{k.removeprefix('vicur_')}": v for k, v in metrics.items()}
        aux["completion_tokens"] = mask.astype(jnp.float32).sum()
        return loss, aux

    return loss_fn


def self_teacher(student: nnx.Module) -> nnx.Module:
    """A frozen copy of ``student`` without its cue-recovery module: new buffers (the train step
    donates the student's), so the teacher keeps the initial weights while the student trains."""
    graphdef, state = nnx.split(student)
    teacher = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    if getattr(teacher, "cue_recovery", None) is not None:
        teacher.cue_recovery = nnx.data(None)
    return teacher


def with_cue_recovery(student: nnx.Module, cfg: CueRecoveryConfig, *, sink_token_id: int | None = None) -> nnx.Module:
    """``student`` with a fresh cue-recovery module unless it already carries one (an exported ViCuR
    student loaded with its module); ``sink_token_id``: the tokenizer's ``<|im_start|>`` (overrides
    ``cfg``'s). Returns ``student``."""
    if getattr(student, "cue_recovery", None) is not None:
        return student
    if sink_token_id is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, sink_token_id=int(sink_token_id))
    return attach_cue_recovery(student, cfg)
