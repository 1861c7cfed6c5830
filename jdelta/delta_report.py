"""The ``score`` report: zero-delta fractions with intervals, Δ statistics, per-category tables, a histogram."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from jdelta import divergence as dv


def _f(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


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


def plot_delta_histogram(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike | IO[bytes], metric: str = "tv") -> None:
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
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_report(run_dir: Path, entries: Sequence[Mapping[str, Any]], metric: str, notes: Sequence[str] = ()) -> dict:
    """``report.json``, ``report.md`` and ``delta_hist.png`` in ``run_dir`` (each written atomically); returns the summary."""
    from jdelta.runs import open_atomic, write_atomic

    summary = summarize(entries, metric)
    write_atomic(Path(run_dir) / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_atomic(Path(run_dir) / "report.md", report_markdown(summary, notes=notes))
    with open_atomic(Path(run_dir) / "delta_hist.png", "wb") as f:
        plot_delta_histogram(entries, f, metric)
    return summary
