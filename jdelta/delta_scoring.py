"""Δ per prompt for a teacher/student pair: sample n answers from each, class them, measure divergence.

Library entry point: :func:`score_prompts` (models and records in memory, one dict per record).
The ``jdelta score`` stage (:mod:`jdelta.stages.score`) runs a :class:`Scorer` over shards of a
run directory.

Per prompt: the prompt goes through the data pipeline (image processing, chat template; the one
batch path of :mod:`jdelta.completions`), the teacher and the student each sample ``n``
completions, the completions are decoded, their final answers extracted and classed
(:func:`jdelta.answers.class_answers`), and Δ is computed under every metric of
:mod:`jdelta.divergence` together with the zero-delta flags: ``exact`` (identical empirical
distributions), ``permutation`` (H0 "one answer distribution" not rejected at ``level``) and
``posterior`` (``P(Δ_true > epsilon) <= max_posterior``); the settings are one
:class:`DeltaTestConfig`. With reference answers (every accepted one, a list), each model's
sampled accuracy and majority-vote correctness are recorded, judged with the benchmark's own
metric (:func:`jdelta.benchmark_metrics.answer_metric_for`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from jdelta import answers as ans
from jdelta import completions
from jdelta import divergence as dv
from jdelta.benchmark_metrics import answer_metric_for, classing_type_for, references_of
from jdelta.config import PromptConfig, SamplingConfig, check


@dataclasses.dataclass(frozen=True)
class DeltaTestConfig:
    """How Δ is tested and reported.

    metric: the Δ used by the permutation / posterior tests and the report (every metric is
    recorded per prompt). level: permutation test level (zero-Δ if p > level). epsilon /
    max_posterior: posterior test, zero-Δ if ``P(Δ_true > epsilon) <= max_posterior``.
    num_permutations / num_posterior_draws: Monte-Carlo sizes. keep_completions: raw completions
    kept per model per prompt.
    """

    metric: Literal[dv.METRICS] = "tv"
    level: float = 0.05
    epsilon: float = 0.1
    max_posterior: float = 0.5
    num_permutations: int = 999
    num_posterior_draws: int = 1000
    keep_completions: int = 3

    def __post_init__(self):
        check(self.metric in dv.METRICS, "metric", f"must be one of {dv.METRICS}, got {self.metric!r}")
        check(0 < self.level < 1, "level", f"must be in (0, 1), got {self.level}")
        check(self.epsilon >= 0, "epsilon", f"must be >= 0, got {self.epsilon}")
        check(0 <= self.max_posterior <= 1, "max_posterior", f"must be in [0, 1], got {self.max_posterior}")
        check(self.num_permutations >= 1, "num_permutations", f"must be >= 1, got {self.num_permutations}")
        check(self.num_posterior_draws >= 1, "num_posterior_draws", f"must be >= 1, got {self.num_posterior_draws}")
        check(self.keep_completions >= 0, "keep_completions", f"must be >= 0, got {self.keep_completions}")


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def delta_records(
    records: Sequence[Any],
    indices: Sequence[int],
    teacher_texts: Sequence[Sequence[str]],
    student_texts: Sequence[Sequence[str]],
    *,
    key,
    tests: DeltaTestConfig | None = None,
    finish: tuple[Sequence[Sequence[str]], Sequence[Sequence[str]]] | None = None,
) -> list[dict]:
    """Classes, Δ under every metric, zero-delta flags and correctness for a group of prompts.

    Pure apart from the random ``key`` (permutation test and posterior draws). Classes are padded
    to ``n_t + n_s`` columns so every call with the same prompt count compiles once.
    """
    import jax

    tests = tests or DeltaTestConfig()
    p = len(records)
    if not p:
        return []
    types = [classing_type_for(r) for r in records]
    metrics = [answer_metric_for(r) for r in records]
    refs = [references_of(r) for r in records]
    width = max(len(t) + len(s) for t, s in zip(teacher_texts, student_texts, strict=True))
    classed = [ans.class_answers(t, s, ty) for t, s, ty in zip(teacher_texts, student_texts, types, strict=True)]
    correct = [
        np.zeros(len(c.labels), bool) if ref is None else ans.class_correctness(c, ref, ty, me)
        for c, ref, ty, me in zip(classed, refs, types, metrics, strict=True)
    ]
    packed = ans.pack_classed(classed, num_classes=max(width, 1), correct=correct)
    # Pad the prompt axis to a power of two (>= 8) with empty rows (their Δ is NaN and unused):
    # a bounded number of compiled shapes however shards and skips split the prompts.
    rows = max(8, 1 << (p - 1).bit_length())
    t, s, m, cor = (np.concatenate([x, np.zeros((rows - p, x.shape[1]), x.dtype)]) for x in packed)
    deltas = {k: np.asarray(v) for k, v in dv.all_divergences(t, s, m).items()}
    zero_exact = np.asarray(dv.is_zero_delta(t, s, m))
    k_perm, k_post = jax.random.split(key)
    pval = np.asarray(dv.delta_permutation_pvalue(k_perm, t, s, m, metric=tests.metric,
                                                  num_permutations=tests.num_permutations))
    post = np.asarray(dv.posterior_delta_exceeds(k_post, t, s, m, epsilon=tests.epsilon, metric=tests.metric,
                                                 num_draws=tests.num_posterior_draws))
    t_acc = np.asarray(dv.reference_agreement(t, cor, m))
    s_acc = np.asarray(dv.reference_agreement(s, cor, m))
    t_maj = np.asarray(dv.majority_correct(t, cor, m))
    s_maj = np.asarray(dv.majority_correct(s, cor, m))
    keep = tests.keep_completions
    out = []
    for i, rec in enumerate(records):
        c = classed[i]
        has_ref = refs[i] is not None
        row: dict[str, Any] = {
            "id": rec.id,
            "index": int(indices[i]),
            "status": "scored",
            "category": rec.category,
            "family": rec.family,
            "dataset": (rec.provenance or {}).get("dataset", ""),
            "answer_type": rec.answer_type,
            "classing_type": types[i],
            "reference": refs[i],
            "answer_metric": metrics[i] if has_ref else None,
            "n_teacher": int(c.teacher_counts.sum()),
            "n_student": int(c.student_counts.sum()),
            "classes": [
                {
                    "label": c.labels[j],
                    "teacher": int(c.teacher_counts[j]),
                    "student": int(c.student_counts[j]),
                    **({"correct": bool(correct[i][j])} if has_ref else {}),
                }
                for j in range(c.num_classes)
            ],
            "delta": {k: _f(v[i]) for k, v in deltas.items()},
            "delta_metric": tests.metric,
            "p_value": _f(pval[i]),
            "posterior_delta_exceeds": _f(post[i]),
            "zero_delta": {
                "exact": bool(zero_exact[i]),
                "permutation": bool(pval[i] > tests.level),
                "posterior": bool(post[i] <= tests.max_posterior),
            },
            "teacher_accuracy": _f(t_acc[i]) if has_ref else None,
            "student_accuracy": _f(s_acc[i]) if has_ref else None,
            "accuracy_gap": _f(t_acc[i] - s_acc[i]) if has_ref else None,
            "teacher_majority_correct": bool(t_maj[i]) if has_ref else None,
            "student_majority_correct": bool(s_maj[i]) if has_ref else None,
            "invalid": {
                "teacher": int(sum(1 for j in c.teacher_ids if c.labels[j] == ans.INVALID_LABEL)),
                "student": int(sum(1 for j in c.student_ids if c.labels[j] == ans.INVALID_LABEL)),
            },
            "completions": {
                "teacher": list(teacher_texts[i][:keep]),
                "student": list(student_texts[i][:keep]),
            },
        }
        if finish is not None:
            row["truncated"] = {
                "teacher": int(sum(f == "length" for f in finish[0][i])),
                "student": int(sum(f == "length" for f in finish[1][i])),
            }
        out.append(row)
    return out


def skip_entry(index: int, rid: str | None, reason: str, message: str) -> dict:
    """The row of a prompt that could not be scored."""
    return {"id": rid, "index": int(index), "status": "skipped", "reason": reason, "message": message}


# ----------------------------------------------------------------------------- the scorer


class Scorer:
    """Teacher + student + tokenizer + prompt pipeline, kept across shards (compiled programs reused).

    ``teacher`` / ``student``: loaded models of one family with the same prompt layout; ``session``:
    the :class:`~jdelta.models.loading.ModelSession` whose samplers are used (a fresh one when None).
    ``engine``: ``"static"`` (one sampler call per batch) or ``"continuous"`` (all the batches of a
    :meth:`score` call through :class:`~jdelta.completions.ContinuousSampler`, ``engine_slots`` rows,
    default ``batch_size * n``: the same completions).
    """

    def __init__(self, teacher, student, tokenizer, *, sampling: SamplingConfig | None = None,
                 prompt: PromptConfig | None = None, tests: DeltaTestConfig | None = None, session=None,
                 engine: str = "static", engine_slots: int | None = None):
        from jdelta.models.family import prompt_special_tokens
        from jdelta.models.loading import ModelSession, check_pair, pipeline_config_for

        check_pair(teacher.config, student.config)
        self.teacher, self.student, self.tokenizer = teacher, student, tokenizer
        sampling, prompt = sampling or SamplingConfig(), prompt or PromptConfig()
        self.sampling, self.prompt, self.tests = sampling, prompt, tests or DeltaTestConfig()
        self.session = session if session is not None else ModelSession()
        self.pipeline_config = pipeline_config_for(teacher.config, prompt, batch_size=sampling.batch_size)
        self.special = special = prompt_special_tokens(tokenizer)
        self.params = completions.sampling_params(sampling, special.stop_ids)
        self.teacher_sampler = self.session.sampler(teacher, pipeline=self.pipeline_config, pad_id=special.pad)
        self.student_sampler = self.session.sampler(student, pipeline=self.pipeline_config, pad_id=special.pad)
        self.generate_calls = 0
        self.engines = None
        if engine == "continuous":
            slots = engine_slots or sampling.batch_size * sampling.n
            self.engines = tuple(completions.ContinuousSampler(m, self.pipeline_config, pad_id=special.pad,
                                                               slots=slots, mesh=self.session.mesh)
                                 for m in (teacher, student))
        elif engine != "static":
            raise ValueError(f"engine must be 'static' or 'continuous', got {engine!r}")

    def _continuous(self, batches, key):
        """``(batch, teacher texts, student texts, finish reasons)`` per batch, through the engines."""
        import jax

        batches = list(batches)
        out = []
        for which, sampler in enumerate(self.engines):
            got = []
            for batch, res in sampler.results(batches, self.params,
                                              lambda b, w=which: jax.random.fold_in(jax.random.fold_in(key, b), w)):
                texts = completions.decode_completions(self.tokenizer, res.tokens, res.lengths)
                n = self.params.n
                got.append(([texts[i * n:(i + 1) * n] for i in range(len(batch.indices))],
                            [res.finish_reason[i * n:(i + 1) * n] for i in range(len(batch.indices))]))
            self.generate_calls += 1
            out.append(got)
        return [(batch, t[0], s[0], t[1], s[1]) for batch, t, s in zip(batches, *out, strict=True)]

    def _static(self, batches, key):
        """``(batch, teacher texts, student texts, finish reasons)`` per batch, one sampler call each."""
        import jax

        for b, batch in enumerate(batches):
            kb = jax.random.fold_in(key, b)
            t_txt, t_fin = completions.sample_texts(self.teacher_sampler, self.tokenizer, batch.inputs, self.params,
                                                    jax.random.fold_in(kb, 0))
            s_txt, s_fin = completions.sample_texts(self.student_sampler, self.tokenizer, batch.inputs, self.params,
                                                    jax.random.fold_in(kb, 1))
            self.generate_calls += 2
            yield batch, t_txt, s_txt, t_fin, s_fin

    def score(self, source, key, *, select: slice | None = None, progress=None) -> list[dict]:
        """One entry per record of ``source`` (``select``: a slice of it), in source order."""
        import jax

        batches = completions.prompt_batches(source, self.tokenizer, self.pipeline_config, select=select)
        recs, idxs, t_all, s_all, tf_all, sf_all = [], [], [], [], [], []
        reported = 0
        for batch, t_txt, s_txt, t_fin, s_fin in (self._continuous(batches, key) if self.engines is not None
                                                  else self._static(batches, key)):
            recs += batch.records
            idxs += batch.indices
            t_all += t_txt
            s_all += s_txt
            tf_all += t_fin
            sf_all += s_fin
            if progress is not None:
                skipped = len(batches.skipped)
                progress.update(len(batch.indices) + skipped - reported)
                reported = skipped
        skips = batches.skipped
        if progress is not None:
            progress.update(len(skips) - reported)
        rows = delta_records(recs, idxs, t_all, s_all, key=jax.random.fold_in(key, 1 << 20), tests=self.tests,
                             finish=(tf_all, sf_all))
        rows += [skip_entry(s["record_index"], s["id"], s["reason"], s["message"]) for s in skips]
        return sorted(rows, key=lambda r: r["index"])


# ----------------------------------------------------------------------------- library entry point


def score_prompts(
    teacher,
    student,
    records: Sequence[Any],
    *,
    tokenizer,
    sampling: SamplingConfig | None = None,
    prompt: PromptConfig | None = None,
    tests: DeltaTestConfig | None = None,
    seed: int | None = None,
    session=None,
    progress: bool = False,
    engine: str = "static",
    engine_slots: int | None = None,
) -> list[dict]:
    """Score in-memory prompt records with two models (one dict per record, in order).

    Args:
      teacher, student: NNX models of one family (same prompt layout), or HF checkpoint directories /
        :class:`~jdelta.config.ModelSpec` (loaded through ``session``).
      records: :class:`~jdelta.data.records.PromptRecord` list (or a records source).
      tokenizer: a loaded tokenizer or a directory holding one.
      sampling, prompt, tests: the settings (:class:`~jdelta.config.SamplingConfig`,
        :class:`~jdelta.config.PromptConfig`, :class:`DeltaTestConfig`; None: their defaults).
      seed: overrides ``sampling.seed``.
      session: a :class:`~jdelta.models.loading.ModelSession` (its mesh places the models; its
        samplers are reused across calls); None: a fresh one on one device.
      engine, engine_slots: static batches or continuous batching (:class:`Scorer`; the same entries).

    Returns:
      entries with ``status == "scored"`` (classes, Δ per metric, p-value, posterior, zero-delta
      flags, correctness, a few completions) or ``"skipped"`` (``reason``, ``message``).
    """
    import jax

    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.loading import ModelSession

    session = session if session is not None else ModelSession()
    sampling = sampling or SamplingConfig()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if not hasattr(teacher, "config"):
        teacher = session.model(teacher, role="teacher")
    if not hasattr(student, "config"):
        student = session.model(student, role="student")
    scorer = Scorer(teacher, student, tokenizer, sampling=sampling, prompt=prompt, tests=tests, session=session,
                    engine=engine, engine_slots=engine_slots)
    bar = completions.progress_bar(len(records), "score", progress)
    try:
        return scorer.score(records, jax.random.key(sampling.seed if seed is None else int(seed)), progress=bar)
    finally:
        if bar is not None:
            bar.close()


__all__ = ["DeltaTestConfig", "Scorer", "delta_records", "score_prompts", "skip_entry"]
