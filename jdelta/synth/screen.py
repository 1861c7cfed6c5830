"""Screening: keep scored candidates with Δ > τ (and a teacher that agrees with the reference often
enough), deduplicate (exact and near-duplicate question text on the same image), balance groups to
configured shares. Pure functions over (record JSON, score entry) pairs; every candidate ends as
kept or dropped with one reason.

Drop reasons, in the order they are checked: ``skipped_by_scorer``, ``low_delta`` (Δ <= τ),
``teacher_unreliable`` (reference present and teacher sampled accuracy < ``min_teacher_accuracy``),
``duplicate_exact``, ``duplicate_near`` (token Jaccard >= ``near_duplicate`` on the same image),
``over_share`` (removed to meet the configured shares). Among duplicates the higher-Δ candidate
is kept (ties: smaller id).
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from jdelta.synth.failure_modes import delta_of
from jdelta.synth.writer import jaccard, normalize_question

DROP_REASONS = ("skipped_by_scorer", "low_delta", "teacher_unreliable", "duplicate_exact", "duplicate_near", "over_share")


def image_key(record: Mapping[str, Any]) -> str:
    """Hash of a record JSON's images (inline bytes or paths)."""
    h = hashlib.sha1()
    for im in record.get("images") or []:
        if isinstance(im, Mapping) and "b64" in im:
            h.update(base64.b64decode(im["b64"]))
        else:
            h.update(repr(im).encode())
        h.update(b"|")
    return h.hexdigest()


def balance(groups: Sequence[str], scores: Sequence[float], ids: Sequence[str], shares: Mapping[str, float]) -> list[bool]:
    """Which items to keep so group counts follow ``shares`` as closely as the data allows. Pure.

    The largest total N with ``floor(N * share_g) <= available_g`` for every configured group is
    kept, each group's highest-scoring items first. Groups not named in ``shares`` are kept whole.
    """
    tot = sum(float(v) for v in shares.values())
    if not shares or tot <= 0:
        return [True] * len(groups)
    share = {g: float(v) / tot for g, v in shares.items() if float(v) > 0}
    avail = Counter(g for g in groups if g in share)
    present = {g: s for g, s in share.items() if avail[g] > 0}
    if not present:
        return [True] * len(groups)
    norm = sum(present.values())
    present = {g: s / norm for g, s in present.items()}
    n_total = min(avail[g] / s for g, s in present.items())
    quota = {g: int(n_total * s + 1e-9) for g, s in present.items()}
    keep = [g not in share for g in groups]
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if g in present:
            by_group[g].append(i)
    for g, idx in by_group.items():
        idx.sort(key=lambda i: (-scores[i], ids[i]))
        for i in idx[: quota[g]]:
            keep[i] = True
    return keep


def screen(
    candidates: Sequence[Mapping[str, Any]],
    entries: Sequence[Mapping[str, Any]],
    *,
    tau: float = 0.0,
    metric: str = "tv",
    min_teacher_accuracy: float | None = 0.5,
    near_duplicate: float = 0.8,
    shares: Mapping[str, float] | None = None,
    balance_by: str = "family",
    existing: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[dict], dict[str, Any]]:
    """Screen candidates (record JSONs) with their score entries (same order). Pure.

    ``existing``: records already in the dataset (earlier rounds); a candidate duplicating one is
    dropped. Returns ``(kept records with provenance.screening, counts)``; counts hold ``in``,
    ``out``, ``dropped`` by reason, and ``kept_by_group``.
    """
    if len(candidates) != len(entries):
        raise ValueError(f"{len(candidates)} candidates but {len(entries)} score entries")
    dropped: Counter = Counter()
    alive: list[int] = []
    for i, (rec, e) in enumerate(zip(candidates, entries, strict=True)):
        if e.get("id") != rec.get("id"):
            raise ValueError(f"candidate {i}: record id {rec.get('id')!r} but score entry id {e.get('id')!r}")
        if e.get("status") != "scored":
            dropped["skipped_by_scorer"] += 1
        elif delta_of(e, metric) <= tau:
            dropped["low_delta"] += 1
        elif (min_teacher_accuracy is not None and e.get("teacher_accuracy") is not None
              and e["teacher_accuracy"] < min_teacher_accuracy):
            dropped["teacher_unreliable"] += 1
        else:
            alive.append(i)
    # Deduplicate: best (highest Δ, then smallest id) first.
    alive.sort(key=lambda i: (-delta_of(entries[i], metric), str(candidates[i]["id"])))
    kept_norms: dict[str, list[str]] = defaultdict(list)
    for rec in existing:
        kept_norms[image_key(rec)].append(normalize_question(rec["question"]))
    survivors = []
    for i in alive:
        rec = candidates[i]
        key, norm = image_key(rec), normalize_question(rec["question"])
        same_image = kept_norms[key]
        if norm in same_image:
            dropped["duplicate_exact"] += 1
        elif any(jaccard(norm, s) >= near_duplicate for s in same_image):
            dropped["duplicate_near"] += 1
        else:
            same_image.append(norm)
            survivors.append(i)
    survivors.sort()
    groups = [str(candidates[i].get(balance_by) or "(none)") for i in survivors]
    keep = balance(groups, [delta_of(entries[i], metric) for i in survivors],
                   [str(candidates[i]["id"]) for i in survivors], shares or {})
    kept = []
    for i, k in zip(survivors, keep, strict=True):
        if not k:
            dropped["over_share"] += 1
            continue
        rec = dict(candidates[i])
        e = entries[i]
        rec["provenance"] = {
            **dict(rec.get("provenance") or {}),
            "screening": {
                "delta": delta_of(e, metric),
                "metric": metric,
                "teacher_accuracy": e.get("teacher_accuracy"),
                "student_accuracy": e.get("student_accuracy"),
                "p_value": e.get("p_value"),
            },
        }
        kept.append(rec)
    by_group = Counter(str(r.get(balance_by) or "(none)") for r in kept)
    counts = {
        "in": len(candidates),
        "out": len(kept),
        "dropped": {r: int(dropped.get(r, 0)) for r in DROP_REASONS},
        "kept_by_group": dict(sorted(by_group.items())),
    }
    return kept, counts
