"""One model's answers on benchmark sets, each scored with its own metric (the library behind ``jdelta eval``).

Per prompt the model answers greedily (``n == 1``) or samples ``n`` completions and answers with
the majority class (:func:`jdelta.answers.class_answers`; ties go to the earliest answer). The
answer is scored against every accepted reference with the benchmark's metric
(:func:`jdelta.benchmark_metrics.answer_metric_for`: ChartQA relaxed accuracy, DocVQA/InfoVQA
ANLS, AI2D multiple choice, ...) or one metric forced for all.

Benchmarks are named ``[NAME=]PATH`` (a jdelta records file or directory) or
``[NAME=]LAYOUT:DIR`` (a Hugging Face dataset saved to disk in a known layout, see
:data:`jdelta.data.records.LAYOUTS`); :func:`parse_data_spec` reads a comma-separated list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jdelta import answers as ans
from jdelta import completions
from jdelta.benchmark_metrics import answer_metric_for, classing_type_for, references_of

# ``metric`` choices -> the answers metric (None: each benchmark's own).
METRIC_ALIASES: dict[str, str | None] = {
    "auto": None,
    "relaxed": "relaxed_accuracy",
    "relaxed_accuracy": "relaxed_accuracy",
    "anls": "anls",
    "exact": "exact_match",
    "exact_match": "exact_match",
    "mc": "mc_accuracy",
    "mc_accuracy": "mc_accuracy",
}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark set: its name, where it is, and its on-disk layout (None: jdelta records)."""

    name: str
    path: str
    layout: str | None = None

    def open(self):
        """The records source."""
        from jdelta.data.records import hf_disk_source, open_records

        if self.layout is not None:
            return hf_disk_source(self.path, self.layout)
        if not Path(self.path).exists():
            raise FileNotFoundError(f"data: {self.path} does not exist")
        return open_records(self.path)


def parse_data_spec(spec: str) -> list[Benchmark]:
    """``"a.jsonl,docvqa=docvqa:/d/docvqa"`` -> benchmarks (names unique)."""
    from jdelta.data.records import LAYOUTS

    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, rest = item.rpartition("=") if "=" in item else ("", "", item)
        layout = None
        head, sep, tail = rest.partition(":")
        if sep and head in LAYOUTS and not Path(rest).exists():
            layout, rest = head, tail
        p = Path(rest)
        if not name:
            name = p.parent.name if p.name in ("records.jsonl", "records.array_record") else p.name.split(".")[0]
        out.append(Benchmark(name, rest, layout))
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"data: benchmark names {dup} repeat; name them as NAME=PATH")
    if not out:
        raise ValueError("data: no benchmark given")
    return out


def majority_answer(completions_: Sequence[str], answer_type: str) -> tuple[str, str, int]:
    """(extracted answer of the modal class, its label, its count); ``("", INVALID_LABEL, k)`` if invalid."""
    c = ans.class_answers(list(completions_), [], answer_type)
    j = int(np.argmax(c.teacher_counts))  # argmax: ties go to the earliest class
    rep = c.classes[j]
    return ("" if rep.kind == "invalid" else rep.raw), c.labels[j], int(c.teacher_counts[j])


def judge(record, texts: Sequence[str], finish: Sequence[str], *, metric: str | None, index: int) -> dict:
    """The prediction row of one record from its completions (``metric`` None: the record's own)."""
    me = metric or answer_metric_for(record)
    ty = classing_type_for(record)
    pred, label, votes = majority_answer(texts, ty)
    refs = references_of(record)
    answer_type = record.answer_type if record.answer_type != "text" else "auto"
    score = ans.score_answer(pred, refs, me, answer_type) if pred else 0.0
    return {"id": record.id, "index": int(index), "status": "scored", "category": record.category,
            "family": record.family, "metric": me, "reference": refs, "prediction": pred, "label": label,
            "votes": votes, "n": len(texts), "score": float(score), "completions": list(texts[:3]),
            "truncated": int(sum(f == "length" for f in finish))}


def evaluate_source(sampler, tokenizer, source, *, pipeline, params, key, metric: str = "auto",
                    limit: int | None = None, progress=None) -> list[dict]:
    """One entry per prompt of ``source`` (its first ``limit``), in order: ``status`` ``"scored"``
    with ``prediction``, ``score`` and ``metric``, or ``"skipped"`` with a ``reason`` (records
    without a reference are skipped as ``no_reference``, before any sampling).

    ``sampler``: a :class:`~jdelta.sampling.Sampler` built for ``pipeline`` (the prompt pipeline's
    config); ``params``: its :class:`~jdelta.sampling.SamplingParams`; ``key``: PRNG key (batch
    ``b`` samples with ``fold_in(key, b)``).
    """
    import jax

    if metric not in METRIC_ALIASES:
        raise ValueError(f"metric {metric!r}: expected one of {sorted(METRIC_ALIASES)}")
    forced = METRIC_ALIASES[metric]
    total = len(source) if limit is None else min(limit, len(source))
    entries: dict[int, dict] = {}
    batches = completions.prompt_batches(_WithReference(source), tokenizer, pipeline, select=slice(0, total))
    reported = 0
    for b, batch in enumerate(batches):
        texts, finish = completions.sample_texts(sampler, tokenizer, batch.inputs, params, jax.random.fold_in(key, b))
        for i, rec, comp, fin in zip(batch.indices, batch.records, texts, finish, strict=True):
            entries[i] = judge(rec, comp, fin, metric=forced, index=i)
        if progress is not None:
            progress.update(len(batch.indices) + len(batches.skipped) - reported)
            reported = len(batches.skipped)
    for s in batches.skipped:
        entries[s["record_index"]] = {"id": s["id"], "index": s["record_index"], "status": "skipped",
                                      "reason": s["reason"], "message": s["message"]}
    if progress is not None:
        progress.update(len(batches.skipped) - reported)
    return [entries[i] for i in range(total)]


class _WithReference:
    """A records source whose records without a reference answer are skipped (``no_reference``)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        return self._source[index]

    def to_record(self, raw, index: int):
        from jdelta.data.records import RecordError

        rec = self._source.to_record(raw, index)
        if rec.answer is None:
            err = RecordError(f"record {rec.id!r}", "has no reference answer", "no_reference")
            err.record_id = rec.id
            raise err
        return rec

    def __repr__(self) -> str:
        return repr(self._source)


def summarize_benchmark(name: str, entries: Sequence[dict]) -> dict[str, Any]:
    """Counts and mean score of one benchmark's entries."""
    scored = [e for e in entries if e["status"] == "scored"]
    skipped = Counter(e["reason"] for e in entries if e["status"] == "skipped")
    metrics = sorted({e["metric"] for e in scored})
    return {
        "benchmark": name,
        "metric": metrics[0] if len(metrics) == 1 else "+".join(metrics) if metrics else None,
        "prompts": len(entries),
        "scored": len(scored),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "score": float(np.mean([e["score"] for e in scored])) if scored else None,
    }


def results_markdown(rows: Sequence[dict], average: float | None, notes: Sequence[str] = ()) -> str:
    """The per-benchmark table with the macro average."""
    lines = ["# jdelta eval", ""] + [f"> {x}" for x in notes] + ([""] if notes else [])
    lines += ["| benchmark | metric | prompts | scored | skipped | score |", "|---|---|---|---|---|---|"]
    for r in rows:
        sc = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}"
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['prompts']} | {r['scored']} | {r['skipped']} | {sc} |")
    lines.append(f"| **average** | | | | | {'n/a' if average is None else f'{100 * average:.1f}'} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "METRIC_ALIASES",
    "Benchmark",
    "evaluate_source",
    "judge",
    "majority_answer",
    "parse_data_spec",
    "results_markdown",
    "summarize_benchmark",
]
