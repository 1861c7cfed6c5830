"""Run an experiment over seeds, resumably, and aggregate it: ``results.md``, ``results.json``, PNG curves.

``run_experiment(name, out, seeds=S, settings=...)`` runs seeds ``0 .. S-1`` of experiment ``name``
(a module of :data:`jdelta.experiments.EXPERIMENTS`) in the run directory ``out``
(:class:`jdelta.runs.RunDir`: locked, its manifest bound to the experiment and its resolved
settings, so a rerun with other settings is refused naming the keys). Each seed's
:class:`~jdelta.experiments.common.SeedResult` is written atomically to ``out/seed-K/result.json``
with its wall and CPU time and the load average; a rerun skips finished seeds (more seeds later
just adds the new ones).

Aggregation: per condition and metric, the mean over seeds and a two-sided 95% Student-t
interval ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (``sd`` with ``n-1``; NaN seeds left out; no
interval for one seed). Curves: the same per step. ``results.md`` holds the experiment's
``describe(settings)``, the table ``mean [lo, hi]``, every seed's values, the time, and the plots
(``<metric>.png``: mean line with its interval band per condition).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jdelta.config import ConfigError, build, read_yaml, to_dict
from jdelta.errors import UserError
from jdelta.experiments import EXPERIMENTS
from jdelta.experiments.common import SeedResult

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "experiments"


# ----------------------------------------------------------------------------- experiments and settings


def experiment_module(name: str) -> ModuleType:
    """The module of experiment ``name`` (:class:`UserError` naming the known ones otherwise)."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}")
    return importlib.import_module(EXPERIMENTS[name])


def default_settings_file(name: str) -> Path:
    """``jdelta/configs/experiments/<name>.yaml``: the experiment's default size (``settings:``)."""
    return CONFIG_DIR / f"{name}.yaml"


def resolve_settings(name: str, overrides: Mapping[str, Any] | None = None, *, smoke: bool = False) -> Any:
    """Experiment ``name``'s ``Settings``: its defaults <- ``configs/experiments/<name>.yaml``'s
    ``settings`` <- ``SMOKE`` (when ``smoke``) <- ``overrides``, validated (an unknown key or a bad
    value raises :class:`ConfigError` naming it)."""
    module = experiment_module(name)
    mapping: dict[str, Any] = {}
    path = default_settings_file(name)
    if path.is_file():
        mapping.update(read_yaml(path).get("settings") or {})
    if smoke:
        mapping.update(getattr(module, "SMOKE", {}))
    mapping.update(dict(overrides or {}))
    try:
        return build(module.Settings, mapping)
    except ConfigError as e:
        raise ConfigError(f"experiment {name} settings: {e}") from None


# ----------------------------------------------------------------------------- statistics


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of the finite ``values``: the Student-t interval for the mean
    (``lo = hi = nan`` for fewer than two values; ``mean`` nan for none)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def aggregate(results: Sequence[SeedResult], conditions: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-seed results -> ``{"metrics": {condition: {metric: {mean, lo, hi, n, values}}},
    "curves": {metric: {condition: {steps, mean, lo, hi}}}}`` (``values``: one per seed, in order,
    nan where missing). Conditions in ``conditions`` order first, then any others seen."""
    conds = list(conditions or [])
    for r in results:
        conds += [c for c in r.metrics if c not in conds]
    metrics: dict[str, dict[str, Any]] = {}
    for c in conds:
        names: list[str] = []
        for r in results:
            names += [m for m in r.metrics.get(c, {}) if m not in names]
        if not names:
            continue
        metrics[c] = {}
        for m in names:
            vals = [float(r.metrics.get(c, {}).get(m, float("nan"))) for r in results]
            mean, lo, hi, n = t_interval(vals)
            metrics[c][m] = {"mean": mean, "lo": lo, "hi": hi, "n": n, "values": vals}
    curves: dict[str, dict[str, Any]] = {}
    for r in results:
        for metric, per in r.curves.items():
            for c in per:
                curves.setdefault(metric, {}).setdefault(c, None)
    for metric, per in curves.items():
        for c in list(per):
            by_step: dict[int, list[float]] = {}
            for r in results:
                for step, v in r.curves.get(metric, {}).get(c, []):
                    by_step.setdefault(int(step), []).append(float(v))
            steps = sorted(by_step)
            rows = [t_interval(by_step[s]) for s in steps]
            per[c] = {"steps": steps, "mean": [x[0] for x in rows], "lo": [x[1] for x in rows],
                      "hi": [x[2] for x in rows], "n": [x[3] for x in rows]}
    return {"conditions": [c for c in conds if c in metrics or any(c in p for p in curves.values())],
            "metrics": metrics, "curves": curves}


def paired_difference(agg: Mapping[str, Any], metric: str, a: str, b: str) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of the per-seed difference ``a - b`` of ``metric`` (a paired t-interval:
    both conditions share each seed's data and initial student)."""
    va = agg["metrics"][a][metric]["values"]
    vb = agg["metrics"][b][metric]["values"]
    return t_interval([x - y for x, y in zip(va, vb, strict=True)])


ACCURACY_METRICS = ("accuracy/all", "accuracy/trend", "accuracy/counting", "accuracy/argmax", "accuracy/argmin")


def paired_table(agg: Mapping[str, Any], pairs: Sequence[tuple[str, str]], metrics: Sequence[str] = ACCURACY_METRICS,
                 *, title: str = "Paired differences", labels: Sequence[str] | None = None) -> str:
    """Markdown table of :func:`paired_difference` ``a - b`` per metric (rows) and pair (columns);
    ``n/a`` where a condition or metric was not measured. ``labels``: column heads (``a − b``)."""
    labels = [f"{a} − {b}" for a, b in pairs] if labels is None else list(labels)
    lines = [f"### {title} (per seed, then mean [95% t-interval])", "",
             "| metric | " + " | ".join(labels) + " |", "|---" * (len(pairs) + 1) + "|"]
    for metric in metrics:
        cells = []
        for a, b in pairs:
            try:
                m, lo, hi, _ = paired_difference(agg, metric, a, b)
                cells.append(fmt_interval(m, lo, hi))
            except (KeyError, ValueError):
                cells.append("n/a")
        lines.append(f"| {metric} | {' | '.join(cells)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- formatting


def fmt(v: float) -> str:
    """A number for the tables: 1 decimal from 10 up, 2 from 1, 3 below (n/a for nan)."""
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def fmt_interval(mean: float, lo: float, hi: float) -> str:
    """``mean [lo, hi]`` (``mean`` alone when there is no interval)."""
    if not math.isfinite(lo):
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def cell(agg: Mapping[str, Any], condition: str, metric: str) -> str:
    """The table cell ``mean [lo, hi]`` of one condition and metric (``—`` when not measured)."""
    row = agg["metrics"].get(condition, {}).get(metric)
    if row is None or row["n"] == 0:
        return "—"
    return fmt_interval(row["mean"], row["lo"], row["hi"])


def metric_names(agg: Mapping[str, Any]) -> list[str]:
    """Every metric of the aggregate, in first-seen order."""
    names: list[str] = []
    for per in agg["metrics"].values():
        names += [m for m in per if m not in names]
    return names


def results_table(agg: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    """Markdown: one row per metric, one column per condition, ``mean [lo, hi]``."""
    conds = [c for c in agg["conditions"] if c in agg["metrics"]]
    lines = ["| metric | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
    for m in metrics or metric_names(agg):
        lines.append(f"| {m} | " + " | ".join(cell(agg, c, m) for c in conds) + " |")
    return "\n".join(lines)


def seeds_table(agg: Mapping[str, Any], seeds: Sequence[int]) -> str:
    """Markdown: every seed's value of every (metric, condition)."""
    lines = ["| metric | condition | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for m in metric_names(agg):
        for c in agg["conditions"]:
            row = agg["metrics"].get(c, {}).get(m)
            if row is not None:
                lines.append(f"| {m} | {c} | " + " | ".join(fmt(v) for v in row["values"]) + " |")
    return "\n".join(lines)


def curve_file(metric: str) -> str:
    """The PNG file name of a curve metric (``/`` and other odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") + ".png"


def plot_curves(agg: Mapping[str, Any], out: Path, *, title: str = "") -> list[str]:
    """One PNG per curve metric in ``out`` (mean line and 95% band per condition); returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, per in agg["curves"].items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for c, cur in per.items():
            if cur is None or not cur["steps"]:
                continue
            x = np.asarray(cur["steps"])
            y = np.asarray(cur["mean"], np.float64)
            line, = ax.plot(x, y, marker="o", markersize=3, label=c)
            lo, hi = np.asarray(cur["lo"], np.float64), np.asarray(cur["hi"], np.float64)
            if np.isfinite(lo).any():
                ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}" if title else metric, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = curve_file(metric)
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out / name)
        names.append(name)
    return names


def time_section(times: Mapping[int, Mapping[str, Any]]) -> str:
    """Markdown: wall and CPU seconds and the load average of every seed, and the totals."""
    lines = ["| seed | wall s | CPU s | load average (1 min) at start / end |", "|---|---|---|---|"]
    for s, t in sorted(times.items()):
        la = t.get("loadavg_start", [float("nan")])[0], t.get("loadavg_end", [float("nan")])[0]
        lines.append(f"| {s} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {la[0]:.1f} / {la[1]:.1f} |")
    wall = sum(t["wall_s"] for t in times.values())
    cpu = sum(t["cpu_s"] for t in times.values())
    lines.append(f"| **all** | **{wall:.0f}** | **{cpu:.0f}** | |")
    return "\n".join(lines)


def results_markdown(name: str, module: ModuleType, settings: Any, agg: Mapping[str, Any],
                     seeds: Sequence[int], times: Mapping[int, Mapping[str, Any]], plots: Sequence[str],
                     command: str | None = None) -> str:
    lines = [f"# Experiment `{name}`", "", module.describe(settings).strip(), ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"## Results ({len(seeds)} seeds: mean [95% t-interval over seeds])", "", results_table(agg), ""]
    summarize: Callable[..., str] | None = getattr(module, "summarize", None)
    if summarize is not None:
        lines += [summarize(settings, agg).strip(), ""]
    if plots:
        lines += ["## Curves (mean over seeds, band: 95% t-interval)", ""]
        lines += [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## Every seed", "", seeds_table(agg, seeds), "",
              f"## Time ({platform.machine()}, {os.cpu_count()} CPUs)", "", time_section(times), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def run_experiment(name: str, out: str | os.PathLike, *, seeds: int = 3, settings: Any = None,
                   overwrite: bool = False, log: Callable[[str], None] = print,
                   command: str | None = None) -> dict[str, Any]:
    """Run (or resume) seeds ``0 .. seeds-1`` of experiment ``name`` in ``out`` and write the
    aggregate; returns it (also ``out/results.json``). ``settings``: the experiment's ``Settings``
    (None: :func:`resolve_settings` with no overrides)."""
    from jdelta.runs import RunDir, read_json, write_atomic

    if seeds < 1:
        raise ConfigError(f"seeds: must be >= 1, got {seeds}")
    module = experiment_module(name)
    settings = resolve_settings(name) if settings is None else settings
    if not isinstance(settings, module.Settings):
        raise TypeError(f"settings must be {module.__name__}.Settings, got {type(settings).__name__}")
    config = {"experiment": name, "settings": to_dict(settings)}
    results: list[SeedResult] = []
    times: dict[int, dict[str, Any]] = {}
    with RunDir(out, "experiment", config=config, overwrite=overwrite) as run:
        root = run.path
        for seed in range(seeds):
            path = root / f"seed-{seed}" / "result.json"
            if path.is_file():
                saved = read_json(path)
                log(f"seed {seed}: done before ({path}), skipped")
            else:
                work = root / f"seed-{seed}"
                work.mkdir(parents=True, exist_ok=True)
                log(f"seed {seed}: running {name}")
                la0, w0, c0 = list(os.getloadavg()), time.perf_counter(), time.process_time()
                res = module.run_seed(settings, seed, work, log)
                saved = {"seed": seed, "result": res.to_json(), "wall_s": time.perf_counter() - w0,
                         "cpu_s": time.process_time() - c0, "loadavg_start": la0,
                         "loadavg_end": list(os.getloadavg())}
                write_atomic(path, json.dumps(saved, indent=2) + "\n")
                run.commit()
                log(f"seed {seed}: {saved['wall_s']:.0f}s wall, {saved['cpu_s']:.0f}s CPU")
            results.append(SeedResult.from_json(saved["result"]))
            times[seed] = {k: saved[k] for k in ("wall_s", "cpu_s", "loadavg_start", "loadavg_end") if k in saved}
        agg = aggregate(results, getattr(module, "CONDITIONS", None))
        plots = plot_curves(agg, root, title=name)
        doc = results_markdown(name, module, settings, agg, list(range(seeds)), times, plots, command)
        summary = {"experiment": name, "settings": to_dict(settings), "seeds": list(range(seeds)), **agg,
                   "notes": {str(s): r.notes for s, r in enumerate(results)}, "time": times}
        run.write_atomic("results.json", json.dumps(_clean(summary), indent=2, default=_nan_to_none) + "\n")
        run.write_atomic("results.md", doc)
        run.update(counts={"seeds": seeds}, complete=True)
    return summary


def _clean(o: Any) -> Any:
    """``o`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, Mapping):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o):
        return to_dict(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


__all__ = ["aggregate", "cell", "default_settings_file", "experiment_module", "fmt", "fmt_interval",
           "paired_difference", "paired_table", "plot_curves", "resolve_settings", "results_markdown", "results_table",
           "run_experiment", "t_interval"]
