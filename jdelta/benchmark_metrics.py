"""Which benchmark metric judges a prompt record's answers, how its answers are classed, and its references.

Pure policy over :class:`~jdelta.data.records.PromptRecord` fields, shared by ``score``, ``eval``
and the synthesis pipeline.
"""

from __future__ import annotations

from jdelta import answers as ans

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
    """Every accepted reference answer of a record, its ``answer`` first
    (:attr:`~jdelta.data.records.PromptRecord.answers`: ``meta["answers"]`` when several are
    accepted, as in DocVQA), or None when it has no reference."""
    return record.answers
