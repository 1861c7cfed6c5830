"""``jdelta score``: sample n answers from a teacher and a student per prompt and measure Δ.

Library entry point: :func:`score_prompts` (models and records in memory, returns one dict per
record). Stage entry point: :func:`run_score` / ``jdelta score`` (paths in, a run directory out).

Per prompt: the prompt goes through the data pipeline (image processing, chat template), the
teacher and the student each sample ``n`` completions (:mod:`jdelta.sampling`), the completions
are decoded, their final answers extracted and classed (:func:`jdelta.answers.class_answers`),
and Δ is computed under every metric of :mod:`jdelta.divergence` together with the zero-delta
flags: ``exact`` (identical empirical distributions), ``permutation`` (H0 "one answer
distribution" not rejected at ``level``) and ``posterior`` (``P(Δ_true > epsilon) <=
max_posterior``). With a reference answer, each model's sampled accuracy and majority-vote
correctness are recorded, judged with the benchmark's own metric (:func:`answer_metric_for`).

Run directory written by the stage::

    RUN_DIR/manifest.json          config, model identities, counts (input = scored + skipped)
    RUN_DIR/shards/shard-00000.jsonl  one JSON object per input prompt of the shard (status
                                      "scored" or "skipped" with a reason); written atomically
    RUN_DIR/scores.jsonl           all shards concatenated in input order (when complete)
    RUN_DIR/report.md, report.json, delta_hist.png

Resumable: a shard whose file exists (and holds one line per prompt of the shard) is never
scored again; kill the stage at any point and rerun the same command to finish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jdelta import answers as ans
from jdelta import divergence as dv

RECORD_VERSION = 1
DEFAULT_KEEP_COMPLETIONS = 3

# Benchmark -> its own metric (by the record's provenance dataset or family).
DATASET_METRICS: dict[str, str] = {
    "chartqa": "relaxed_accuracy",
    "plotqa": "relaxed_accuracy",
    "docvqa": "anls",
    "infovqa": "anls",
    "infographicvqa": "anls",
    "ai2d": "mc_accuracy",
    "mmmu": "mc_accuracy",
    "charxiv": "exact_match",
}


# ----------------------------------------------------------------------------- per-record policy


def answer_metric_for(record) -> str:
    """The benchmark metric that judges a record's answers.

    ``record.meta["metric"]`` if set; else by the provenance dataset / family
    (:data:`DATASET_METRICS`); else by answer type: numbers -> ``relaxed_accuracy`` (ChartQA
    style), choices -> ``mc_accuracy``, anything else -> ``exact_match``.
    """
    meta = getattr(record, "meta", None) or {}
    if meta.get("metric"):
        m = str(meta["metric"])
        if m not in ans.METRICS:
            raise ValueError(f"record {record.id!r}: meta.metric {m!r} is not one of {ans.METRICS}")
        return m
    for key in ((record.provenance or {}).get("dataset"), record.family):
        if key and str(key).lower() in DATASET_METRICS:
            return DATASET_METRICS[str(key).lower()]
    if record.answer_type == "number":
        return "relaxed_accuracy"
    if record.answer_type == "choice":
        return "mc_accuracy"
    return "exact_match"


def classing_type_for(record) -> str:
    """Answer type used to class model answers: the record's, except free text -> ``"auto"`` (so
    "12" and "12.0" stay one class when the question's type is unknown or textual)."""
    return record.answer_type if record.answer_type in ("number", "yes_no", "choice") else "auto"


def references_of(record) -> list[str] | None:
    """All accepted reference answers (``meta["answers"]`` when present), or None."""
    if record.answer is None:
        return None
    extra = (record.meta or {}).get("answers")
    refs = [str(a) for a in extra] if isinstance(extra, list) and extra else []
    if record.answer not in refs:
        refs.insert(0, record.answer)
    return refs


# ----------------------------------------------------------------------------- models and tokenizer


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return h.hexdigest()


FULL_HASH_BYTES = 1 << 30
"""Checkpoints up to this size get a full sha256 of their weights in the model identity."""


def model_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path, sha256 of ``config.json`` and a weights fingerprint (full sha256 up to
    :data:`FULL_HASH_BYTES`; beyond, names + sizes + first MiB + mtimes)."""
    p = Path(path)
    ident: dict[str, Any] = {"path": str(p.resolve())}
    cfg = p / "config.json"
    ident["config_sha256"] = file_sha256(cfg) if cfg.is_file() else None
    files = sorted(p.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    full = total <= FULL_HASH_BYTES  # small checkpoints: hash everything; large: header + size + mtime
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.name.encode())
        h.update(str(st.st_size).encode())
        if full:
            h.update(file_sha256(f).encode())
        else:
            h.update(file_sha256(f, limit=1 << 20).encode())
            h.update(str(st.st_mtime_ns).encode())
    ident["weights_bytes"] = total
    ident["weights_fingerprint"] = ("sha256:" if full else "header+mtime:") + h.hexdigest()
    return ident


def parse_mesh(spec: str | None):
    """``"fsdp=4,tensor=2"`` -> a mesh (``None`` for no mesh)."""
    if not spec:
        return None
    from jdelta.sharding import make_mesh

    shape = {}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--mesh {spec!r}: expected axis=size pairs like fsdp=4,tensor=2")
        k, v = part.split("=", 1)
        shape[k.strip()] = int(v)
    return make_mesh(shape)


_MODEL_CACHE: dict[tuple, tuple] = {}
_SAMPLER_CACHE: dict[tuple, Any] = {}


def load_model(path: str | os.PathLike, mesh=None, dtype: str | None = None, *, cache: bool = True):
    """``(model, config)`` from an HF Qwen3-VL directory.

    Loaded models are kept per (path, weights fingerprint, mesh, dtype) in this process, so a
    score and a re-score against the same teacher load it (and compile its sampler) once.
    """
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json (expected a Hugging Face Qwen3-VL checkpoint directory)")
    if not cache:
        return load_hf_checkpoint(p, mesh=mesh, dtype=dtype)
    ident = model_identity(p)
    key = (ident["path"], ident["config_sha256"], ident["weights_fingerprint"], id(mesh), dtype)
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) >= 4:
            _MODEL_CACHE.clear()
            _SAMPLER_CACHE.clear()
        _MODEL_CACHE[key] = load_hf_checkpoint(p, mesh=mesh, dtype=dtype)
    return _MODEL_CACHE[key]


def tokenizer_fingerprint(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def image_config_for(model_config, max_pixels: int | None = None, min_pixels: int | None = None):
    """The pipeline's image settings matching a model's vision patch layout."""
    from jdelta.data.image_processor import ImageConfig

    vis = model_config.vision
    kw: dict[str, Any] = dict(
        patch_size=vis.patch_size, merge_size=vis.spatial_merge_size, temporal_patch_size=vis.temporal_patch_size
    )
    if max_pixels is not None:
        kw["max_pixels"] = int(max_pixels)
    if min_pixels is not None:
        kw["min_pixels"] = int(min_pixels)
    elif max_pixels is not None:
        kw["min_pixels"] = min(ImageConfig().min_pixels, int(max_pixels))
    return ImageConfig(**kw)


def check_pair(teacher_config, student_config) -> None:
    """The two models must read the same prompt tokens and image patches."""
    problems = []
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        a, b = getattr(teacher_config, name), getattr(student_config, name)
        if a != b:
            problems.append(f"{name}: teacher {a} vs student {b}")
    for name in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        a, b = getattr(teacher_config.vision, name), getattr(student_config.vision, name)
        if a != b:
            problems.append(f"vision.{name}: teacher {a} vs student {b}")
    if problems:
        raise ValueError("teacher and student disagree on the prompt layout: " + "; ".join(problems))


# ----------------------------------------------------------------------------- prompts -> batches


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


# ----------------------------------------------------------------------------- Δ per prompt


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


# ----------------------------------------------------------------------------- report


def summarize(entries: Sequence[Mapping[str, Any]], metric: str = "tv", confidence: float = 0.95) -> dict[str, Any]:
    """Counts, zero-delta fractions (exact / permutation / posterior) with Wilson intervals, Δ
    statistics and per-category / per-family tables from a run's entries."""
    scored = [e for e in entries if e.get("status") == "scored"]
    skipped = Counter(e.get("reason", "unknown") for e in entries if e.get("status") == "skipped")
    delta = np.array([np.nan if e["delta"][metric] is None else e["delta"][metric] for e in scored], float)
    valid = ~np.isnan(delta)
    out: dict[str, Any] = {
        "counts": {"input": len(entries), "scored": len(scored), "skipped": sum(skipped.values()),
                   "skipped_by_reason": dict(sorted(skipped.items()))},
        "delta_metric": metric,
        "zero_delta": {},
    }
    groups = {"category": [e.get("category") or "-" for e in scored], "family": [e.get("family") or "-" for e in scored]}
    for flag in ("exact", "permutation", "posterior"):
        flags = np.array([e["zero_delta"][flag] for e in scored], bool)
        out["zero_delta"][flag] = dv.zero_delta_summary(flags, groups, valid=valid, confidence=confidence)
    out["delta"] = {
        "mean": _f(np.nanmean(delta)) if valid.any() else None,
        "median": _f(np.nanmedian(delta)) if valid.any() else None,
        "mean_by_metric": {
            k: _f(np.nanmean([np.nan if e["delta"][k] is None else e["delta"][k] for e in scored])) if scored else None
            for k in dv.METRICS
        },
    }

    def acc(rows, key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None

    cats: dict[str, Any] = {}
    for name in sorted(set(groups["category"])):
        rows = [e for e, g in zip(scored, groups["category"], strict=True) if g == name]
        d = np.array([np.nan if r["delta"][metric] is None else r["delta"][metric] for r in rows], float)
        cats[name] = {
            "prompts": len(rows),
            "zero_delta_exact": out["zero_delta"]["exact"]["category"][name],
            "zero_delta_permutation": out["zero_delta"]["permutation"]["category"][name],
            "mean_delta": _f(np.nanmean(d)) if (~np.isnan(d)).any() else None,
            "teacher_accuracy": acc(rows, "teacher_accuracy"),
            "student_accuracy": acc(rows, "student_accuracy"),
        }
    out["per_category"] = cats
    out["accuracy"] = {"teacher": acc(scored, "teacher_accuracy"), "student": acc(scored, "student_accuracy"),
                       "with_reference": sum(1 for e in scored if e.get("reference") is not None)}
    return out


def _pct(row: Mapping[str, Any]) -> str:
    if not row["prompts"]:
        return "n/a"
    return f"{100 * row['fraction']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def report_markdown(summary: Mapping[str, Any], title: str = "jdelta score", notes: Sequence[str] = ()) -> str:
    c = summary["counts"]
    zd = summary["zero_delta"]
    lines = [f"# {title}", ""]
    lines += [f"> {n}" for n in notes]
    if notes:
        lines.append("")
    lines += [
        f"Prompts: {c['input']} input = {c['scored']} scored + {c['skipped']} skipped"
        + (f" ({', '.join(f'{k}: {v}' for k, v in c['skipped_by_reason'].items())})" if c["skipped"] else ""),
        "",
        f"Δ metric: `{summary['delta_metric']}`; mean Δ {_num(summary['delta']['mean'])}, "
        f"median {_num(summary['delta']['median'])}.",
        "",
        "| zero-delta test | zero-Δ prompts | fraction [95% CI] |",
        "|---|---|---|",
    ]
    for flag in ("exact", "permutation", "posterior"):
        o = zd[flag]["overall"]
        lines.append(f"| {flag} | {o['zero_delta']} / {o['prompts']} | {_pct(o)} |")
    lines += ["", "exact: identical empirical answer distributions. permutation: H0 (one answer distribution) not "
              "rejected at the test level; with n samples per side the smallest attainable p-value is about "
              "1/C(2n, n) (1/70 for n = 4), so small n rarely rejects. posterior: P(Δ_true > ε) <= the cut-off "
              "under Dirichlet posteriors."]
    acc = summary["accuracy"]
    lines += ["", f"Sampled accuracy vs reference ({acc['with_reference']} prompts with one): "
              f"teacher {_num(acc['teacher'])}, student {_num(acc['student'])}.", ""]
    lines += [
        "| category | prompts | zero-Δ exact [95% CI] | zero-Δ permutation [95% CI] | mean Δ | teacher acc | student acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["per_category"].items():
        lines.append(
            f"| {name} | {r['prompts']} | {_pct(r['zero_delta_exact'])} | {_pct(r['zero_delta_permutation'])} | "
            f"{_num(r['mean_delta'])} | {_num(r['teacher_accuracy'])} | {_num(r['student_accuracy'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot_delta_histogram(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike, metric: str = "tv") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [e["delta"][metric] for e in entries if e.get("status") == "scored" and e["delta"][metric] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hi = max(1.0, max(d, default=1.0)) if metric.startswith("kl") else 1.0
    ax.hist(d, bins=20, range=(0.0, hi), color="#3b6ea8", edgecolor="white")
    ax.set_xlabel(f"Δ ({metric})")
    ax.set_ylabel("prompts")
    ax.set_title(f"Answer divergence over {len(d)} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, entries: Sequence[Mapping[str, Any]], metric: str, notes: Sequence[str] = ()) -> dict:
    summary = summarize(entries, metric)
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (run_dir / "report.md").write_text(report_markdown(summary, notes=notes))
    plot_delta_histogram(entries, run_dir / "delta_hist.png", metric)
    return summary


# ----------------------------------------------------------------------------- the stage


class ShardLimitReached(RuntimeError):
    """Raised internally when ``max_shards`` new shards were scored (the run is resumable)."""


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


FINGERPRINT_KEYS = ("prompts", "teacher", "student", "tokenizer", "settings", "shard_size")


def run_score(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    prompts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 64,
    tokenizer: str | os.PathLike | None = None,
    mesh: str | None = None,
    max_shards: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    notes: Sequence[str] = (),
    after_shard: Callable[[int], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The ``jdelta score`` stage as a function; returns the manifest.

    ``max_shards``: stop (resumably) after scoring this many new shards. ``after_shard(k)`` is
    called after shard ``k`` is written (tests inject failures with it).
    """
    import jax

    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import load_tokenizer

    settings_d = ScoreSettings.make(**settings)
    run_dir = Path(out)
    shard_dir = run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    prompts_p = Path(prompts)
    source = open_records(prompts_p)
    total = len(source)
    if total == 0:
        raise ValueError(f"{prompts_p}: no prompt records to score")
    tok_dir = Path(tokenizer) if tokenizer is not None else Path(teacher)
    tok = load_tokenizer(tok_dir)
    st_tok = Path(student) / "tokenizer.json"
    if tokenizer is None and st_tok.is_file() and tokenizer_fingerprint(load_tokenizer(student)) != tokenizer_fingerprint(tok):
        raise ValueError(f"{student}: its tokenizer differs from the teacher's ({teacher}); both models must share "
                         "one tokenizer (pass --tokenizer to force one)")
    fingerprint = {
        "prompts": {"path": str(prompts_p.resolve()), "records": total,
                    "size": prompts_p.stat().st_size if prompts_p.is_file() else None},
        "teacher": model_identity(teacher),
        "student": model_identity(student),
        "tokenizer": {"path": str(tok_dir.resolve()), "vocab_sha256": tokenizer_fingerprint(tok)},
        "settings": dict(settings_d),
        "shard_size": int(shard_size),
    }
    manifest_p = run_dir / "manifest.json"
    if manifest_p.is_file():
        old = json.loads(manifest_p.read_text())
        diff = [k for k in FINGERPRINT_KEYS if json.dumps(old.get("config", {}).get(k), sort_keys=True, default=str)
                != json.dumps(fingerprint[k], sort_keys=True, default=str)]
        if diff and not overwrite:
            raise ValueError(f"{run_dir} holds a score run with different {', '.join(diff)}; use a new --out "
                             "or --overwrite to discard it")
        if diff:
            for f in shard_dir.glob("shard-*.jsonl"):
                f.unlink()
    num_shards = max(1, -(-total // shard_size))

    def shard_path(k: int) -> Path:
        return shard_dir / f"shard-{k:05d}.jsonl"

    def shard_indices(k: int) -> list[int]:
        return list(range(k * shard_size, min(total, (k + 1) * shard_size)))

    def shard_done(k: int) -> bool:
        p = shard_path(k)
        if not p.is_file():
            return False
        try:
            rows = _read_jsonl(p)
        except (OSError, json.JSONDecodeError):
            return False
        return [r.get("index") for r in rows] == shard_indices(k)

    done_before = [k for k in range(num_shards) if shard_done(k)]
    todo = [k for k in range(num_shards) if k not in set(done_before)]
    manifest: dict[str, Any] = {
        "stage": "score",
        "version": RECORD_VERSION,
        "config": fingerprint,
        "shards": {"total": num_shards, "resumed": len(done_before), "scored_now": 0},
        "complete": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")

    t0 = time.perf_counter()
    scored_now = 0
    if todo:
        mesh_obj = parse_mesh(mesh)
        t_model, _ = load_model(teacher, mesh_obj)
        s_model, _ = load_model(student, mesh_obj)
        scorer = Scorer(t_model, s_model, tok, settings_d, mesh=mesh_obj, source=source)
        done_prompts = sum(len(shard_indices(k)) for k in done_before)
        bar = _bar(total, "score", progress, initial=done_prompts)
        base = jax.random.key(int(settings_d["seed"]))
        try:
            for k in todo:
                if max_shards is not None and scored_now >= max_shards:
                    break
                rows = scorer.score_indices(shard_indices(k), jax.random.fold_in(base, k), bar)
                _write_atomic(shard_path(k), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                scored_now += 1
                manifest["shards"]["scored_now"] = scored_now
                _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")
                if after_shard is not None:
                    after_shard(k)
        finally:
            if bar is not None:
                bar.close()
    manifest["seconds"] = time.perf_counter() - t0
    finished = [k for k in range(num_shards) if shard_done(k)]
    entries = [r for k in finished for r in _read_jsonl(shard_path(k))]
    complete = len(finished) == num_shards
    counts = Counter(e["status"] for e in entries)
    by_reason = Counter(e["reason"] for e in entries if e["status"] == "skipped")
    manifest["counts"] = {
        "input": total,
        "accounted": len(entries),
        "scored": counts.get("scored", 0),
        "skipped": counts.get("skipped", 0),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "remaining": total - len(entries),
    }
    manifest["shards"]["done"] = len(finished)
    manifest["complete"] = complete
    if complete:
        ids = [e["index"] for e in entries]
        if ids != list(range(total)):
            raise RuntimeError(f"{run_dir}: shard contents do not cover prompts 0..{total - 1} exactly once")
        with (run_dir / "scores.jsonl.tmp").open("w", encoding="utf-8") as f:
            for k in range(num_shards):
                f.write(shard_path(k).read_text(encoding="utf-8"))
        os.replace(run_dir / "scores.jsonl.tmp", run_dir / "scores.jsonl")
        summary = write_report(run_dir, entries, settings_d["metric"], notes=notes)
        manifest["summary"] = {
            "zero_delta_exact": summary["zero_delta"]["exact"]["overall"],
            "zero_delta_permutation": summary["zero_delta"]["permutation"]["overall"],
            "zero_delta_posterior": summary["zero_delta"]["posterior"]["overall"],
            "mean_delta": summary["delta"]["mean"],
        }
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher HF checkpoint directory (with tokenizer)")
    parser.add_argument("--student", required=True, help="student HF checkpoint directory")
    parser.add_argument("--prompts", required=True, help="prompt records: .jsonl, .array_record or a dataset dir")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the teacher's)")
    parser.add_argument("--n", type=int, default=8, help="samples per model per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampling batch")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per output shard (unit of resume)")
    parser.add_argument("--metric", default="tv", choices=dv.METRICS, help="Δ used for tests and the report")
    parser.add_argument("--epsilon", type=float, default=0.1, help="posterior test: P(Δ_true > epsilon)")
    parser.add_argument("--max-posterior", type=float, default=0.5, help="posterior test: zero if P <= this")
    parser.add_argument("--level", type=float, default=0.05, help="permutation test level")
    parser.add_argument("--num-permutations", type=int, default=999)
    parser.add_argument("--num-posterior-draws", type=int, default=1000)
    parser.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default Qwen3-VL's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=4,tensor=2 (default: one device)")
    parser.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run with other settings")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = run_score(
            args.teacher, args.student, args.prompts, args.out, shard_size=args.shard_size,
            tokenizer=args.tokenizer, mesh=args.mesh, max_shards=args.max_shards, overwrite=args.overwrite,
            progress=not args.no_progress, n=args.n, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, metric=args.metric,
            epsilon=args.epsilon, max_posterior=args.max_posterior, level=args.level,
            num_permutations=args.num_permutations, num_posterior_draws=args.num_posterior_draws,
            max_pixels=args.max_pixels, seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"jdelta score: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"{c['input']} prompts: {c['scored']} scored, {c['skipped']} skipped {c['skipped_by_reason'] or ''}"
          f", {c['remaining']} remaining")
    if manifest["complete"]:
        print((Path(args.out) / "report.md").read_text())
    else:
        print(f"stopped with {manifest['shards']['done']}/{manifest['shards']['total']} shards done; "
              "rerun the same command to continue")
    return 0
