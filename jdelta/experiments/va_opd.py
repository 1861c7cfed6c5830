"""Experiment 5 (VA-OPD): visual-advantage on-policy distillation against plain OPD.

Per seed ``k``: ``prompts`` training prompts from the world's ``distill`` split (its k-th slice,
all families in turn). The pair's student is distilled twice from the same initial weights, with
the same prompts, seed and step budget:

* ``opd``: standard OPD (reverse KL, token mean per response, mean over responses);
* ``va_opd``: VA-OPD as METHODS.md defines it (the teacher's visual advantage on the pixelated
  image, rollout weights softmax(z / τ) over the K rollouts of a prompt, the top 20% tokens by
  advantage weighted λ = 0.5 against the rest).

Recorded every ``eval_every`` steps: held-out accuracy per family (greedy exact match; the
detail-dependent families are argmax and argmin, ``accuracy/fine`` their mean), the reverse KL on
held-out prompts, and the student's visual reliance: the mean drop of its answer-token
log-probability (reference answers, teacher-forced) when its image is pixelated with VA-OPD's
pixelation, per family (``reliance/fine``: the fine families' mean). ``steps_to_opd_final``: the first
evaluated step at which a run's fine-family accuracy reaches OPD's final fine-family accuracy of
the same seed (NaN if never; OPD's own value says when it got there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jdelta.config import check
from jdelta.experiments import common as C

CONDITIONS: tuple[str, ...] = ("opd", "va_opd")
MODES = {"opd": "reverse_kl", "va_opd": "va_opd"}
CURVES: tuple[str, ...] = ("accuracy/fine", "accuracy/argmax", "accuracy/argmin", "accuracy/all",
                           "reliance/fine", "reverse_kl/all")


@dataclasses.dataclass(frozen=True)
class Settings:
    """prompts: training prompts per seed (families in turn). heldout_per_family: held-out records per
    family (accuracy and visual reliance). kl_per_family: held-out prompts per family for the reverse
    KL. steps / batch / rollouts / learning_rate / temperature / top_p / max_new_tokens: each
    distillation. va_lambda / va_tau / va_high_fraction: VA-OPD's λ, τ and high-group fraction.
    eval_every: steps between evaluations. pair: a ``jdelta toy-models`` output or a shipped pair's name (default ``v2``:
    multi-token answers, so VA-OPD's token groups and rollout weights act; None: v1)."""

    prompts: int = 128
    heldout_per_family: int = 100
    kl_per_family: int = 8
    steps: int = 200
    batch: int = 8
    rollouts: int = 4
    learning_rate: float = 1e-3
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 16
    va_lambda: float = 0.5
    va_tau: float = 1.0
    va_high_fraction: float = 0.2
    eval_every: int = 25
    pair: str | None = "v2"

    def __post_init__(self):
        for name in ("prompts", "heldout_per_family", "kl_per_family", "steps", "batch", "rollouts",
                     "max_new_tokens", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"prompts": 8, "heldout_per_family": 4, "kl_per_family": 1, "steps": 2, "batch": 2,
               "rollouts": 2, "eval_every": 1}


def distill_settings(s: Settings, mode: str) -> C.DistillSettings:
    return C.DistillSettings(mode=mode, steps=s.steps, batch=s.batch, rollouts=s.rollouts,
                             learning_rate=s.learning_rate, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, va_lambda=s.va_lambda, va_tau=s.va_tau,
                             va_high_fraction=s.va_high_fraction)


def describe(s: Settings) -> str:
    d = distill_settings(s, "va_opd")
    return f"""{__doc__.strip()}

Settings: {s.prompts} training prompts; held-out {s.heldout_per_family} records per family for
accuracy and visual reliance, {s.kl_per_family} prompts per family x {s.rollouts} student samples for the
reverse KL; each distillation: {s.steps} steps x {s.batch} prompts x {s.rollouts} rollouts (temperature
{s.temperature}, top-p {s.top_p}, up to {s.max_new_tokens} tokens), AdamW lr {s.learning_rate} (betas
0.9/0.95, weight decay {d.weight_decay}, cosine with {int(100 * d.warmup_fraction)}% warmup, clip 1.0);
VA-OPD λ = {s.va_lambda}, τ = {s.va_tau}, high group {s.va_high_fraction}; evaluation every
{s.eval_every} steps. Pair: {s.pair or "v1"} (`jdelta.toy.trained_pair`). Accuracies in %, reliance and
reverse KL in nats per token. Reference rows: `student_before`, `teacher` (as shipped, same held-out
records).
"""


def fine_families(pair: C.Pair) -> list[str]:
    return [f for f in pair.families if pair.detail(f) == "fine"]


def with_fine(values: dict[str, float], fine: list[str]) -> dict[str, float]:
    """``values`` plus ``fine``: the mean over the fine families."""
    return {**values, "fine": float(np.mean([values[f] for f in fine]))}


def run_seed(s: Settings, seed: int, workdir: Path, log: C.Log) -> C.SeedResult:
    pair = C.load_pair(s.pair)
    fams, fine = pair.families, fine_families(pair)
    heldout = C.encode(pair, C.heldout_records(pair, s.heldout_per_family, seed))
    kl_enc = C.encode(pair, C.heldout_records(pair, s.kl_per_family, 1000 + seed))
    train = C.encode(pair, C.seed_records(pair, s.prompts, seed, split="distill"))

    def acc(model) -> dict[str, float]:
        return {k: 100.0 * v for k, v in with_fine(C.accuracy(model, heldout, fams), fine).items()}

    def reliance(model) -> dict[str, float]:
        return with_fine(C.visual_reliance(model, heldout, fams), fine)

    metrics: dict[str, dict[str, float]] = {}
    for name, model in (("student_before", pair.student), ("teacher", pair.teacher)):
        metrics[name] = {**C.family_metrics("accuracy", acc(model)), **C.family_metrics("reliance", reliance(model))}
    curves: C.Curves = {}
    runs = {}
    for cond in CONDITIONS:
        dist = C.distiller(pair, distill_settings(s, MODES[cond]))
        log(f"  {cond}: {len(train)} prompts, {s.steps} steps")
        run = dist.run(train, seed=seed, kl_enc=kl_enc, eval_every=s.eval_every,
                       probes={"accuracy": acc, "reliance": reliance}, log=None, label=cond)
        runs[cond] = run
        final = {k: v[-1][1] for k, v in run.curves.items()}
        metrics[cond] = {k: v for k, v in final.items() if k.split("/")[0] in ("accuracy", "reliance", "reverse_kl")}
        log(f"  {cond}: fine accuracy {final['accuracy/fine']:.1f}%, reliance (fine) {final['reliance/fine']:.3f}, "
            f"reverse KL {final['reverse_kl/all']:.4f} ({run.seconds:.0f}s)")
        for name in CURVES:
            curves.setdefault(name, {})[cond] = list(run.curves[name])
    target = runs["opd"].final("accuracy/fine")
    for cond in CONDITIONS:
        metrics[cond]["steps_to_opd_final"] = C.steps_to_reach(runs[cond].curves["accuracy/fine"], target)
        before = metrics["student_before"]["reliance/fine"]
        metrics[cond]["reliance_gain/fine"] = metrics[cond]["reliance/fine"] - before
    return C.SeedResult(metrics=metrics, curves=curves,
                        notes={"prompts": len(train), **{f"seconds/{c}": r.seconds for c, r in runs.items()}})


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences VA-OPD − OPD (same seed, prompts and initial student)."""
    from jdelta.experiments.runner import fmt_interval, paired_difference

    lines = ["### Paired differences va_opd − opd (per seed, then mean [95% t-interval])", "",
             "| metric | va_opd − opd |", "|---|---|"]
    m = agg["metrics"]
    for metric in ("accuracy/fine", "accuracy/argmax", "accuracy/argmin", "accuracy/all", "reliance/fine",
                   "reliance/all", "reverse_kl/all", "steps_to_opd_final"):
        if metric in m.get("va_opd", {}) and metric in m.get("opd", {}):
            mean, lo, hi, n = paired_difference(agg, metric, "va_opd", "opd")
            lines.append(f"| {metric} | {fmt_interval(mean, lo, hi)} (n = {n}) |")
    return "\n".join(lines)
