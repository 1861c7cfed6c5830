"""Δ per prompt for a teacher/student pair: sample n answers from each, class them, measure divergence.

Library entry point: :func:`score_prompts` (models and records in memory, one dict per record).
The ``jdelta score`` stage (:mod:`jdelta.stages.score`) runs it over shards of a run directory.

Per prompt: the prompt goes through the data pipeline (image processing, chat template), the
teacher and the student each sample ``n`` completions (:mod:`jdelta.sampling`), the completions
are decoded, their final answers extracted and classed (:func:`jdelta.answers.class_answers`),
and Δ is computed under every metric of :mod:`jdelta.divergence` together with the zero-delta
flags: ``exact`` (identical empirical distributions), ``permutation`` (H0 "one answer
distribution" not rejected at ``level``) and ``posterior`` (``P(Δ_true > epsilon) <=
max_posterior``). With a reference answer, each model's sampled accuracy and majority-vote
correctness are recorded, judged with the benchmark's own metric
(:func:`jdelta.benchmark_metrics.answer_metric_for`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdelta import answers as ans
from jdelta import divergence as dv
from jdelta.benchmark_metrics import answer_metric_for, classing_type_for, references_of
from jdelta.models.loading import check_pair, image_config_for, load_model

DEFAULT_KEEP_COMPLETIONS = 3
_SAMPLER_CACHE: dict[tuple, Any] = {}

class PromptProcessor:
    """Turns :class:`~jdelta.data.records.PromptRecord`s (or a source's raw items) into padded
    batches with the data pipeline's per-record processing; failures become skip entries."""

    def __init__(self, source, tokenizer, pipeline_config):
        from jdelta.data.pipeline import ProcessRecord
        from jdelta.data.tokenizer import SpecialTokens

        self.source = source
        self.config = pipeline_config
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self._process = ProcessRecord(source, tokenizer, pipeline_config)

    def process(self, index: int) -> dict:
        """Example dict, or ``{"_skip": reason, "message": ...}``."""
        try:
            raw = self.source[index]
        except Exception as e:  # an unreadable item is a skipped record, not a crash
            return {"_skip": "unreadable", "message": f"source index {index}: {type(e).__name__}: {e}"}
        return self._process((index, raw))

    def batches(self, examples: Sequence[dict]):
        """Yield ``(examples_chunk, batch)`` with padding rows removed from the token arrays."""
        from jdelta.data.pipeline import collate

        b = self.config.batch_size
        for start in range(0, len(examples), b):
            chunk = list(examples[start : start + b])
            batch = collate(chunk, self.config, self.special.pad)
            k = len(chunk)
            out = {"input_ids": batch["input_ids"][:k], "attention_mask": batch["attention_mask"][:k]}
            n_img = sum(len(e["image_grid_thw"]) for e in chunk)
            if n_img:
                n_patch = sum(len(e["pixel_values"]) for e in chunk)
                out["pixel_values"] = batch["pixel_values"][:n_patch]
                out["image_grid_thw"] = batch["image_grid_thw"][:n_img]
            yield chunk, out


def record_id_of(source, index: int) -> str | None:
    """Best-effort id of a source item (for skip entries); None if it cannot be parsed."""
    try:
        return source.to_record(source[index], index).id
    except Exception:
        pass
    try:  # the record did not validate: its id may still be readable
        raw = source[index]
        raw = raw[1] if isinstance(raw, tuple) else raw
        d = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        rid = d.get("id") if isinstance(d, dict) else getattr(d, "id", None)
        return None if rid is None else str(rid)
    except Exception:
        return None


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Text of each row's first ``length`` tokens (special tokens such as ``<|im_end|>`` dropped)."""
    return [
        tokenizer.decode([int(t) for t in row[: int(n)]], skip_special_tokens=True)
        for row, n in zip(tokens, lengths, strict=True)
    ]


def make_sampler(model, *, mesh=None, pad_id: int, batch_size: int):
    """A :class:`~jdelta.sampling.Sampler` with a fixed prompt-batch bucket, reused per model."""
    from jdelta.sampling import Sampler

    key = (id(model), id(mesh), int(pad_id), int(batch_size))
    hit = _SAMPLER_CACHE.get(key)
    if hit is None or hit.model is not model:
        hit = _SAMPLER_CACHE[key] = Sampler(model, mesh=mesh, pad_id=pad_id, batch_buckets=(batch_size,))
    return hit


def sample_texts(sampler, tokenizer, batch: Mapping[str, np.ndarray], params, rng) -> tuple[list[list[str]], list]:
    """``n`` decoded completions per prompt row (``[B][n]``) and the finish reasons."""
    res = sampler.generate(batch, params, rng=rng)
    texts = decode_completions(tokenizer, res.tokens, res.lengths)
    b = batch["input_ids"].shape[0]
    n = params.n
    by_prompt = [texts[i * n : (i + 1) * n] for i in range(b)]
    finish = [res.finish_reason[i * n : (i + 1) * n] for i in range(b)]
    return by_prompt, finish


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
    metric: str = "tv",
    level: float = 0.05,
    epsilon: float = 0.1,
    max_posterior: float = 0.5,
    num_permutations: int = 999,
    num_posterior_draws: int = 1000,
    keep_completions: int = DEFAULT_KEEP_COMPLETIONS,
    finish: tuple[Sequence[Sequence[str]], Sequence[Sequence[str]]] | None = None,
) -> list[dict]:
    """Classes, Δ under every metric, zero-delta flags and correctness for a group of prompts.

    Pure apart from the random ``key`` (permutation test and posterior draws). Classes are padded
    to ``n_t + n_s`` columns so every call with the same prompt count compiles once.
    """
    import jax

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
    pval = np.asarray(dv.delta_permutation_pvalue(k_perm, t, s, m, metric=metric, num_permutations=num_permutations))
    post = np.asarray(
        dv.posterior_delta_exceeds(k_post, t, s, m, epsilon=epsilon, metric=metric, num_draws=num_posterior_draws)
    )
    t_acc = np.asarray(dv.reference_agreement(t, cor, m))
    s_acc = np.asarray(dv.reference_agreement(s, cor, m))
    t_maj = np.asarray(dv.majority_correct(t, cor, m))
    s_maj = np.asarray(dv.majority_correct(s, cor, m))
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
            "delta_metric": metric,
            "p_value": _f(pval[i]),
            "posterior_delta_exceeds": _f(post[i]),
            "zero_delta": {
                "exact": bool(zero_exact[i]),
                "permutation": bool(pval[i] > level),
                "posterior": bool(post[i] <= max_posterior),
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
                "teacher": list(teacher_texts[i][:keep_completions]),
                "student": list(student_texts[i][:keep_completions]),
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
    return {"id": rid, "index": int(index), "status": "skipped", "reason": reason, "message": message}


# ----------------------------------------------------------------------------- library entry point


class ScoreSettings(dict):
    """Plain dict of the scoring settings (JSON-able, stored in the manifest)."""

    DEFAULTS: dict[str, Any] = {
        "n": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_new_tokens": 64,
        "batch_size": 8,
        "metric": "tv",
        "level": 0.05,
        "epsilon": 0.1,
        "max_posterior": 0.5,
        "num_permutations": 999,
        "num_posterior_draws": 1000,
        "keep_completions": DEFAULT_KEEP_COMPLETIONS,
        "seed": 0,
        "max_pixels": None,
        "enable_thinking": None,
        "system": None,
    }

    @classmethod
    def make(cls, **kw) -> ScoreSettings:
        unknown = set(kw) - set(cls.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown score settings {sorted(unknown)}; known: {sorted(cls.DEFAULTS)}")
        out = cls({**cls.DEFAULTS, **{k: v for k, v in kw.items() if v is not None}})
        if out["metric"] not in dv.METRICS:
            raise ValueError(f"--metric {out['metric']!r} is not one of {dv.METRICS}")
        if int(out["n"]) < 1:
            raise ValueError(f"n must be >= 1, got {out['n']}")
        return out


class Scorer:
    """Teacher + student + tokenizer + processing, kept across shards (compiled programs reused)."""

    def __init__(self, teacher, student, tokenizer, settings: Mapping[str, Any], *, source, mesh=None):
        from jdelta.data.pipeline import PipelineConfig
        from jdelta.sampling import SamplingParams

        self.teacher, self.student, self.tokenizer = teacher, student, tokenizer
        self.settings = ScoreSettings.make(**settings)
        check_pair(teacher.config, student.config)
        st = self.settings
        self.pipeline_config = PipelineConfig(
            batch_size=int(st["batch_size"]),
            image=image_config_for(teacher.config, st["max_pixels"]),
            system=st["system"],
            enable_thinking=st["enable_thinking"],
            on_error="skip",
        )
        self.source = source
        self.processor = PromptProcessor(source, tokenizer, self.pipeline_config)
        self.special = special = self.processor.special
        self.params = SamplingParams(
            temperature=float(st["temperature"]),
            top_p=float(st["top_p"]),
            top_k=int(st["top_k"]),
            max_new_tokens=int(st["max_new_tokens"]),
            stop_token_ids=special.stop_ids,
            n=int(st["n"]),
        )
        bs = int(st["batch_size"])
        self.teacher_sampler = make_sampler(teacher, mesh=mesh, pad_id=special.pad, batch_size=bs)
        self.student_sampler = make_sampler(student, mesh=mesh, pad_id=special.pad, batch_size=bs)
        self.generate_calls = 0

    def score_indices(self, indices: Sequence[int], key, progress=None) -> list[dict]:
        """Score the given source indices; returns one entry per index, in order."""
        import jax

        st = self.settings
        entries: dict[int, dict] = {}
        good: list[tuple[int, dict]] = []
        for i in indices:
            ex = self.processor.process(i)
            if "_skip" in ex:
                entries[i] = skip_entry(i, record_id_of(self.source, i), ex["_skip"], ex["message"])
                if progress is not None:
                    progress.update(1)
            else:
                good.append((i, ex))
        examples = [ex for _, ex in good]
        recs, idxs, t_all, s_all, tf_all, sf_all = [], [], [], [], [], []
        for b, (chunk, batch) in enumerate(self.processor.batches(examples)):
            kb = jax.random.fold_in(key, b)
            t_txt, t_fin = sample_texts(self.teacher_sampler, self.tokenizer, batch, self.params, jax.random.fold_in(kb, 0))
            s_txt, s_fin = sample_texts(self.student_sampler, self.tokenizer, batch, self.params, jax.random.fold_in(kb, 1))
            self.generate_calls += 2
            for e in chunk:
                idx = int(e["record_index"])
                recs.append(self.source.to_record(self.source[idx], idx))
                idxs.append(idx)
            t_all += t_txt
            s_all += s_txt
            tf_all += t_fin
            sf_all += s_fin
            if progress is not None:
                progress.update(len(chunk))
        rows = delta_records(
            recs, idxs, t_all, s_all, key=jax.random.fold_in(key, 1 << 20),
            metric=st["metric"], level=st["level"], epsilon=st["epsilon"], max_posterior=st["max_posterior"],
            num_permutations=int(st["num_permutations"]), num_posterior_draws=int(st["num_posterior_draws"]),
            keep_completions=int(st["keep_completions"]), finish=(tf_all, sf_all),
        )
        for r in rows:
            entries[r["index"]] = r
        return [entries[i] for i in indices]


def score_prompts(
    teacher,
    student,
    records: Sequence[Any],
    *,
    tokenizer,
    mesh=None,
    seed: int = 0,
    progress: bool = False,
    **settings: Any,
) -> list[dict]:
    """Score in-memory prompt records with two loaded models (one dict per record, in order).

    Args:
      teacher, student: Qwen3-VL NNX models (same prompt layout), or HF checkpoint directories.
      records: :class:`~jdelta.data.records.PromptRecord` list.
      tokenizer: a loaded tokenizer or a directory holding one.
      settings: see :class:`ScoreSettings` (``n``, ``temperature``, ``max_new_tokens``, ``metric``,
        ``epsilon``, ``level``, ``batch_size``, ``max_pixels`` ...).

    Returns:
      entries with ``status == "scored"`` (classes, Δ per metric, p-value, posterior, zero-delta
      flags, correctness, a few completions) or ``"skipped"`` (``reason``, ``message``).
    """
    import jax

    from jdelta.data.records import ListSource
    from jdelta.data.tokenizer import load_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(teacher, (str, os.PathLike)):
        teacher, _ = load_model(teacher, mesh)
    if isinstance(student, (str, os.PathLike)):
        student, _ = load_model(student, mesh)
    source = ListSource(records)
    scorer = Scorer(teacher, student, tokenizer, {**settings, "seed": seed}, mesh=mesh, source=source)
    bar = _bar(len(records), "score", progress)
    try:
        return scorer.score_indices(range(len(records)), jax.random.key(seed), bar)
    finally:
        if bar is not None:
            bar.close()


def _bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="prompt", dynamic_ncols=True)
