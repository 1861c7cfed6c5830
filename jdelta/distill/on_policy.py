"""On-policy distillation: student rollouts -> teacher scores -> per-token loss -> update.

One step (:meth:`OnPolicyDistiller.produce` builds the batch, the jitted train step
consumes it):

1. **Rollout** (timed ``rollout``): the student samples ``rollouts_per_prompt`` completions
   per prompt with :class:`jdelta.sampling.Sampler`. The sampler wraps one persistent
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
``gkd`` (generalized JSD with ``gkd_beta``, same reduction) and ``va_opd`` (METHODS.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta import losses
from jdelta.config import build
from jdelta.distill.loop import StepInput
from jdelta.distill.rollout import flatten_vision, images_per_row, repeat_prompts, stack_vision
from jdelta.distill.train_state import TrainState
from jdelta.logprobs import chunked_token_logprobs, prepare_score_inputs
from jdelta.sampling import Sampler, SamplingParams
from jdelta.sharding import Rules, activation_sharding, state_shardings

MODES = ("reverse_kl", "gkd", "va_opd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What an on-policy step does (defaults: the VA-OPD recipe where it sets one).

    mode: ``reverse_kl`` | ``gkd`` | ``va_opd``.
    rollouts_per_prompt: K samples per prompt (VA-OPD normalises weights over them).
    temperature / top_p / top_k / max_new_tokens / stop_token_ids: rollout sampling.
    pad_id: padding token id for prompts and finished rows.
    kl_temperature: temperature of both distributions in the divergence (1 in VA-OPD).
    kl_chunk: positions per chunk in the chunked divergence (peak ``B * chunk * V`` floats; 64 keeps
      the loss's temp memory >= 8x below the naive one at V = 151,936, see benchmarks/RESULTS.md).
    gkd_beta: the generalized-JSD mixing weight (see :mod:`jdelta.losses` for the convention).
    gkd_lambda: probability that a step is on-policy (GKD's λ); otherwise it trains on
      ``off_policy_source`` completions: ``dataset`` (the batch's ``completion`` column,
      token ids right-padded with ``pad_id``) or ``teacher`` (teacher samples).
    va_high_fraction / va_lambda / va_tau: VA-OPD's top-fraction token group, the weight of
      the high group and the softmax temperature of the rollout weights.
    completion_bucket: the completion axis is trimmed to the longest rollout, rounded up
      to a multiple of this; prompt_bucket: prompts are left-padded to a multiple of this
      (both bound recompilation of the teacher pass and the train step).
    seed: the sampler's and λ coin's base seed (each step folds in the step number).
    """

    mode: str = "reverse_kl"
    rollouts_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    kl_temperature: float = 1.0
    kl_chunk: int = 64
    gkd_beta: float = 0.5
    gkd_lambda: float = 1.0
    off_policy_source: str = "dataset"
    va_high_fraction: float = 0.2
    va_lambda: float = 0.5
    va_tau: float = 1.0
    completion_bucket: int = 32
    prompt_bucket: int = 32
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.mode not in MODES:
            raise ValueError(f"distill.mode={self.mode!r}; expected one of {MODES}")
        if self.off_policy_source not in ("dataset", "teacher"):
            raise ValueError(f"off_policy_source={self.off_policy_source!r}; expected 'dataset' or 'teacher'")
        if not 0.0 <= self.gkd_lambda <= 1.0:
            raise ValueError(f"gkd_lambda must be in [0, 1], got {self.gkd_lambda}")
        if self.rollouts_per_prompt < 1:
            raise ValueError(f"rollouts_per_prompt must be >= 1, got {self.rollouts_per_prompt}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> DistillConfig:
        return build(cls, cfg or {})

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids,
                              n=self.rollouts_per_prompt)


def vocab_size_of(model: nnx.Module) -> int:
    """Columns of the model's LM head ``[H, V]``."""
    return int(model.lm_head_weight().shape[-1])


def check_vocabularies(student: nnx.Module, teacher: nnx.Module) -> int:
    """Raise unless the two LM heads cover the same vocabulary; returns its size."""
    vs, vt = vocab_size_of(student), vocab_size_of(teacher)
    if vs != vt:
        raise ValueError(
            f"teacher and student vocabularies differ (student LM head has {vs} entries, teacher {vt}); "
            "per-token distillation needs the same tokenizer and vocabulary")
    return vs


def _rope_fn(model: nnx.Module) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    from jdelta.sampling import _default_rope_index

    return _default_rope_index(model)


def special_ids(model: nnx.Module) -> tuple[int, ...]:
    """Token ids a completion must not contain (they would be read as image placeholders)."""
    cfg = getattr(model, "config", None)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return tuple(int(getattr(cfg, n)) for n in names if getattr(cfg, n, None) is not None)


def cut_at_special(tokens: np.ndarray, lengths: np.ndarray, ids: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Truncate each row before its first vision special token (a rollout that emits an image
    placeholder would make the training sequence claim an image it does not have).
    Returns the new lengths and how many rows were cut."""
    lengths = np.asarray(lengths, np.int32)
    if not ids:
        return lengths, 0
    hit = np.isin(np.asarray(tokens), np.asarray(ids)) & (np.arange(tokens.shape[1])[None] < lengths[:, None])
    first = np.where(hit.any(1), hit.argmax(1), lengths).astype(np.int32)
    return first, int((first < lengths).sum())


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


# --------------------------------------------------------------------------------------------
# Pure pieces (jit-able)
# --------------------------------------------------------------------------------------------


def model_inputs(batch: Mapping[str, jax.Array], prefix: str = "") -> dict[str, Any]:
    """Train-batch layout (per-sample, splittable) -> the model's call layout.

    ``position_ids [B, 3, S] -> [3, B, S]``; ``pixel_values [B, P, D] -> [B*P, D]``.
    """
    pv, grid = flatten_vision(batch.get(prefix + "pixel_values"), batch.get(prefix + "image_grid_thw"))
    return {
        "attention_mask": batch[prefix + "attention_mask"],
        "position_ids": jnp.swapaxes(batch[prefix + "position_ids"], 0, 1),
        "pixel_values": pv,
        "image_grid_thw": grid,
    }


def completion_hidden(model: nnx.Module, input_ids: jax.Array, inputs: Mapping[str, Any], t: int) -> jax.Array:
    """Final hidden states that predict the last ``t`` tokens: ``[B, t, H]``."""
    out = model(input_ids, return_logits=False, **inputs)
    return out.hidden_states[:, -t - 1:-1, :]


def teacher_score_fn(graphdef, state, batch, *, t: int, chunk: int, with_degraded: bool, kl_temperature: float):
    """Teacher pass(es): hidden states at completion positions, and (VA) the visual advantage.

    Returns ``{"teacher_hidden": [B, T, H_t]}`` plus, when ``with_degraded``,
    ``"va": [B, T]`` = ``max(log p_T(y_t | image) - log p_T(y_t | pixelated), 0)`` (masked)
    and ``"teacher_logprob"``, ``"teacher_logprob_degraded"`` ``[B, T]``.
    """
    teacher = nnx.merge(graphdef, state)
    comp, cmask = batch["completion"], batch["completion_mask"]
    hidden = completion_hidden(teacher, batch["input_ids"], model_inputs(batch, "teacher_"), t)
    out = {"teacher_hidden": hidden}
    if with_degraded:
        head = teacher.lm_head_weight()
        lp = chunked_token_logprobs(hidden, head, comp, cmask, chunk_size=chunk,
                                    temperature=kl_temperature).token_logprobs
        deg_inputs = model_inputs(batch, "teacher_")
        deg_inputs["pixel_values"], _ = flatten_vision(batch["pixel_values_pixelated"],
                                                       batch["teacher_image_grid_thw"])
        hid_deg = completion_hidden(teacher, batch["input_ids"], deg_inputs, t)
        lp_deg = chunked_token_logprobs(hid_deg, head, comp, cmask, chunk_size=chunk,
                                        temperature=kl_temperature).token_logprobs
        out["va"] = jnp.maximum(lp - lp_deg, 0.0) * cmask
        out["teacher_logprob"], out["teacher_logprob_degraded"] = lp, lp_deg
    return out


def make_distill_loss(cfg: DistillConfig) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """``loss_fn(student, batch, rng, teacher_head) -> (loss, aux)`` for :func:`make_train_step`.

    ``batch``: ``input_ids, attention_mask [B, S]``, ``position_ids [B, 3, S]``, optional
    ``pixel_values [B, P, D]``, ``image_grid_thw [B, N, 3]``, ``completion``,
    ``completion_mask [B, T]``, ``teacher_hidden [B, T, H_t]``, (VA) ``teacher_logprob``,
    ``teacher_logprob_degraded [B, T]`` (sampled-token log-probs, original / pixelated image).
    ``teacher_head``: ``[H_t, V]``. For ``va_opd`` every micro-batch must hold whole prompt
    groups (its size a multiple of ``rollouts_per_prompt``).
    """

    def loss_fn(student, batch, rng, teacher_head):
        del rng
        comp, mask = batch["completion"], batch["completion_mask"]
        t = comp.shape[1]
        hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), t)
        kind = "jsd" if cfg.mode == "gkd" else "reverse_kl"
        per_token = losses.chunked_token_divergence(
            hidden, student.lm_head_weight(), batch["teacher_hidden"], teacher_head, mask,
            kind=kind, beta=cfg.gkd_beta, temperature=cfg.kl_temperature, chunk_size=cfg.kl_chunk)
        maskf = mask.astype(jnp.float32)
        n_tok = maskf.sum()
        aux = {
            "reverse_kl" if kind == "reverse_kl" else "gjsd": (per_token * maskf).sum() / jnp.maximum(n_tok, 1.0),
            "completion_tokens": n_tok,
        }
        if cfg.mode == "va_opd":
            loss, va_aux = losses.va_opd_loss(
                batch["teacher_logprob"], batch["teacher_logprob_degraded"], per_token, mask,
                rollouts_per_prompt=cfg.rollouts_per_prompt, high_weight=cfg.va_lambda,
                weight_temperature=cfg.va_tau, high_fraction=cfg.va_high_fraction)
            aux.update({f"va/{k.removeprefix('va_')}": v for k, v in va_aux.items()})
        else:
            loss = losses.opd_loss(per_token, mask)
        return loss, aux

    return loss_fn


def assemble_batch(
    prompts: Mapping[str, Any],
    completion: np.ndarray,
    lengths: np.ndarray,
    *,
    rollouts_per_prompt: int,
    rope_fn: Callable[..., tuple[np.ndarray, np.ndarray]],
    teacher_rope_fn: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
    pad_id: int = 0,
    completion_bucket: int = 32,
    prompt_bucket: int = 1,
    image_token_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Host side: left-padded prompts (``B`` rows, model vision layout) and their completions
    (``[B*K, T]``, lengths ``[B*K]``, rows prompt-major) -> the per-sample train batch.

    Returns NumPy ``input_ids, attention_mask [B*K, S+T']``, ``position_ids [B*K, 3, S+T']``,
    ``completion, completion_mask [B*K, T']`` (``T'``: longest length rounded up to
    ``completion_bucket``), per-sample vision ``pixel_values [B*K, P, D]``,
    ``image_grid_thw [B*K, N, 3]`` (+ ``pixel_values_pixelated``), the same under ``teacher_*``
    (teacher positions from ``teacher_rope_fn``), and ``prompt_index``. Images are assigned
    to rows by counting image-token runs (``image_token_id``) unless the batch gives
    ``images_per_sample``.
    """
    k = rollouts_per_prompt
    b = np.asarray(prompts["input_ids"]).shape[0]
    if completion.shape[0] != b * k:
        raise ValueError(f"{completion.shape[0]} completions for {b} prompts x {k} rollouts")
    lengths = np.asarray(lengths, np.int32)
    if int(lengths.sum()) == 0:
        raise ValueError("the completion mask is empty (every rollout has length 0); nothing to train on")
    t = min(completion.shape[1], _round_up(int(lengths.max()), completion_bucket))
    completion = completion[:, :t]
    lengths = np.minimum(lengths, t)
    cmask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
    ids, pmask = np.asarray(prompts["input_ids"], np.int32), np.asarray(prompts["attention_mask"], np.int32)
    extra = _round_up(ids.shape[1], prompt_bucket) - ids.shape[1]
    if extra:
        ids = np.concatenate([np.full((b, extra), pad_id, np.int32), ids], axis=1)
        pmask = np.concatenate([np.zeros((b, extra), np.int32), pmask], axis=1)
    per_sample: dict[str, Any] = {"input_ids": ids, "attention_mask": pmask}
    if prompts.get("pixel_values") is not None:
        per_row = prompts.get("images_per_sample")
        if per_row is None and image_token_id is not None:
            per_row = images_per_row(ids, pmask, image_token_id)
        per_sample["pixel_values"], per_sample["image_grid_thw"] = stack_vision(
            prompts["pixel_values"], prompts["image_grid_thw"], images_per_sample=per_row)
        pixelated = prompts.get("pixel_values_pixelated")
        if pixelated is None:
            pixelated = prompts.get("pixel_values_degraded")  # the name used before the data pipeline landed
        if pixelated is not None:
            per_sample["pixel_values_pixelated"], _ = stack_vision(
                pixelated, prompts["image_grid_thw"], images_per_sample=per_row)
    rep = repeat_prompts(per_sample, k)
    flat_pv, flat_grid = flatten_vision(rep.get("pixel_values"), rep.get("image_grid_thw"))
    host_prompt = {"input_ids": rep["input_ids"], "attention_mask": rep["attention_mask"],
                   "pixel_values": flat_pv, "image_grid_thw": flat_grid}
    s_in = prepare_score_inputs(host_prompt, completion, cmask, rope_fn, pad_id=pad_id)
    t_pos = s_in["position_ids"]
    if teacher_rope_fn is not None and teacher_rope_fn is not rope_fn:
        t_pos, _ = teacher_rope_fn(s_in["input_ids"], flat_grid, s_in["attention_mask"])
    out = {
        "input_ids": s_in["input_ids"],
        "attention_mask": s_in["attention_mask"],
        "position_ids": np.swapaxes(s_in["position_ids"], 0, 1),
        "completion": np.where(cmask > 0, completion, pad_id).astype(np.int32),
        "completion_mask": cmask,
        "teacher_attention_mask": s_in["attention_mask"],
        "teacher_position_ids": np.swapaxes(np.asarray(t_pos, np.int32), 0, 1),
        "prompt_index": rep["prompt_index"],
    }
    if "pixel_values" in rep:
        out["pixel_values"], out["image_grid_thw"] = rep["pixel_values"], rep["image_grid_thw"]
        out["teacher_pixel_values"], out["teacher_image_grid_thw"] = rep["pixel_values"], rep["image_grid_thw"]
        if "pixel_values_pixelated" in rep:
            out["pixel_values_pixelated"] = rep["pixel_values_pixelated"]
    return out



# --------------------------------------------------------------------------------------------
# The producer (host side + teacher jit)
# --------------------------------------------------------------------------------------------


class OnPolicyDistiller:
    """Builds each step's batch: rollouts from the student, scores from the teacher.

    Args:
      student_template: a student module (its structure is used; its parameters are replaced
        by the train state's before every rollout).
      teacher: the frozen teacher module (sharded on ``mesh`` here once).
      cfg: :class:`DistillConfig`.
      prompts: iterator of left-padded prompt batches (``input_ids``, ``attention_mask``, optional
        ``pixel_values [P, D]``, ``image_grid_thw [N, 3]``, ``pixel_values_pixelated`` for VA,
        ``completion`` for off-policy GKD steps).
    """

    def __init__(self, student_template: nnx.Module, teacher: nnx.Module, cfg: DistillConfig,
                 prompts: Iterator[Mapping[str, Any]], *, mesh: Mesh | None = None, rules: Rules | None = None):
        self.vocab_size = check_vocabularies(student_template, teacher)
        self.cfg, self.prompts, self.mesh, self.rules = cfg, prompts, mesh, rules
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
        self._score = jax.jit(teacher_score_fn, static_argnames=("graphdef", "t", "chunk", "with_degraded",
                                                                  "kl_temperature"))
        self._student_rope, self._teacher_rope = _rope_fn(student_template), _rope_fn(teacher)
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
        res = sampler.generate({k: prompts[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                        "image_grid_thw") if prompts.get(k) is not None},
                               params, rng=rng)
        return res.tokens, res.lengths

    def build_batch(self, prompts: Mapping[str, Any], completion: np.ndarray, lengths: np.ndarray,
                    ) -> dict[str, np.ndarray]:
        """Host side: repeated prompts + completions -> the per-sample train batch (NumPy)."""
        return assemble_batch(prompts, completion, lengths, rollouts_per_prompt=self.cfg.rollouts_per_prompt,
                              rope_fn=self._student_rope, teacher_rope_fn=self._teacher_rope,
                              pad_id=self.cfg.pad_id, completion_bucket=self.cfg.completion_bucket,
                              prompt_bucket=self.cfg.prompt_bucket,
                              image_token_id=getattr(self.student.config, "image_token_id", None))

    def score(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        cfg = self.cfg
        va = cfg.mode == "va_opd"
        if va and "pixel_values_pixelated" not in batch:
            raise ValueError("va_opd needs images: the prompt batch has no 'pixel_values_pixelated' "
                             "(the pixelated view of each image, same grid)")
        return self._score(self.t_graphdef, self.t_state, batch, t=int(batch["completion"].shape[1]),
                           chunk=cfg.kl_chunk, with_degraded=va, kl_temperature=cfg.kl_temperature)

    # -- the producer the loop calls --------------------------------------------------------
    def produce(self, state: TrainState, step: int) -> StepInput:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = next(self.prompts)
        coin = np.random.default_rng([cfg.seed, step]).random()
        off_policy = cfg.mode == "gkd" and coin >= cfg.gkd_lambda
        completion, lengths = self._rollout(prompts, state, step, off_policy)
        completion = np.asarray(completion)
        lengths, n_cut = cut_at_special(completion, lengths, self._special)
        host = self.build_batch(prompts, completion, lengths)
        t1 = time.perf_counter()
        dev = self._put(host)
        scores = self.score(dev)
        jax.block_until_ready(scores)
        t2 = time.perf_counter()
        train = {k: v for k, v in dev.items() if not k.startswith("teacher_") and k != "prompt_index"
                 and k != "pixel_values_pixelated"}
        train["teacher_hidden"] = scores["teacher_hidden"]
        stats = {
            "rollout/mean_length": float(np.mean(lengths)),
            "rollout/max_length": float(np.max(lengths)),
            "rollout/off_policy": float(off_policy),
            "rollout/cut_at_special": float(n_cut),
        }
        if "va" in scores:
            train["teacher_logprob"] = scores["teacher_logprob"]
            train["teacher_logprob_degraded"] = scores["teacher_logprob_degraded"]
            va = np.asarray(scores["va"])[host["completion_mask"].astype(bool)]
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
    host = distiller.build_batch(prompts, completion, lengths)
    dev = distiller._put(host)
    teacher_hidden = distiller._score(distiller.t_graphdef, distiller.t_state, dev,
                                      t=int(dev["completion"].shape[1]), chunk=cfg.kl_chunk,
                                      with_degraded=False, kl_temperature=cfg.kl_temperature)["teacher_hidden"]
    train = {k: v for k, v in dev.items() if not k.startswith("teacher_") and k not in (
        "prompt_index", "pixel_values_pixelated")}
    train["teacher_hidden"] = teacher_hidden
    loss_fn = make_distill_loss(dataclasses.replace(cfg, mode="reverse_kl"))
    loss, _ = jax.jit(lambda p, b, h: loss_fn(state.model(p), b, None, h))(state.params, train, distiller.teacher_head)
    return float(loss)
