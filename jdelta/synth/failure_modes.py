"""Failure modes: group scored prompts by what they ask and by how teacher and student differ.

Input: the per-prompt entries of :func:`jdelta.delta_scoring.delta_records` (``status``, ``family``, ``category``,
``answer_type``, ``classes`` with per-class teacher/student counts and ``correct`` flags,
``delta``, ``zero_delta``, ``teacher_majority_correct``, ``student_majority_correct``).

Outcome of one prompt (first rule that applies):

* ``zero_delta``: the chosen zero-delta flag is set (default ``exact``: same answer distribution);
* with a reference answer: ``student_wrong_teacher_right`` (teacher's majority answer correct,
  student's not), ``both_wrong``, ``teacher_wrong_student_right``;
* ``student_inconsistent``: the student's most frequent answer holds less than
  ``consistency`` of its samples (no reference needed);
* ``disagree``: no reference and the two majority answers differ;
* ``divergent``: anything else with Δ > 0 (both right, distributions still differ).

A *mode* is (group value, outcome), group = ``family`` by default. Modes are ranked by their
Δ mass (sum of Δ over their prompts), which is what training on them can recover.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OUTCOMES = (
    "student_wrong_teacher_right",
    "student_inconsistent",
    "both_wrong",
    "teacher_wrong_student_right",
    "disagree",
    "divergent",
    "zero_delta",
)
DEFAULT_TARGETS = ("student_wrong_teacher_right", "student_inconsistent")

DESCRIPTIONS = {
    "student_wrong_teacher_right": "answers questions like this wrongly while a stronger model answers them right",
    "student_inconsistent": "gives inconsistent answers to questions like this across attempts",
    "both_wrong": "and a stronger model both answer questions like this wrongly",
    "teacher_wrong_student_right": "answers questions like this right where a stronger model does not",
    "disagree": "disagrees with a stronger model on questions like this",
    "divergent": "answers questions like this with a different spread of answers than a stronger model",
    "zero_delta": "answers questions like this exactly as a stronger model does",
}


def _majority(classes: Sequence[Mapping[str, Any]], who: str) -> int | None:
    counts = [int(c.get(who, 0)) for c in classes]
    if not counts or max(counts) == 0:
        return None
    return counts.index(max(counts))


def outcome_of(entry: Mapping[str, Any], *, zero_delta_test: str = "exact", consistency: float = 0.75) -> str:
    """The outcome of one scored entry (see the module docstring)."""
    if (entry.get("zero_delta") or {}).get(zero_delta_test):
        return "zero_delta"
    classes = entry.get("classes") or []
    t_ok, s_ok = entry.get("teacher_majority_correct"), entry.get("student_majority_correct")
    if t_ok is not None and s_ok is not None:
        if t_ok and not s_ok:
            return "student_wrong_teacher_right"
        if not t_ok and not s_ok:
            return "both_wrong"
        if not t_ok and s_ok:
            return "teacher_wrong_student_right"
    n_s = sum(int(c.get("student", 0)) for c in classes)
    top = max((int(c.get("student", 0)) for c in classes), default=0)
    if n_s and top / n_s < consistency:
        return "student_inconsistent"
    if t_ok is None and _majority(classes, "teacher") != _majority(classes, "student"):
        return "disagree"
    return "divergent"


def delta_of(entry: Mapping[str, Any], metric: str = "tv") -> float:
    v = (entry.get("delta") or {}).get(metric)
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def group_value(entry: Mapping[str, Any], group_by: str) -> str:
    return str(entry.get(group_by) or "(none)")


def failure_modes(
    entries: Sequence[Mapping[str, Any]],
    *,
    group_by: str = "family",
    metric: str = "tv",
    zero_delta_test: str = "exact",
    consistency: float = 0.75,
) -> dict[str, Any]:
    """Rank (group, outcome) modes by Δ mass. Pure.

    Returns ``{"modes": [...], "groups": [...], "outcomes": {...}, "counts": {...}}``; each mode has
    ``group``, ``outcome``, ``prompts``, ``delta_mass``, ``mean_delta``, ``share_of_mass`` and
    ``ids`` (entry ids sorted by Δ descending, then id); ``groups`` ranks group values by the Δ
    mass of their non-zero-delta prompts. Skipped entries are counted, not grouped.
    """
    modes: dict[tuple[str, str], dict[str, Any]] = {}
    skipped = 0
    for e in entries:
        if e.get("status") != "scored":
            skipped += 1
            continue
        key = (group_value(e, group_by), outcome_of(e, zero_delta_test=zero_delta_test, consistency=consistency))
        m = modes.setdefault(key, {"group": key[0], "outcome": key[1], "prompts": 0, "delta_mass": 0.0, "_ids": []})
        d = delta_of(e, metric)
        m["prompts"] += 1
        m["delta_mass"] += d
        m["_ids"].append((-d, str(e.get("id")), e.get("id")))
    total_mass = sum(m["delta_mass"] for m in modes.values())
    ranked = sorted(modes.values(), key=lambda m: (-m["delta_mass"], -m["prompts"], m["group"], m["outcome"]))
    out_modes = []
    for m in ranked:
        ids = [x[2] for x in sorted(m.pop("_ids"))]
        m["delta_mass"] = round(m["delta_mass"], 9)
        m["mean_delta"] = round(m["delta_mass"] / m["prompts"], 9)
        m["share_of_mass"] = round(m["delta_mass"] / total_mass, 9) if total_mass > 0 else 0.0
        m["ids"] = ids
        out_modes.append(m)
    groups: dict[str, dict[str, Any]] = {}
    for m in out_modes:
        g = groups.setdefault(m["group"], {"group": m["group"], "prompts": 0, "zero_delta": 0, "delta_mass": 0.0})
        g["prompts"] += m["prompts"]
        g["delta_mass"] = round(g["delta_mass"] + m["delta_mass"], 9)
        if m["outcome"] == "zero_delta":
            g["zero_delta"] += m["prompts"]
    outcomes: dict[str, int] = {}
    for m in out_modes:
        outcomes[m["outcome"]] = outcomes.get(m["outcome"], 0) + m["prompts"]
    scored = sum(m["prompts"] for m in out_modes)
    return {
        "group_by": group_by,
        "metric": metric,
        "zero_delta_test": zero_delta_test,
        "modes": out_modes,
        "groups": sorted(groups.values(), key=lambda g: (-g["delta_mass"], g["group"])),
        "outcomes": dict(sorted(outcomes.items())),
        "counts": {"in": len(entries), "out": scored, "dropped": {"skipped_by_scorer": skipped}},
        "total_delta_mass": round(total_mass, 9),
    }


def target_modes(analysis: Mapping[str, Any], targets: Sequence[str] = DEFAULT_TARGETS, top: int | None = None) -> list[dict]:
    """The modes synthesis should target: outcomes in ``targets`` with Δ mass > 0, ranked, top ``top``."""
    ms = [m for m in analysis["modes"] if m["outcome"] in targets and m["delta_mass"] > 0]
    return ms[:top] if top else ms


def report_markdown(analysis: Mapping[str, Any], title: str = "Failure modes", max_rows: int = 20) -> str:
    """Markdown: modes ranked by Δ mass, then groups, then outcome totals."""
    c = analysis["counts"]
    lines = [
        f"# {title}",
        "",
        f"{c['in']} entries: {c['out']} scored, {c['dropped']['skipped_by_scorer']} skipped by the scorer. "
        f"Grouped by `{analysis['group_by']}`; Δ = `{analysis['metric']}`; zero-delta test "
        f"`{analysis['zero_delta_test']}`; total Δ mass {analysis['total_delta_mass']:.3f}.",
        "",
        "| rank | group | outcome | prompts | Δ mass | share | mean Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(analysis["modes"][:max_rows], 1):
        lines.append(f"| {i} | {m['group']} | {m['outcome']} | {m['prompts']} | {m['delta_mass']:.3f} | "
                     f"{100 * m['share_of_mass']:.1f}% | {m['mean_delta']:.3f} |")
    if len(analysis["modes"]) > max_rows:
        lines.append(f"| ... | {len(analysis['modes']) - max_rows} more | | | | | |")
    lines += ["", "| group | prompts | zero-Δ | Δ mass |", "|---|---|---|---|"]
    for g in analysis["groups"]:
        lines.append(f"| {g['group']} | {g['prompts']} | {g['zero_delta']} | {g['delta_mass']:.3f} |")
    lines += ["", "Outcomes: " + ", ".join(f"{k} {v}" for k, v in analysis["outcomes"].items()), ""]
    return "\n".join(lines)


def plot_modes(analysis: Mapping[str, Any], path: str | Path, max_rows: int = 12) -> None:
    """Horizontal bar chart of the top modes' Δ mass (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in analysis["modes"] if m["delta_mass"] > 0][:max_rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(ms), 1) + 1.2))
    ax.barh([f"{m['group']} / {m['outcome']}" for m in ms][::-1], [m["delta_mass"] for m in ms][::-1], color="#3b6ea8")
    ax.set_xlabel(f"Δ mass ({analysis['metric']})")
    ax.set_title("Failure modes ranked by Δ mass")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
