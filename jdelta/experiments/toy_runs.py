"""In-process training runs on the toy world for experiments 2, 3, 4 and 6 (library paths only).

Everything here drives jdelta's own library code, at toy scale and in memory:

* prompts: :func:`jdelta.data.pipeline.make_prompt_batches` over in-memory records (the chat
  template, image processing and privileged ``[Hint]`` / answer prompts the ``distill`` stage uses);
* on-policy distillation (OPD, VA-OPD, ViCuR): :class:`jdelta.distill.on_policy.OnPolicyDistiller`
  with :func:`~jdelta.distill.on_policy.make_distill_loss` and :func:`jdelta.distill.step.make_train_step`;
* off-policy SFT: teacher samples (:class:`jdelta.sampling.Sampler`) as
  :class:`jdelta.distill.sft.SampleSFTIterator` batches, :func:`jdelta.distill.sft.make_sft_loss`;
* a new toy model trained from scratch (:func:`jdelta.toy.train.train_model`) for the transfer
  experiment.

Unlike :class:`jdelta.experiments.common.Distiller` (the shipped student, prompts from encoded rows),
these runs take any student/teacher and the prompt pipeline's privileged prompts (ViCuR). Each run
returns the trained student module and its curves ``{metric: [(step, value)]}``
(held-out accuracy per family every ``eval_every`` steps, and the train loss).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.data.records import PromptRecord
from jdelta.experiments.common import Pair

Curves = dict[str, list[tuple[int, float]]]


def copy_model(model):
    """A copy with its own buffers (train steps donate their input state)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def pipeline_config(pair: Pair, batch_size: int, *, with_pixelated: bool = False, privileged: str | None = None,
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


def prompt_batches(pair: Pair, records: Sequence[PromptRecord], batch_size: int, *, seed: int,
                   with_pixelated: bool = False, privileged: str | None = None):
    """An endless shuffled stream of prompt batches over ``records``."""
    from jdelta.data.pipeline import make_prompt_batches

    cfg = pipeline_config(pair, batch_size, with_pixelated=with_pixelated, privileged=privileged)
    return make_prompt_batches(list(records), tokenizer=pair.tokenizer, seed=seed, config=cfg)


def special(pair: Pair):
    """The special token ids of the pair's tokenizer."""
    from jdelta.data.tokenizer import SpecialTokens

    return SpecialTokens.from_tokenizer(pair.tokenizer)


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


_CACHE: dict[Any, Any] = {}  # compiled pieces reused across runs and seeds (one compile per shape)


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _optimizer(rs: RunSettings):
    from jdelta.distill.train_state import OptimizerConfig, make_optimizer

    return _cached(("optimizer", rs.lr, rs.warmup_steps, rs.steps), lambda: make_optimizer(OptimizerConfig(
        learning_rate=rs.lr, b1=0.9, b2=0.98, weight_decay=0.0, schedule="constant", warmup_steps=rs.warmup_steps,
        total_steps=max(rs.steps, 1), clip_norm=1.0)))


def _step_fn(key: Any, make_loss: Callable[[], Any], state):
    from jdelta.distill.step import jit_train_step, make_train_step

    return _cached(("step", key), lambda: jit_train_step(make_train_step(make_loss()), state))


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
                    f"{' '.join(f'{k} {v:.3g}' for k, v in acc.items())}"
                    f" ({time.perf_counter() - t0:.0f} s)")
    return state, curves


def opd_run(pair: Pair, records: Sequence[PromptRecord], rs: RunSettings, *, seed: int, mode: str = "reverse_kl",
            student=None, teacher=None, evaluate=None, log=None, name: str = "opd",
            privileged: str = "none", cue_recovery: bool = False) -> tuple[Any, Curves]:
    """On-policy distillation of (a copy of) ``student`` towards ``teacher`` on ``records``
    (``mode``: reverse_kl = standard OPD, va_opd, vicur with ``privileged`` / ``cue_recovery``).
    A ``vicur`` run without a teacher is self-distillation from the student's initial weights."""
    from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
    from jdelta.distill.train_state import TrainState

    sp = special(pair)
    base = student if student is not None else pair.student
    student = copy_model(base)
    if mode == "vicur":
        from jdelta.distill.vicur import self_teacher, with_cue_recovery
        from jdelta.models.cue_recovery import CueRecoveryConfig

        if teacher is None:  # self-distillation: the initial student, without the module
            teacher = _cached(("self_teacher", id(base)), lambda: self_teacher(copy_model(base)))
        if cue_recovery:
            with_cue_recovery(student, CueRecoveryConfig(), sink_token_id=sp.im_start)
    teacher = teacher if teacher is not None else pair.teacher
    dcfg = DistillConfig(mode=mode, rollouts_per_prompt=rs.rollouts, temperature=rs.temperature, top_p=1.0,
                         max_new_tokens=16, chunk_size=16, completion_bucket=16, prompt_bucket=64, seed=0,
                         privileged=privileged, cue_recovery=cue_recovery)
    dcfg = dcfg.resolved(tuple(sp.stop_ids), int(sp.pad), len(pair.tokenizer))
    batches = prompt_batches(pair, records, rs.batch, seed=seed, with_pixelated=mode == "va_opd",
                             privileged=dcfg.teacher_prompt)
    state = TrainState.create(student, _optimizer(rs), seed=seed)
    key = (id(base), id(teacher), dcfg, rs.batch)
    producer = _cached(("producer", key), lambda: OnPolicyDistiller(state.model(), teacher, dcfg, iter(())))
    producer.prompts = batches
    producer.cfg = dataclasses.replace(dcfg, seed=seed)
    step_fn = _step_fn(("opd", key, rs.lr, rs.warmup_steps, rs.steps), lambda: make_distill_loss(dcfg), state)
    state, curves = _loop(state, step_fn, producer.produce, rs, evaluate, log, name)
    producer.prompts = iter(())
    return state.model(), curves


def teacher_samples(pair: Pair, records: Sequence[PromptRecord], *, n: int, seed: int, teacher=None,
                    temperature: float = 1.0) -> list[tuple[int, tuple[int, ...]]]:
    """``n`` sampled answers of the teacher per record (library :class:`jdelta.sampling.Sampler`):
    ``[(record index, response token ids incl. the stop token)]``."""
    from jdelta.data.pipeline import make_prompt_batches
    from jdelta.sampling import Sampler, SamplingParams

    sp = special(pair)
    teacher = teacher if teacher is not None else pair.teacher
    batch = 32
    cfg = pipeline_config(pair, batch, epochs=1)
    # whole batches only (the sampler refuses empty padding rows): pad with copies of record 0, dropped below
    padded = list(records) + [records[0]] * (-len(records) % batch)
    it = make_prompt_batches(padded, tokenizer=pair.tokenizer, seed=seed, shuffle=False, config=cfg)
    sampler = _cached(("sampler", id(teacher)), lambda: Sampler(teacher, pad_id=int(sp.pad)))
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=16,
                            stop_token_ids=tuple(sp.stop_ids), n=n)
    out: list[tuple[int, tuple[int, ...]]] = []
    for b_i, b in enumerate(it):
        res = sampler.generate({k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")},
                               params, rng=jax.random.fold_in(jax.random.key(seed), b_i))
        idx = np.asarray(b["record_index"])
        for row in range(res.tokens.shape[0]):
            ri = int(idx[int(res.prompt_index[row])])
            if ri < 0 or ri >= len(records):
                continue
            out.append((ri, tuple(int(t) for t in res.tokens[row, : int(res.lengths[row])])))
    return out


def sft_run(pair: Pair, records: Sequence[PromptRecord], samples: Sequence[tuple[int, tuple[int, ...]]],
            rs: RunSettings, *, seed: int, student=None, evaluate=None, log=None, name: str = "sft") -> tuple[Any, Curves]:
    """Off-policy SFT (library :func:`jdelta.distill.sft.make_sft_loss`) of a copy of ``student`` on
    ``samples`` (``(record index, response ids)``, e.g. :func:`teacher_samples`) of ``records``."""
    from jdelta.data.pipeline import SkipReport, make_prompt_batches
    from jdelta.distill.sft import SampleRow, SampleSFTIterator, SFTConfig, SFTProducer, make_sft_loss
    from jdelta.distill.train_state import TrainState

    sp = special(pair)
    rows = [SampleRow(i, records[ri].id, ri, 0, ids) for i, (ri, ids) in enumerate(samples)]
    joined = [records[r.record_index] for r in rows]  # one prompt record per sample row
    parent = make_prompt_batches(joined, tokenizer=pair.tokenizer, seed=seed, config=pipeline_config(pair, rs.batch))
    batches = SampleSFTIterator(parent, rows, SkipReport(), int(sp.pad))
    scfg = SFTConfig(chunk_size=16, completion_bucket=16, prompt_bucket=64, pad_id=int(sp.pad))
    student = copy_model(student if student is not None else pair.student)
    state = TrainState.create(student, _optimizer(rs), seed=seed)
    producer = SFTProducer(state.model(), batches, scfg)
    step_fn = _step_fn(("sft", scfg, rs.lr, rs.warmup_steps, rs.steps), lambda: make_sft_loss(scfg), state)
    state, curves = _loop(state, step_fn, producer.produce, rs, evaluate, log, name)
    return state.model(), curves


# ----------------------------------------------------------------------------- summaries


def pick(rng: np.random.Generator, items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items drawn without replacement (all of them, shuffled, when fewer)."""
    order = rng.permutation(len(items))[: min(n, len(items))]
    return [items[int(i)] for i in order]


__all__ = ["Curves", "RunSettings", "copy_model", "opd_run", "pick", "pipeline_config", "prompt_batches",
           "sft_run", "special", "teacher_samples"]
