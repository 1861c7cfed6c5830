"""Experiment 4 (DeltaPrompts, off-policy): SFT of the student on teacher outputs for Δ > 0 prompts vs random prompts.

Per seed: a pool of seed prompts (the world's ``seeds`` split, the seed's own slice, families in
turn) is scored with the shipped pair (Δ per prompt, ``n`` answers per model, permutation test at
5%). The Δ > 0 set is every prompt whose Δ is significantly non-zero; the random set has as many
prompts drawn at random from the whole pool. The teacher samples ``samples`` answers per prompt
(temperature 1: its real outputs, mistakes included) and the student is fine-tuned on them
(:mod:`jdelta.distill.sft`, no teacher in the loop) for the same number of steps and rows on each
set. Measured: held-out greedy accuracy per family (the ``heldout`` split, its own slice per seed).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from jdelta.config import check
from jdelta.experiments import common
from jdelta.experiments.common import SeedResult
from jdelta.experiments.toy_runs import RunSettings, pick, sft_run, teacher_samples

CONDITIONS: tuple[str, ...] = ("before", "delta", "random")


@dataclasses.dataclass(frozen=True)
class Settings:
    """pool: seed prompts scored per seed. n: answers per model per prompt for Δ. samples: teacher
    answers per prompt to fine-tune on. steps x batch: SFT rows (equal for both sets). learning_rate:
    AdamW (constant after 5 warmup steps, no weight decay, clip 1.0). heldout_per_family: held-out
    records per family. eval_every: steps between held-out evaluations (the curves)."""

    pool: int = 384
    n: int = 8
    samples: int = 8
    steps: int = 150
    batch: int = 16
    learning_rate: float = 1e-3
    heldout_per_family: int = 100
    eval_every: int = 25

    def __post_init__(self):
        for name in ("pool", "n", "samples", "steps", "batch", "heldout_per_family", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"pool": 16, "n": 4, "samples": 2, "steps": 4, "batch": 4, "heldout_per_family": 4, "eval_every": 2}


def describe(s: Settings) -> str:
    return "\n".join([
        "SFT of the shipped toy student on the shipped toy teacher's sampled answers (docs/toy_world.md), "
        "on the Δ > 0 seed prompts vs as many random seed prompts, at an equal budget.", "",
        f"- pool: {s.pool} prompts of the world's `seeds` split per seed (seed k: records k·{s.pool} ..), "
        "families in turn (trend, counting, argmax, argmin);",
        f"- Δ per prompt: {s.n} answers per model at temperature 1, total variation; Δ > 0 = the "
        "permutation test (199 permutations) rejects equal answer distributions at 5%;",
        "- random set: as many prompts as the Δ > 0 set, drawn without replacement from the whole pool;",
        f"- SFT data: {s.samples} teacher answers per prompt (temperature 1, up to 8 tokens), the student "
        "trained on them with `jdelta.distill.sft` (token-mean NLL of the answer and `<|im_end|>`);",
        f"- budget: {s.steps} steps x {s.batch} rows on each set; AdamW lr {s.learning_rate:g} (betas 0.9/0.98, "
        "5 warmup steps then constant, no weight decay, clip 1.0);",
        f"- measured: greedy exact-match accuracy (%) on {s.heldout_per_family} held-out records per family "
        f"(the `heldout` split, the seed's own slice) every {s.eval_every} steps; `before` is the student "
        "untrained; `prompts` the set size, `teacher_correct` the share (%) of the teacher's training answers "
        "that are right, `share/<family>` the set's composition (%).",
    ])


def answers_correct(pair, records, samples) -> np.ndarray:
    """Whether each ``(record index, response ids)`` decodes (stop token dropped) to the record's answer."""
    stop = set(pair.stop_ids)
    out = []
    for ri, ids in samples:
        text = pair.tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()
        out.append(text == (records[ri].answer or "").strip())
    return np.asarray(out, bool)


def run_seed(settings: Settings, seed: int, workdir: Path, log) -> SeedResult:
    s = settings
    pair = common.load_pair()
    names = pair.families
    heldout = common.encode(pair, common.heldout_records(pair, s.heldout_per_family, seed))
    pool = common.seed_records(pair, s.pool, seed)
    log(f"seed {seed}: scoring {len(pool)} prompts (n = {s.n})")
    entries = common.score_delta(pair, pool, n=s.n, seed=seed)
    pos = [i for i, e in enumerate(entries) if not common.is_zero_delta(e)]
    if not pos:
        raise RuntimeError(f"seed {seed}: no prompt of the {len(pool)} has a significantly non-zero Δ")
    rng = np.random.default_rng(1000 + seed)
    sets = {"delta": pos, "random": sorted(pick(rng, list(range(len(pool))), len(pos)))}
    log(f"seed {seed}: {len(pos)} Δ > 0 prompts ({dict(Counter(pool[i].family for i in pos))}); sampling the teacher")
    samples = teacher_samples(pair, pool, n=s.samples, seed=seed)
    ok = answers_correct(pair, pool, samples)
    rs = RunSettings(steps=s.steps, batch=s.batch, lr=s.learning_rate, eval_every=s.eval_every)

    def evaluate(model):
        return {f"accuracy/{k}": 100 * v for k, v in common.accuracy(model, heldout, names).items()}

    before = evaluate(pair.student)
    metrics = {"before": {**before, "prompts": float("nan"), "teacher_correct": float("nan")}}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    notes: dict = {"delta_prompts": len(pos), "overlap": len(set(sets["delta"]) & set(sets["random"]))}
    for cond, idx in sets.items():
        keep = set(idx)
        rows = [x for x in samples if x[0] in keep]
        correct = ok[[i for i, x in enumerate(samples) if x[0] in keep]]
        _, cv = sft_run(pair, pool, rows, rs, seed=seed, evaluate=evaluate, log=log, name=f"seed {seed} {cond}")
        final = {k: pts[-1][1] for k, pts in cv.items() if k.startswith("accuracy/")}
        fam = Counter(pool[i].family for i in idx)
        metrics[cond] = {**final, "prompts": float(len(idx)), "teacher_correct": 100 * float(correct.mean()),
                         **{f"share/{f}": 100 * fam.get(f, 0) / len(idx) for f in names}}
        for k, pts in cv.items():
            if k.startswith("accuracy/") or k == "loss":
                curves.setdefault(k if k != "loss" else "train/loss", {})[cond] = pts
        notes[f"{cond}_families"] = dict(fam)
    for f in names:
        metrics["before"][f"share/{f}"] = float("nan")
    return SeedResult(metrics=metrics, curves=curves, notes=notes)


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences (same seed, same initial student, same teacher samples per prompt)."""
    from jdelta.experiments.runner import paired_table

    return paired_table(agg, (("delta", "random"), ("delta", "before"), ("random", "before")))


__all__ = ["CONDITIONS", "SMOKE", "Settings", "describe", "run_seed", "summarize"]
