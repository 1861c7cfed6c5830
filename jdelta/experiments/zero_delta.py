"""Experiment 1 (DeltaPrompts): the zero-Δ share of seed prompts, and whether Δ > 0 prompts teach.

Per seed ``k``: a pool of ``pool`` prompts from the world's ``seeds`` split (its k-th slice, the
families in turn) is scored with the pair (:func:`jdelta.delta_scoring.score_prompts`: ``n`` answers
per model at temperature 1, Δ = total variation between the answer-class distributions, zero-Δ
when the permutation test does not reject "one answer distribution" at 5%). The zero-Δ share per
family is recorded. Then the shipped student is distilled on-policy three times from the same
initial weights with the same seed and step budget, with METHODS.md's DeltaPrompts loss (reverse
KL, standard OPD):

* ``delta_pos``: the pool's Δ > 0 prompts;
* ``delta_zero``: the pool's Δ = 0 prompts;
* ``random``: as many prompts as ``delta_pos`` drawn uniformly from the whole pool.

Held-out accuracy (the ``heldout`` split's k-th slice, greedy exact match) per family and the
reverse KL(student || teacher) on held-out prompts are recorded every ``eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jdelta.config import check
from jdelta.experiments import common as C

CONDITIONS: tuple[str, ...] = ("delta_pos", "delta_zero", "random")
REFERENCE: tuple[str, ...] = ("student_before", "teacher", "pool")
CURVES: tuple[str, ...] = ("accuracy/all", "accuracy/trend", "accuracy/counting", "accuracy/argmax",
                           "accuracy/argmin", "reverse_kl/all")


@dataclasses.dataclass(frozen=True)
class Settings:
    """pool: seed prompts scored per seed (families in turn). n: answers per model per prompt for Δ.
    heldout_per_family: held-out records per family for accuracy. kl_per_family: held-out prompts per
    family for the reverse KL. steps / batch / rollouts / learning_rate / temperature / top_p /
    max_new_tokens: each distillation (see :class:`jdelta.experiments.common.DistillSettings`).
    eval_every: steps between evaluations. pair: a ``jdelta toy-models`` output (None: the shipped pair)."""

    pool: int = 128
    n: int = 16
    heldout_per_family: int = 100
    kl_per_family: int = 8
    steps: int = 200
    batch: int = 8
    rollouts: int = 4
    learning_rate: float = 1e-3
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 16
    eval_every: int = 25
    pair: str | None = None

    def __post_init__(self):
        for name in ("pool", "n", "heldout_per_family", "kl_per_family", "steps", "batch", "rollouts",
                     "max_new_tokens", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.n >= 2, "n", f"must be >= 2 (the zero-Δ test compares samples), got {self.n}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"pool": 8, "n": 4, "heldout_per_family": 4, "kl_per_family": 1, "steps": 2, "batch": 2,
               "rollouts": 2, "eval_every": 1}


def distill_settings(s: Settings) -> C.DistillSettings:
    return C.DistillSettings(mode="reverse_kl", steps=s.steps, batch=s.batch, rollouts=s.rollouts,
                             learning_rate=s.learning_rate, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens)


def describe(s: Settings) -> str:
    d = distill_settings(s)
    return f"""{__doc__.strip()}

Settings: pool {s.pool} prompts, n = {s.n} answers per model per prompt (temperature 1, up to
{s.max_new_tokens} tokens, permutation test with 199 permutations at 5%); held-out
{s.heldout_per_family} records per family for accuracy, {s.kl_per_family} prompts per family x
{s.rollouts} student samples for the reverse KL; each distillation: {s.steps} steps x {s.batch} prompts
x {s.rollouts} rollouts (temperature {s.temperature}, top-p {s.top_p}, up to {s.max_new_tokens} tokens),
AdamW lr {s.learning_rate} (betas 0.9/0.95, weight decay {d.weight_decay}, cosine with
{int(100 * d.warmup_fraction)}% warmup, clip 1.0), loss {d.mode} (token mean per response, mean over
responses); evaluation every {s.eval_every} steps. Pair: {s.pair or "the shipped toy pair"}.
Accuracies in %, reverse KL in nats per token. Reference rows: `student_before` / `teacher` (the
models as shipped, same held-out records), `pool` (the scored pool: zero-Δ share per family in %,
mean Δ).
"""


def _pct(values: dict[str, float]) -> dict[str, float]:
    return {k: 100.0 * v for k, v in values.items()}


def run_seed(s: Settings, seed: int, workdir: Path, log: C.Log) -> C.SeedResult:
    pair = C.load_pair(s.pair)
    fams = pair.families
    heldout = C.encode(pair, C.heldout_records(pair, s.heldout_per_family, seed))
    kl_enc = C.encode(pair, C.heldout_records(pair, s.kl_per_family, 1000 + seed))
    pool_records = C.seed_records(pair, s.pool, seed)
    log(f"  scoring {len(pool_records)} seed prompts (n = {s.n})")
    entries = C.score_delta(pair, pool_records, n=s.n, seed=seed, max_new_tokens=s.max_new_tokens)
    (workdir / "scores.json").write_text(C.dumps([{k: e.get(k) for k in ("id", "family", "delta", "zero_delta",
                                                                          "p_value", "teacher_accuracy",
                                                                          "student_accuracy")}
                                                 for e in entries]))
    share = C.zero_delta_share(entries, fams)
    metrics: dict[str, dict[str, float]] = {
        "pool": {**{f"zero_share/{f}": 100.0 * share[f]["share"] for f in [*fams, "all"]},
                 **{f"mean_delta/{f}": share[f]["mean_delta"] for f in [*fams, "all"]}},
        "student_before": C.family_metrics("accuracy", _pct(C.accuracy(pair.student, heldout, fams))),
        "teacher": C.family_metrics("accuracy", _pct(C.accuracy(pair.teacher, heldout, fams))),
    }
    zero = np.asarray([C.is_zero_delta(e) for e in entries])
    rng = np.random.default_rng([seed, 1])
    sets = {"delta_pos": np.flatnonzero(~zero), "delta_zero": np.flatnonzero(zero)}
    sets["random"] = np.sort(rng.choice(len(entries), size=len(sets["delta_pos"]), replace=False))
    enc = C.encode(pair, pool_records)
    dist = C.distiller(pair, distill_settings(s))
    curves: C.Curves = {}
    notes = {"pool": len(entries), "set_sizes": {c: int(len(r)) for c, r in sets.items()},
             "random_overlap_with_delta_pos": int(len(np.intersect1d(sets["random"], sets["delta_pos"])))}
    for cond in CONDITIONS:
        rows = sets[cond]
        comp = {f: 100.0 * float(np.mean([enc.families[i] == f for i in rows])) if len(rows) else float("nan")
                for f in fams}
        if len(rows) == 0:
            log(f"  {cond}: no prompts in this set; skipped")
            metrics[cond] = {"prompts": 0.0, **C.family_metrics("set_share", comp)}
            continue
        log(f"  {cond}: {len(rows)} prompts ({', '.join(f'{f} {v:.0f}%' for f, v in comp.items())})")
        run = dist.run(C.subset(enc, rows), seed=seed, heldout=heldout, kl_enc=kl_enc, eval_every=s.eval_every,
                       log=log, label=cond)
        final = {k: v[-1][1] for k, v in run.curves.items()}
        metrics[cond] = {
            "prompts": float(len(rows)), **C.family_metrics("set_share", comp),
            **{k: 100.0 * v for k, v in final.items() if k.startswith("accuracy/")},
            **{k: v for k, v in final.items() if k.startswith("reverse_kl/")},
        }
        for name in CURVES:
            scale = 100.0 if name.startswith("accuracy/") else 1.0
            curves.setdefault(name, {})[cond] = [(st, scale * v) for st, v in run.curves[name]]
        notes[f"seconds/{cond}"] = run.seconds
    return C.SeedResult(metrics=metrics, curves=curves, notes=notes)


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences (same seed, same initial student): Δ > 0 minus random and minus Δ = 0."""
    from jdelta.experiments.runner import fmt_interval, paired_difference

    lines = ["### Paired differences (per seed, then mean [95% t-interval])", "",
             "| metric | delta_pos − random | delta_pos − delta_zero | delta_pos − student_before |",
             "|---|---|---|---|"]
    m = agg["metrics"]
    for metric in ("accuracy/all", "accuracy/argmax", "accuracy/argmin", "accuracy/trend", "accuracy/counting",
                   "reverse_kl/all"):
        cells = []
        for other in ("random", "delta_zero", "student_before"):
            if metric in m.get("delta_pos", {}) and metric in m.get(other, {}):
                mean, lo, hi, _ = paired_difference(agg, metric, "delta_pos", other)
                cells.append(fmt_interval(mean, lo, hi))
            else:
                cells.append("—")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
