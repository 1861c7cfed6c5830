"""On-policy distillation: student rollouts -> teacher scores -> per-token loss -> update.

One step (:meth:`OnPolicyDistiller.produce` builds the batch, the jitted train step
consumes it):

1. **Rollout** (timed ``rollout``): the student samples ``rollouts_per_prompt`` completions
   per prompt with :class:`jdelta.sampling.Sampler` (or, ``engine=continuous``, the rollout
   engine's continuous batching: the same rollouts). The sampler wraps one persistent
   student module whose parameters are *re-pointed* at the train state's arrays before
   each rollout (``nnx.update``): no copy, no weight sync, no recompilation.
   GKD's λ: with probability ``1 - gkd_lambda`` a step trains on off-policy completions
   instead (the dataset's ``completion`` column, or teacher samples).
2. **Teacher scoring** (timed ``teacher``): one teacher forward over ``prompt ++ completion``
   gives its final hidden states at the completion positions ``[B, T, H_t]`` (the KL
   target, kept instead of ``[B, T, V]`` log-probs). VA-OPD adds a second teacher pass on
   the pixelated image; both passes give the sampled token's log-prob, whose clipped
   difference is the visual advantage ``a_t`` (stop-gradient by construction).
3. **Update** (timed ``update`` by the loop): inside the jitted step the student runs on
   the same sequence (gradients on), and the per-token divergence to the teacher is
   computed in chunks from both models' hidden states and LM heads
   (:mod:`jdelta.losses`), then reduced per ``mode``.

Modes: ``reverse_kl`` (standard OPD: token mean per response, then mean over responses),
``gkd`` (generalized JSD with ``gkd_beta``, ``gkd_reduction``), ``va_opd`` (METHODS.md) and
``vicur`` (METHODS.md: the teacher scores the student's rollouts given a privileged prompt, the
student trains with the clipped sampled-token advantage of :mod:`jdelta.losses.vicur`; the teacher
pass keeps only the sampled tokens' log-probs, see :mod:`jdelta.distill.vicur`).

Every training softmax covers the tokenizer's real ids only (``vocab_size``): the LM head's padded
columns carry no probability, and a rollout is cut before a padded id it sampled.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta import losses
from jdelta.config import check
from jdelta.distill.batch import (
    assemble_batch,
    completion_hidden,
    cut_at_padded_ids,
    cut_at_special,
    model_inputs,
    rope_index_fn,
    special_ids,
    student_view,
)
from jdelta.distill.loop import StepInput
from jdelta.distill.rollout import flatten_vision
from jdelta.distill.train_state import TrainState
from jdelta.logprobs import chunked_token_logprobs
from jdelta.models.cue_recovery import CueRecoveryConfig
from jdelta.sampling import Sampler, SamplingParams
from jdelta.sharding import Rules, activation_sharding, state_shardings

Mode = Literal["reverse_kl", "gkd", "va_opd", "vicur"]
MODES: tuple[str, ...] = typing.get_args(Mode)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What an on-policy step does (defaults: the VA-OPD recipe where it sets one).

    mode: ``reverse_kl`` | ``gkd`` | ``va_opd``.
    rollouts_per_prompt: K samples per prompt (VA-OPD normalises weights over them).
    temperature / top_p / top_k / max_new_tokens / stop_token_ids: rollout sampling
      (``stop_token_ids`` None: the data source's, e.g. the tokenizer's end-of-turn ids; none for a
      library caller that leaves it None).
    pad_id: padding token id for prompts and finished rows (None: the data source's; 0 otherwise).
    kl_temperature: temperature of both distributions in the divergence (1 in VA-OPD).
    chunk_size: positions per chunk in the chunked divergence and log-probs (peak ``B * chunk_size * V``
      floats; 64 keeps the loss's temp memory >= 8x below the naive one at V = 151,936, see
      benchmarks/RESULTS.md).
    vocab_size: the tokenizer's real ids; LM-head columns from it on are left out of every
      softmax (None: the data source's tokenizer's, else the whole head).
    gkd_beta: the generalized-JSD mixing weight (TRL's convention: 0 = forward KL, 1 = reverse KL;
      see :mod:`jdelta.losses`).
    gkd_lambda: probability that a step is on-policy (GKD's λ, the student-data fraction); otherwise
      it trains on ``off_policy_source`` completions: ``dataset`` (the batch's ``completion`` column,
      token ids right-padded with ``pad_id``) or ``teacher`` (teacher samples). Default 1.0 (always
      on-policy, as the other modes); TRL's ``GKDConfig.lmbda`` defaults to 0.5.
    gkd_reduction: ``sequence_mean`` (default: token mean per response, then over responses, the
      reduction of ``reverse_kl``, so β = 1 is exactly that mode) or ``batchmean`` (TRL's default:
      summed over the vocabulary and all response tokens of the batch, divided by their count).
    va_high_fraction / va_lambda / va_tau: VA-OPD's top-fraction token group, the weight of
      the high group and the softmax temperature of the rollout weights.
    privileged: what the teacher's prompt adds to the question (``vicur``): ``hint`` (the record's
      ``[Hint]: ...`` cue), ``answer`` (its reference answer: answer-privileged self-distillation,
      ViCuR's baseline) or ``none`` (the student's prompt). Needs prompt records for hint/answer.
    cue_recovery: the student carries ViCuR's cue-recovery module (``vicur``); with
      ``privileged`` this gives the ablations: full (hint + module), hint only (hint, no module),
      module only (none or answer + module), answer-privilege (answer, no module). A teacher-less
      ``vicur`` run distils from the student's own initial weights (self-distillation); with the
      module's default zero-output init and ``privileged=none`` that teacher equals the initial
      student, so there is no signal: module-only ablations need a separate teacher or ``answer``.
    cue: the module's settings (:class:`~jdelta.models.cue_recovery.CueRecoveryConfig`; the sink
      token is the data tokenizer's turn-opening token, ``<|im_start|>`` / ``<start_of_turn>``, when there is one).
    vicur_clip_low / vicur_clip_high / vicur_dual_clip / vicur_k1_clamp: the ViCuR loss's PPO clip,
      dual clip and k1 clamp (METHODS.md: 0.2 / 0.2 / 3 / 10).
    completion_bucket: the completion axis is trimmed to the longest rollout, rounded up
      to a multiple of this; prompt_bucket: prompts are left-padded to a multiple of this
      (both bound recompilation of the teacher pass and the train step).
    seed: the sampler's and λ coin's base seed (each step folds in the step number).
    engine: how rollouts are sampled: ``static`` (one :class:`~jdelta.sampling.Sampler` batch per
      step) or ``continuous`` (continuous batching, :class:`~jdelta.rollout_engine.RolloutEngine`:
      ``engine_slots`` decode rows kept busy, default the step's prompts x ``rollouts_per_prompt``).
      Row ``r`` draws with ``fold_in(step key, r)`` either way, so the rollouts are the same; one
      device, one process (refused otherwise).
    """

    mode: Mode = "reverse_kl"
    rollouts_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] | None = None
    pad_id: int | None = None
    kl_temperature: float = 1.0
    chunk_size: int = 64
    gkd_beta: float = 0.5
    gkd_lambda: float = 1.0
    gkd_reduction: Literal["sequence_mean", "batchmean"] = "sequence_mean"
    off_policy_source: Literal["dataset", "teacher"] = "dataset"
    va_high_fraction: float = 0.2
    va_lambda: float = 0.5
    va_tau: float = 1.0
    privileged: Literal["hint", "answer", "none"] = "hint"
    cue_recovery: bool = True
    cue: CueRecoveryConfig = dataclasses.field(default_factory=CueRecoveryConfig)
    vicur_clip_low: float = 0.2
    vicur_clip_high: float = 0.2
    vicur_dual_clip: float | None = 3.0
    vicur_k1_clamp: float | None = 10.0
    completion_bucket: int = 32
    prompt_bucket: int = 32
    vocab_size: int | None = None
    seed: int = 0
    engine: Literal["static", "continuous"] = "static"
    engine_slots: int | None = None

    def __post_init__(self):
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        check(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        check(self.off_policy_source in ("dataset", "teacher"), "off_policy_source",
              f"must be 'dataset' or 'teacher', got {self.off_policy_source!r}")
        check(self.rollouts_per_prompt >= 1, "rollouts_per_prompt", f"must be >= 1, got {self.rollouts_per_prompt}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.pad_id is None or self.pad_id >= 0, "pad_id", f"must be >= 0, got {self.pad_id}")
        check(self.kl_temperature > 0, "kl_temperature", f"must be > 0, got {self.kl_temperature}")
        check(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")
        check(0 <= self.gkd_beta <= 1, "gkd_beta", f"must be in [0, 1], got {self.gkd_beta}")
        check(0 <= self.gkd_lambda <= 1, "gkd_lambda", f"must be in [0, 1], got {self.gkd_lambda}")
        check(0 < self.va_high_fraction <= 1, "va_high_fraction", f"must be in (0, 1], got {self.va_high_fraction}")
        check(self.va_lambda >= 0, "va_lambda", f"must be >= 0, got {self.va_lambda}")
        check(self.va_tau > 0, "va_tau", f"must be > 0, got {self.va_tau}")
        check(self.completion_bucket >= 1, "completion_bucket", f"must be >= 1, got {self.completion_bucket}")
        check(self.prompt_bucket >= 1, "prompt_bucket", f"must be >= 1, got {self.prompt_bucket}")
        check(self.gkd_reduction in ("sequence_mean", "batchmean"), "gkd_reduction",
              f"must be 'sequence_mean' or 'batchmean', got {self.gkd_reduction!r}")
        check(self.privileged in ("hint", "answer", "none"), "privileged",
              f"must be 'hint', 'answer' or 'none', got {self.privileged!r}")
        check(self.vicur_clip_low >= 0 and self.vicur_clip_high >= 0, "vicur_clip_low",
              f"clip ratios must be >= 0, got {self.vicur_clip_low}, {self.vicur_clip_high}")
        check(self.vicur_dual_clip is None or self.vicur_dual_clip > 1, "vicur_dual_clip",
              f"must be > 1 (or null: off), got {self.vicur_dual_clip}")
        check(self.vicur_k1_clamp is None or self.vicur_k1_clamp > 0, "vicur_k1_clamp",
              f"must be > 0 (or null: off), got {self.vicur_k1_clamp}")
        check(self.vocab_size is None or self.vocab_size >= 1, "vocab_size", f"must be >= 1, got {self.vocab_size}")
        check(self.engine in ("static", "continuous"), "engine",
              f"must be 'static' or 'continuous', got {self.engine!r}")
        check(self.engine_slots is None or self.engine_slots >= self.rollouts_per_prompt, "engine_slots",
              f"must be >= rollouts_per_prompt ({self.rollouts_per_prompt}), got {self.engine_slots}")

    @property
    def teacher_prompt(self) -> str | None:
        """What the teacher's prompt adds (``hint`` / ``answer``), or None when it is the student's."""
        return self.privileged if self.mode == "vicur" and self.privileged != "none" else None

    def resolved(self, stop_token_ids: tuple[int, ...] = (), pad_id: int = 0,
                 vocab_size: int | None = None) -> DistillConfig:
        """This config with ``stop_token_ids`` / ``pad_id`` / ``vocab_size`` left None filled in
        (from the data source)."""
        return dataclasses.replace(
            self, stop_token_ids=tuple(stop_token_ids) if self.stop_token_ids is None else self.stop_token_ids,
            pad_id=int(pad_id) if self.pad_id is None else self.pad_id,
            vocab_size=vocab_size if self.vocab_size is None else self.vocab_size)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids or (),
                              n=self.rollouts_per_prompt)


def batch_token_count(batch: Mapping[str, jax.Array], mask: jax.Array) -> jax.Array:
    """The token-mean normaliser of a (micro-)batch: the whole step's completion-token count scaled
    to this micro-batch's share of the rows (``batch_tokens`` / ``batch_rows``, one value per row,
    set by the producer), so that the train step's mean over micro-batches of ``sum / count`` is the
    full batch's ``sum / tokens``; without them, ``mask``'s count."""
    if "batch_tokens" not in batch:
        return mask.astype(jnp.float32).sum()
    return batch["batch_tokens"][0] * (mask.shape[0] / batch["batch_rows"][0])


def vocab_size_of(model: nnx.Module) -> int:
    """Columns of the model's LM head ``[H, V]``."""
    return int(model.lm_head_weight().shape[-1])


def check_vocabularies(student: nnx.Module, teacher: nnx.Module) -> int:
    """Raise unless the two LM heads cover the same vocabulary and neither soft-caps its logits
    (the chunked divergences form ``hidden @ head`` uncapped); returns the vocabulary size."""
    from jdelta.models.family import logit_softcap

    vs, vt = vocab_size_of(student), vocab_size_of(teacher)
    if vs != vt:
        raise ValueError(
            f"teacher and student vocabularies differ (student LM head has {vs} entries, teacher {vt}); "
            "per-token distillation needs the same tokenizer and vocabulary")
    for role, model in (("student", student), ("teacher", teacher)):
        if logit_softcap(model) is not None:
            raise ValueError(f"the {role} soft-caps its logits (final_logit_softcapping={logit_softcap(model)}); "
                             "the chunked distillation losses do not (no released Gemma 3 sets it)")
    return vs


# --------------------------------------------------------------------------------------------
# Pure pieces (jit-able)
# --------------------------------------------------------------------------------------------


def teacher_score_fn(graphdef, state, batch, *, t: int, chunk_size: int, with_pixelated: bool, kl_temperature: float,
                     vocab_size: int | None = None, logprobs_only: bool = False):
    """Teacher pass(es): hidden states at completion positions, and (VA) the visual advantage.

    The teacher reads ``teacher_input_ids`` when the batch has them (a privileged prompt), else the
    student's ``input_ids``. Returns ``{"teacher_hidden": [B, T, H_t]}`` plus, when ``with_pixelated``,
    ``"va": [B, T]`` = ``max(log p_T(y_t | image) - log p_T(y_t | pixelated), 0)`` (masked)
    and ``"teacher_logprob"``, ``"teacher_logprob_pixelated"`` ``[B, T]``. ``logprobs_only``: only
    ``"teacher_logprob"`` (ViCuR). Log-probs are over the first ``vocab_size`` ids.
    """
    teacher = nnx.merge(graphdef, state)
    comp, cmask = batch["completion"], batch["completion_mask"]
    ids = batch.get("teacher_input_ids", batch["input_ids"])
    hidden = completion_hidden(teacher, ids, model_inputs(batch, "teacher_"), t)
    out = {} if logprobs_only else {"teacher_hidden": hidden}
    if logprobs_only or with_pixelated:
        head = teacher.lm_head_weight()
        lp = chunked_token_logprobs(hidden, head, comp, cmask, chunk_size=chunk_size, temperature=kl_temperature,
                                    vocab_size=vocab_size).token_logprobs
        out["teacher_logprob"] = lp
    if with_pixelated:
        pix_inputs = model_inputs(batch, "teacher_")
        pix_inputs["pixel_values"], _ = flatten_vision(batch["pixel_values_pixelated"],
                                                       batch["teacher_image_grid_thw"])
        hid_pix = completion_hidden(teacher, ids, pix_inputs, t)
        lp_pix = chunked_token_logprobs(hid_pix, head, comp, cmask, chunk_size=chunk_size,
                                        temperature=kl_temperature, vocab_size=vocab_size).token_logprobs
        out["va"] = jnp.maximum(lp - lp_pix, 0.0) * cmask
        out["teacher_logprob"], out["teacher_logprob_pixelated"] = lp, lp_pix
    return out


def make_distill_loss(cfg: DistillConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(student, batch, rng, teacher_head) -> (loss, aux)`` for :func:`make_train_step`.

    ``batch``: ``input_ids, attention_mask [B, S]``, ``position_ids [B, 3, S]``, optional
    ``pixel_values [B, P, D]``, ``image_grid_thw [B, N, 3]``, ``completion``,
    ``completion_mask [B, T]``, ``teacher_hidden [B, T, H_t]``, (VA) ``teacher_logprob``,
    ``teacher_logprob_pixelated [B, T]`` (sampled-token log-probs, original / pixelated image).
    ``teacher_head``: ``[H_t, V]``. For ``va_opd`` every micro-batch must hold whole prompt
    groups (its size a multiple of ``rollouts_per_prompt``). ``vicur``: see
    :func:`jdelta.distill.vicur.make_vicur_loss` (``teacher_logprob`` instead of ``teacher_hidden``).
    """
    if cfg.mode == "vicur":
        from jdelta.distill.vicur import make_vicur_loss

        return make_vicur_loss(cfg)

    def loss_fn(student, batch, rng, teacher_head):
        del rng
        comp, mask = batch["completion"], batch["completion_mask"]
        t = comp.shape[1]
        hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), t)
        kind = "jsd" if cfg.mode == "gkd" else "reverse_kl"
        per_token = losses.chunked_token_divergence(
            hidden, student.lm_head_weight(), batch["teacher_hidden"], teacher_head, mask,
            kind=kind, beta=cfg.gkd_beta, temperature=cfg.kl_temperature, chunk_size=cfg.chunk_size,
            vocab_size=cfg.vocab_size)
        maskf = mask.astype(jnp.float32)
        n_tok = maskf.sum()
        aux = {
            "reverse_kl" if kind == "reverse_kl" else "gjsd": (per_token * maskf).sum() / jnp.maximum(n_tok, 1.0),
            "completion_tokens": n_tok,
        }
        if cfg.mode == "va_opd":
            loss, va_aux = losses.va_opd_loss(
                batch["teacher_logprob"], batch["teacher_logprob_pixelated"], per_token, mask,
                rollouts_per_prompt=cfg.rollouts_per_prompt, high_weight=cfg.va_lambda,
                weight_temperature=cfg.va_tau, high_fraction=cfg.va_high_fraction)
            aux.update({f"va/{k.removeprefix('va_')}": v for k, v in va_aux.items()})
        elif cfg.mode == "gkd" and cfg.gkd_reduction == "batchmean":
            loss = losses.token_sum_normalized(per_token, mask, batch_token_count(batch, mask))
        else:
            loss = losses.opd_loss(per_token, mask)
        return loss, aux

    return loss_fn


# --------------------------------------------------------------------------------------------
# The producer (host side + teacher jit)
# --------------------------------------------------------------------------------------------


class OnPolicyDistiller:
    """Builds each step's batch: rollouts from the student, scores from the teacher.

    Args:
      student_template: a student module (its structure is used; its parameters are replaced
        by the train state's before every rollout).
      teacher: the frozen teacher module (sharded on ``mesh`` here once).
      cfg: :class:`DistillConfig` (``stop_token_ids`` / ``pad_id`` left None: none / 0; the distill
        stage fills them from the data source first, see :meth:`DistillConfig.resolved`).
      prompts: iterator of left-padded prompt batches (``input_ids``, ``attention_mask``, optional
        ``pixel_values [P, D]``, ``image_grid_thw [N, 3]``, ``pixel_values_pixelated`` for VA,
        ``completion`` for off-policy GKD steps).
    """

    def __init__(self, student_template: nnx.Module, teacher: nnx.Module, cfg: DistillConfig,
                 prompts: Iterator[Mapping[str, Any]], *, mesh: Mesh | None = None, rules: Rules | None = None):
        self.vocab_size = check_vocabularies(student_template, teacher)
        cfg = cfg.resolved()
        if cfg.vocab_size is not None and cfg.vocab_size > self.vocab_size:
            raise ValueError(f"distill.vocab_size={cfg.vocab_size} exceeds the LM head's {self.vocab_size} columns")
        if cfg.engine == "continuous":
            from jdelta.distributed import is_multiprocess

            if mesh is not None or is_multiprocess():
                raise ValueError("distill.engine=continuous runs on one device in one process; use "
                                 "distill.engine=static with a mesh or several processes")
        self.cfg, self.prompts, self.mesh, self.rules = cfg, prompts, mesh, rules
        self._engines: dict[tuple[int, int], Any] = {}  # (model id, prompt length) -> RolloutEngine
        self.engine_stats: dict[str, Any] | None = None  # the last engine call's RolloutEngine stats
        self.student = student_template
        self.teacher = teacher
        self.sampler = Sampler(self.student, mesh=mesh, rules=rules, pad_id=cfg.pad_id)
        self._teacher_sampler: Sampler | None = None
        self.t_graphdef, t_state = nnx.split(teacher)
        if mesh is not None:
            t_state = jax.device_put(t_state, state_shardings(t_state, mesh, rules))
        self.t_state = t_state
        self.teacher_head = teacher.lm_head_weight() if mesh is None else nnx.merge(
            self.t_graphdef, t_state).lm_head_weight()
        self._score = jax.jit(teacher_score_fn, static_argnames=("graphdef", "t", "chunk_size", "with_pixelated",
                                                                  "kl_temperature", "vocab_size", "logprobs_only"))
        self._student_rope, self._teacher_rope = rope_index_fn(student_template), rope_index_fn(teacher)
        self._special = tuple(sorted(set(special_ids(student_template)) | set(special_ids(teacher))))

    # -- helpers ---------------------------------------------------------------------------
    def _put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {k: jax.device_put(v, activation_sharding(self.mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape,
                                                         self.rules)) for k, v in batch.items()}

    def bind(self, state: TrainState) -> nnx.Module:
        """Point the persistent student module at ``state``'s current parameters (no copy)."""
        nnx.update(self.student, state.params, state.rest)
        return self.student

    def _rollout(self, prompts: Mapping[str, Any], state: TrainState, step: int, off_policy: bool):
        cfg = self.cfg
        params = cfg.sampling_params()
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
        if off_policy and cfg.off_policy_source == "dataset":
            if "completion" not in prompts:
                raise ValueError("an off-policy GKD step needs a 'completion' column in the prompt batch "
                                 "(or set off_policy_source=teacher)")
            comp = np.asarray(prompts["completion"], np.int32)
            comp = np.repeat(comp, cfg.rollouts_per_prompt, axis=0)
            lengths = np.asarray(prompts.get("completion_length", (comp != cfg.pad_id).sum(-1)))
            if lengths.shape[0] != comp.shape[0]:
                lengths = np.repeat(lengths, cfg.rollouts_per_prompt)
            return comp, lengths.astype(np.int32)
        sampler = self.sampler
        if off_policy:
            if self._teacher_sampler is None:
                self._teacher_sampler = Sampler(self.teacher, mesh=self.mesh, rules=self.rules, pad_id=cfg.pad_id)
            sampler = self._teacher_sampler
        else:
            self.bind(state)
        inputs = {k: prompts[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
                  if prompts.get(k) is not None}
        if cfg.engine == "continuous":
            res = self._engine_generate(sampler, inputs, params, rng)
        else:
            res = sampler.generate(inputs, params, rng=rng)
        return res.tokens, res.lengths

    def _engine_generate(self, sampler: Sampler, inputs: Mapping[str, Any], params: SamplingParams, rng):
        """``sampler``'s rollouts through continuous batching: the prompts (each with its own
        images) into a :class:`~jdelta.rollout_engine.RolloutEngine` kept per model and prompt
        length; row ``r`` draws with ``fold_in(rng, r)`` as in ``sampler.generate``."""
        from jdelta.buckets import bucket
        from jdelta.completions import split_prompts
        from jdelta.rollout_engine import RolloutEngine

        model = sampler.model
        prompts = split_prompts(model.config, inputs)
        prompt_len = bucket(max(p["input_ids"].size for p in prompts), sampler.seq_buckets)
        key = (id(model), prompt_len)
        if key not in self._engines:
            self._engines[key] = RolloutEngine(
                model, slots=self.cfg.engine_slots or len(prompts) * params.n, prompt_len=prompt_len,
                pad_id=self.cfg.pad_id, patch_buckets=sampler.patch_buckets, image_buckets=sampler.image_buckets,
                rope_index_fn=sampler.rope_index_fn, decode_options=sampler.decode_options)
        res = self._engines[key].generate(prompts, params, rng=rng)
        self.engine_stats = res.stats
        return res

    def build_batch(self, prompts: Mapping[str, Any], completion: np.ndarray, lengths: np.ndarray,
                    ) -> dict[str, np.ndarray]:
        """Host side: repeated prompts + completions -> the per-sample train batch (NumPy)."""
        teacher_prompts = None
        if self.cfg.teacher_prompt is not None:
            if "teacher_input_ids" not in prompts:
                raise ValueError(f"distill.privileged={self.cfg.teacher_prompt} needs the privileged teacher prompts "
                                 "(teacher_input_ids): use data.source=records (the stage sets data.pipeline.with_hint)")
            teacher_prompts = {"input_ids": prompts["teacher_input_ids"],
                               "attention_mask": prompts["teacher_attention_mask"]}
        return assemble_batch(prompts, completion, lengths, rollouts_per_prompt=self.cfg.rollouts_per_prompt,
                              rope_fn=self._student_rope, teacher_rope_fn=self._teacher_rope,
                              pad_id=self.cfg.pad_id, completion_bucket=self.cfg.completion_bucket,
                              prompt_bucket=self.cfg.prompt_bucket,
                              image_token_id=getattr(self.student.config, "image_token_id", None),
                              teacher_prompts=teacher_prompts)

    def score(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        cfg = self.cfg
        va = cfg.mode == "va_opd"
        if va and "pixel_values_pixelated" not in batch:
            raise ValueError("va_opd needs images: the prompt batch has no 'pixel_values_pixelated' "
                             "(the pixelated view of each image, same grid)")
        return self._score(self.t_graphdef, self.t_state, batch, t=int(batch["completion"].shape[1]),
                           chunk_size=cfg.chunk_size, with_pixelated=va, kl_temperature=cfg.kl_temperature,
                           vocab_size=cfg.vocab_size, logprobs_only=cfg.mode == "vicur")

    # -- the producer the loop calls --------------------------------------------------------
    def train_batch(self, prompts: Mapping[str, Any], completion: np.ndarray, lengths: np.ndarray,
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
        """Completions of ``prompts`` -> ``(train batch, teacher scores, host batch)``: assembled,
        scored by the teacher, reduced to what the student's train step reads."""
        host = self.build_batch(prompts, completion, lengths)
        rows = host["completion_mask"].shape[0]
        host["batch_tokens"] = np.full((rows,), host["completion_mask"].sum(), np.float32)
        host["batch_rows"] = np.full((rows,), rows, np.float32)
        dev = self._put(host)
        scores = self.score(dev)
        train = student_view(dev)
        if "teacher_hidden" in scores:
            train["teacher_hidden"] = scores["teacher_hidden"]
        if "teacher_logprob" in scores:  # va_opd, vicur
            train["teacher_logprob"] = scores["teacher_logprob"]
        if "teacher_logprob_pixelated" in scores:
            train["teacher_logprob_pixelated"] = scores["teacher_logprob_pixelated"]
        return train, scores, host

    def produce(self, state: TrainState, step: int) -> StepInput:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = next(self.prompts)
        coin = np.random.default_rng([cfg.seed, step]).random()
        off_policy = cfg.mode == "gkd" and coin >= cfg.gkd_lambda
        self.engine_stats = None
        completion, lengths = self._rollout(prompts, state, step, off_policy)
        completion = np.asarray(completion)
        lengths, n_cut = cut_at_special(completion, lengths, self._special)
        lengths, n_padded = cut_at_padded_ids(completion, lengths, cfg.vocab_size)
        t1 = time.perf_counter()
        train, scores, host = self.train_batch(prompts, completion, lengths)
        jax.block_until_ready(scores)
        t2 = time.perf_counter()
        stats = {
            "rollout/mean_length": float(np.mean(lengths)),
            "rollout/max_length": float(np.max(lengths)),
            "rollout/off_policy": float(off_policy),
            "rollout/cut_at_special": float(n_cut),
            "rollout/cut_at_padded_id": float(n_padded),
        }
        if self.engine_stats is not None:  # engine=continuous: how busy its slots were
            stats["rollout/slot_utilization"] = float(self.engine_stats["utilization"])
            stats["rollout/decode_steps"] = float(self.engine_stats["steps"])
        if "va" in scores:
            from jdelta.distributed import host_array  # a global array spanning processes is gathered

            va = host_array(scores["va"])[host["completion_mask"].astype(bool)]
            stats["va/max"] = float(va.max()) if va.size else 0.0
        tokens = int(host["attention_mask"].sum())
        return StepInput(batch=train, shared=self.teacher_head,
                         timings={"rollout": t1 - t0, "teacher": t2 - t1}, stats=stats, tokens=tokens)


def heldout_reverse_kl(distiller: OnPolicyDistiller, state: TrainState, prompts: Mapping[str, Any],
                       *, seed: int = 12345) -> float:
    """Mean per-token reverse KL(student || teacher) on the student's own samples for ``prompts``
    (exact, full vocabulary, chunked), averaged per response then over responses."""
    cfg = distiller.cfg
    completion, lengths = distiller._rollout(prompts, state, 10_000_000 + seed, off_policy=False)
    completion = np.asarray(completion)
    lengths, _ = cut_at_special(completion, lengths, distiller._special)
    lengths, _ = cut_at_padded_ids(completion, lengths, cfg.vocab_size)
    host = distiller.build_batch(prompts, completion, lengths)
    dev = distiller._put(host)
    teacher_hidden = distiller._score(distiller.t_graphdef, distiller.t_state, dev,
                                      t=int(dev["completion"].shape[1]), chunk_size=cfg.chunk_size,
                                      with_pixelated=False, kl_temperature=cfg.kl_temperature,
                                      vocab_size=cfg.vocab_size)["teacher_hidden"]
    train = student_view(dev)
    train["teacher_hidden"] = teacher_hidden
    loss_fn = make_distill_loss(dataclasses.replace(cfg, mode="reverse_kl"))
    loss, _ = jax.jit(lambda p, b, h: loss_fn(state.model(p), b, None, h))(state.params, train, distiller.teacher_head)
    return float(loss)
