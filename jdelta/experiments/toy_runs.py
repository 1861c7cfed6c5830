"""In-process training runs on the toy world for experiments 2, 3, 4 and 6 (library paths only).

Everything here drives jdelta's own library code, at toy scale and in memory:

* prompts: :func:`jdelta.data.pipeline.make_prompt_batches` over in-memory records (the chat
  template and image processing the sampler and the ``distill`` stage use);
* Δ per prompt: :func:`jdelta.delta_scoring.score_prompts` (n answers per model, total variation,
  permutation test);
* on-policy distillation (OPD, VA-OPD, ViCuR): :class:`jdelta.distill.on_policy.OnPolicyDistiller`
  with :func:`~jdelta.distill.on_policy.make_distill_loss` and :func:`jdelta.distill.step.make_train_step`;
* off-policy SFT: teacher samples (:class:`jdelta.sampling.Sampler`) as
  :class:`jdelta.distill.sft.SampleSFTIterator` batches, :func:`jdelta.distill.sft.make_sft_loss`;
* held-out accuracy: :func:`jdelta.toy.evaluate.greedy_correct` (greedy exact match, per family).

Each run returns the trained student module and its curves ``{metric: [(step, value)]}``
(held-out accuracy per family every ``eval_every`` steps, and the train loss).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.data.records import PromptRecord

Curves = dict[str, list[tuple[int, float]]]


@dataclass
class ToyPair:
    """A loaded toy pair: models, tokenizer, world and directories."""

    teacher: Any
    student: Any
    tokenizer: Any
    world: Any
    teacher_dir: Path
    student_dir: Path


def load_pair(root: str | Path | None = None) -> ToyPair:
    """The shipped toy pair (or a ``jdelta toy-models`` output directory)."""
    from jdelta.config import build
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
    from jdelta.toy import toy_info, trained_pair
    from jdelta.toy.world import WorldConfig

    t_dir, s_dir = trained_pair(root)
    world = build(WorldConfig, toy_info(t_dir)["world"])
    return ToyPair(load_hf_checkpoint(t_dir)[0], load_hf_checkpoint(s_dir)[0], load_tokenizer(t_dir), world,
                   t_dir, s_dir)


def copy_model(model):
    """A copy with its own buffers (train steps donate their input state)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def encode_heldout(pair: ToyPair, per_family: int, *, split: str = "heldout", with_pixelated: bool = False):
    """``per_family`` records per family of ``split`` as :class:`jdelta.toy.train.Encoded` rows."""
    from jdelta.toy.train import encode_records
    from jdelta.toy.world import world_records

    w = pair.world
    recs = world_records(w, split, per_family * len(w.families))
    return encode_records(recs, pair.tokenizer, width=w.width, height=w.height, length=64,
                          with_pixelated=with_pixelated)


def accuracy(model, enc, names: Sequence[str]) -> dict[str, float]:
    """Greedy held-out accuracy per family and ``all`` (fractions)."""
    from jdelta.toy.evaluate import by_family, greedy_correct

    rows = by_family(greedy_correct(model, enc, batch_size=100), enc.families, names)
    return {k: v["accuracy"] for k, v in rows.items()}


def pipeline_config(pair: ToyPair, batch_size: int, *, with_pixelated: bool = False, privileged: str | None = None,
                    epochs: int | None = None):
    """The prompt pipeline at the world's image size (kept as is), whole batches of ``batch_size``."""
    from jdelta.data.image_processor import ImageConfig
    from jdelta.data.pipeline import PipelineConfig

    px = pair.world.pixels
    return PipelineConfig(batch_size=batch_size, seq_buckets=(64, 128), patch_buckets=(1024, 2048, 4096),
                          image_buckets=(8, 16, 32, 64),
                          image=ImageConfig(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=px,
                                            max_pixels=px),
                          with_pixelated=with_pixelated, with_hint=privileged is not None,
                          privileged=privileged or "hint", drop_remainder=epochs is None, num_epochs=epochs,
                          on_error="raise")


def prompt_batches(pair: ToyPair, records: Sequence[PromptRecord], batch_size: int, *, seed: int,
                   with_pixelated: bool = False, privileged: str | None = None):
    """An endless shuffled stream of prompt batches over ``records``."""
    from jdelta.data.pipeline import make_prompt_batches

    cfg = pipeline_config(pair, batch_size, with_pixelated=with_pixelated, privileged=privileged)
    return make_prompt_batches(list(records), tokenizer=pair.tokenizer, seed=seed, config=cfg)


def special(pair: ToyPair):
    from jdelta.data.tokenizer import SpecialTokens

    return SpecialTokens.from_tokenizer(pair.tokenizer)


# ----------------------------------------------------------------------------- Δ per prompt


def score_delta(pair: ToyPair, records: Sequence[PromptRecord], *, n: int, seed: int, teacher=None,
                student=None) -> list[dict]:
    """Δ per prompt (library :func:`jdelta.delta_scoring.score_prompts`): ``n`` answers per model at
    temperature 1; entries in record order (``delta.tv``, ``zero_delta.permutation``, ``family``...)."""
    from jdelta.config import PromptConfig, SamplingConfig
    from jdelta.delta_scoring import DeltaTestConfig, score_prompts

    px = pair.world.pixels
    return score_prompts(teacher if teacher is not None else pair.teacher,
                         student if student is not None else pair.student, list(records),
                         tokenizer=pair.tokenizer,
                         sampling=SamplingConfig(n=n, temperature=1.0, max_new_tokens=8, batch_size=32, seed=seed),
                         prompt=PromptConfig(min_pixels=px, max_pixels=px),
                         tests=DeltaTestConfig(num_permutations=199, num_posterior_draws=200), seed=seed)


def delta_split(entries: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Indices of the scored entries whose Δ is significantly non-zero, and of the zero-Δ ones."""
    pos, zero = [], []
    for i, e in enumerate(entries):
        if e.get("status") != "scored":
            continue
        (zero if e["zero_delta"]["permutation"] else pos).append(i)
    return pos, zero


# ----------------------------------------------------------------------------- training runs


@dataclass(frozen=True)
class RunSettings:
    """One training run: steps x batch prompts (x rollouts for on-policy), AdamW at ``lr``
    (constant after ``warmup_steps``, no weight decay, clip 1.0), evaluation every ``eval_every``."""

    steps: int
    batch: int
    lr: float
    rollouts: int = 4
    temperature: float = 1.0
    warmup_steps: int = 5
    eval_every: int = 0


def _optimizer(rs: RunSettings):
    from jdelta.distill.train_state import OptimizerConfig, make_optimizer

    return make_optimizer(OptimizerConfig(learning_rate=rs.lr, b1=0.9, b2=0.98, weight_decay=0.0,
                                          schedule="constant", warmup_steps=rs.warmup_steps,
                                          total_steps=max(rs.steps, 1), clip_norm=1.0))


def _loop(state, step_fn, produce, rs: RunSettings, evaluate: Callable[[Any], dict[str, float]] | None,
          log: Callable[[str], None] | None, name: str) -> tuple[Any, Curves]:
    curves: Curves = {}

    def record(step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            curves.setdefault(k, []).append((step, float(v)))

    if evaluate is not None and rs.eval_every:
        record(0, evaluate(state.model()))
    t0 = time.perf_counter()
    for step in range(rs.steps):
        inp = produce(state, step)
        state, metrics = step_fn(state, inp.batch, inp.shared)
        record(step + 1, {"loss": float(metrics["loss"])})
        if evaluate is not None and rs.eval_every and ((step + 1) % rs.eval_every == 0 or step + 1 == rs.steps):
            acc = evaluate(state.model())
            record(step + 1, acc)
            if log is not None:
                log(f"  {name} step {step + 1}/{rs.steps} loss {float(metrics['loss']):.4f} "
                    f"acc {' '.join(f'{k} {100 * v:.0f}' for k, v in acc.items())} ({time.perf_counter() - t0:.0f} s)")
    return state, curves


def opd_run(pair: ToyPair, records: Sequence[PromptRecord], rs: RunSettings, *, seed: int, mode: str = "reverse_kl",
            student=None, teacher=None, evaluate=None, log=None, name: str = "opd",
            privileged: str = "none", cue_recovery: bool = False) -> tuple[Any, Curves]:
    """On-policy distillation of (a copy of) ``student`` towards ``teacher`` on ``records``
    (``mode``: reverse_kl = standard OPD, va_opd, vicur with ``privileged`` / ``cue_recovery``).
    A ``vicur`` run without a teacher is self-distillation from the student's initial weights."""
    from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
    from jdelta.distill.step import jit_train_step, make_train_step
    from jdelta.distill.train_state import TrainState

    sp = special(pair)
    student = copy_model(student if student is not None else pair.student)
    if mode == "vicur":
        from jdelta.distill.vicur import self_teacher, with_cue_recovery
        from jdelta.models.cue_recovery import CueRecoveryConfig

        if teacher is None:
            teacher = self_teacher(student)
        if cue_recovery:
            with_cue_recovery(student, CueRecoveryConfig(), sink_token_id=sp.im_start)
    teacher = teacher if teacher is not None else pair.teacher
    dcfg = DistillConfig(mode=mode, rollouts_per_prompt=rs.rollouts, temperature=rs.temperature, top_p=1.0,
                         max_new_tokens=8, chunk_size=16, completion_bucket=8, prompt_bucket=64, seed=seed,
                         privileged=privileged if privileged != "none" else "none", cue_recovery=cue_recovery)
    dcfg = dcfg.resolved(tuple(sp.stop_ids), int(sp.pad), len(pair.tokenizer))
    tp = dcfg.teacher_prompt
    batches = prompt_batches(pair, records, rs.batch, seed=seed, with_pixelated=mode == "va_opd", privileged=tp)
    state = TrainState.create(student, _optimizer(rs), seed=seed)
    producer = OnPolicyDistiller(state.model(), teacher, dcfg, batches)
    step_fn = jit_train_step(make_train_step(make_distill_loss(dcfg)), state)
    state, curves = _loop(state, step_fn, producer.produce, rs, evaluate, log, name)
    return state.model(), curves


def teacher_samples(pair: ToyPair, records: Sequence[PromptRecord], *, n: int, seed: int, teacher=None,
                    temperature: float = 1.0) -> list[tuple[int, tuple[int, ...]]]:
    """``n`` sampled answers of the teacher per record (library :class:`jdelta.sampling.Sampler`):
    ``[(record index, response token ids incl. the stop token)]``."""
    from jdelta.data.pipeline import make_prompt_batches
    from jdelta.sampling import Sampler, SamplingParams

    sp = special(pair)
    teacher = teacher if teacher is not None else pair.teacher
    cfg = pipeline_config(pair, 32, epochs=1)
    it = make_prompt_batches(list(records), tokenizer=pair.tokenizer, seed=seed, shuffle=False, config=cfg)
    sampler = Sampler(teacher, pad_id=int(sp.pad))
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=8,
                            stop_token_ids=tuple(sp.stop_ids), n=n)
    out: list[tuple[int, tuple[int, ...]]] = []
    for b_i, b in enumerate(it):
        res = sampler.generate({k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")},
                               params, rng=jax.random.fold_in(jax.random.key(seed), b_i))
        idx = np.asarray(b["record_index"])
        for row in range(res.tokens.shape[0]):
            ri = int(idx[int(res.prompt_index[row])])
            if ri < 0:
                continue
            out.append((ri, tuple(int(t) for t in res.tokens[row, : int(res.lengths[row])])))
    return out


def sft_run(pair: ToyPair, records: Sequence[PromptRecord], samples: Sequence[tuple[int, tuple[int, ...]]],
            rs: RunSettings, *, seed: int, student=None, evaluate=None, log=None, name: str = "sft") -> tuple[Any, Curves]:
    """Off-policy SFT (library :func:`jdelta.distill.sft.make_sft_loss`) of a copy of ``student`` on
    ``samples`` (``(record index, response ids)``, e.g. :func:`teacher_samples`) of ``records``."""
    from jdelta.data.pipeline import SkipReport, make_prompt_batches
    from jdelta.distill.sft import SampleRow, SampleSFTIterator, SFTConfig, SFTProducer, make_sft_loss
    from jdelta.distill.step import jit_train_step, make_train_step
    from jdelta.distill.train_state import TrainState

    sp = special(pair)
    rows = [SampleRow(i, records[ri].id, ri, 0, ids) for i, (ri, ids) in enumerate(samples)]
    joined = [records[r.record_index] for r in rows]  # one prompt record per sample row
    parent = make_prompt_batches(joined, tokenizer=pair.tokenizer, seed=seed, config=pipeline_config(pair, rs.batch))
    batches = SampleSFTIterator(parent, rows, SkipReport(), int(sp.pad))
    scfg = SFTConfig(chunk_size=16, completion_bucket=8, prompt_bucket=64, pad_id=int(sp.pad))
    student = copy_model(student if student is not None else pair.student)
    state = TrainState.create(student, _optimizer(rs), seed=seed)
    producer = SFTProducer(state.model(), batches, scfg)
    step_fn = jit_train_step(make_train_step(make_sft_loss(scfg)), state)
    state, curves = _loop(state, step_fn, producer.produce, rs, evaluate, log, name)
    return state.model(), curves


# ----------------------------------------------------------------------------- summaries


def family_records(records: Sequence[PromptRecord], families: Sequence[str]) -> list[PromptRecord]:
    keep = set(families)
    return [r for r in records if r.family in keep]


def pick(rng: np.random.Generator, items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items drawn without replacement (all of them, shuffled, when fewer)."""
    order = rng.permutation(len(items))[: min(n, len(items))]
    return [items[int(i)] for i in order]


def replace_settings(settings, **kw):
    return dataclasses.replace(settings, **kw)


__all__ = ["Curves", "RunSettings", "ToyPair", "accuracy", "copy_model", "delta_split", "encode_heldout",
           "load_pair", "opd_run", "pick", "prompt_batches", "score_delta", "sft_run", "teacher_samples"]
