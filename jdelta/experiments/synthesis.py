"""Experiment 2 (DeltaPrompts): synthesized high-Δ prompts vs as many seed prompts, at three data sizes.

Per seed ``k``, jdelta's synthesis library runs in-process at toy scale on the shipped pair:

1. **seeds**: ``seeds`` prompts of the world's ``seeds`` split (its k-th slice, families in turn),
   scored (:func:`jdelta.delta_scoring.score_prompts`);
2. **failure modes** (:func:`jdelta.synth.failure_modes.failure_modes`, the pipeline's defaults:
   group by family, ``exact`` zero-Δ test, targets ``student_wrong_teacher_right`` and
   ``student_inconsistent``) -> the targeted modes;
3. **targeted synthesis with the procedural generator** (:mod:`jdelta.synth.steered`): steering
   weights from the targeted modes' Δ mass (floor ``floor``), restricted to the world's families at
   its difficulty (the toy models know nothing else), ``candidates`` draws; each candidate is a new
   generator record of the drawn family on the world's image kind, from the ``distill`` split (its
   k-th slice: never a seed, held-out or training image);
4. **divergence screening** (:func:`jdelta.synth.screen.screen`): the candidates are scored with
   the pair and kept when Δ > ``tau``, the teacher's sampled accuracy >= ``min_teacher_accuracy``,
   not a duplicate.

The student is then distilled on-policy (standard OPD: reverse KL,
:class:`jdelta.experiments.common.Distiller`) for the same steps on ``sizes`` prompts of the
screened set (``synth_*``) or of the seed prompts (``seed_*``; both nested subsets in a seeded
random order, the same size per pair of conditions). Held-out accuracy per family.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from jdelta.config import check
from jdelta.experiments import common as C

SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
CONDITIONS: tuple[str, ...] = ("before", *(f"{k}_{n}" for k in ("synth", "seed") for n in SIZE_NAMES))


@dataclasses.dataclass(frozen=True)
class Settings:
    """seeds: seed prompts scored per seed. n: answers per model per prompt for Δ. candidates:
    steered procedural candidates. floor, tau, min_teacher_accuracy: steering floor and screening
    (the pipeline's defaults). sizes: the three data sizes (prompts). steps / batch / rollouts /
    learning_rate / temperature / top_p: each distillation (:class:`common.DistillSettings`).
    heldout_per_family, eval_every: the held-out curves."""

    seeds: int = 128
    n: int = 8
    candidates: int = 256
    floor: float = 0.05
    tau: float = 0.0
    min_teacher_accuracy: float = 0.5
    sizes: tuple[int, int, int] = (16, 48, 128)
    steps: int = 100
    batch: int = 8
    rollouts: int = 4
    learning_rate: float = 1e-3
    temperature: float = 0.7
    top_p: float = 0.95
    heldout_per_family: int = 100
    eval_every: int = 25

    def __post_init__(self):
        for name in ("seeds", "n", "candidates", "steps", "batch", "rollouts", "heldout_per_family", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(len(self.sizes) == 3 and all(int(v) >= 1 for v in self.sizes) and list(self.sizes) == sorted(self.sizes),
              "sizes", f"must be three increasing sizes >= 1, got {self.sizes}")
        check(max(self.sizes) <= self.seeds, "sizes", f"the largest size must be <= seeds ({self.seeds})")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"seeds": 16, "n": 4, "candidates": 16, "sizes": (2, 4, 8), "steps": 2, "batch": 2, "rollouts": 2,
               "heldout_per_family": 4, "eval_every": 2}


def describe(s: Settings) -> str:
    return "\n".join([
        "On-policy distillation (standard OPD: reverse KL) of the shipped toy student on the synthesis "
        "library's screened high-Δ prompts vs as many seed prompts, at three data sizes and an equal step "
        "budget. The synthesis runs in-process with `jdelta.synth` on the shipped pair.", "",
        f"- seeds: {s.seeds} prompts of the `seeds` split per seed (seed k: its k-th slice), scored with "
        f"{s.n} answers per model at temperature 1 (Δ = total variation);",
        "- failure modes: `jdelta.synth.failure_modes` (group by family, zero-Δ test `exact`, targets "
        "`student_wrong_teacher_right` and `student_inconsistent`: the pipeline's defaults);",
        f"- targeted synthesis: `jdelta.synth.steered.steering_weights` (floor {s.floor:g}) over the targeted "
        f"modes' Δ mass, restricted to the world's four families at difficulty 1 (toy adaptation: the generator's "
        f"other families and levels are unknown to the toy models); {s.candidates} draws "
        "(`steered_plan`), each a new generator record of that family on the world's image kind, from the "
        "`distill` split (seed k: its k-th slice);",
        f"- screening: `jdelta.synth.screen.screen`: candidates scored like the seeds, kept when Δ > {s.tau:g}, "
        f"teacher sampled accuracy >= {s.min_teacher_accuracy:g}, no duplicate (the pipeline's defaults);",
        f"- data sizes {', '.join(str(v) for v in s.sizes)} (`small`, `medium`, `large`): nested subsets, in a "
        "seeded random order, of the screened set (`synth_*`) or of the seed prompts (`seed_*`); when fewer "
        "were kept than a size, both conditions of that size use the kept count (`prompts`);",
        f"- each distillation: {s.steps} steps x {s.batch} prompts x {s.rollouts} rollouts (temperature "
        f"{s.temperature:g}, top-p {s.top_p:g}, up to 8 tokens), AdamW lr {s.learning_rate:g} (betas 0.9/0.95, "
        "cosine, 5% warmup, no weight decay, clip 1.0: `common.DistillSettings`), from the same student;",
        f"- measured: greedy exact-match held-out accuracy (%) on {s.heldout_per_family} records per family "
        f"(the seed's slice) every {s.eval_every} steps; `set_share/<family>` (%): the set's composition; "
        "`mean_delta`: the set's mean Δ under the pair.",
    ])


def world_weights(modes, world, floor: float) -> dict[str, float]:
    """The library's steering weights restricted to the world's families at their difficulty,
    renormalised (``{"family/level": w}``); uniform when nothing is targeted."""
    from jdelta.synth.steered import steering_weights

    levels = sorted({f.difficulty for f in world.families})
    ids = {i: world.spec(m["group"]).difficulty for m in modes if m["group"] in world.names for i in m["ids"]}
    raw = steering_weights(modes, ids, floor=floor, levels=levels)["weights"]
    keep = {f"{f.family}/{f.difficulty}": raw.get(f"{f.family}/{f.difficulty}", 0.0) for f in world.families}
    total = sum(keep.values())
    if total <= 0:
        return {k: 1.0 / len(keep) for k in keep}
    return {k: v / total for k, v in keep.items()}


def synthesize(pair, seed_entries, s: Settings, seed: int, log) -> tuple[list, list[dict], dict]:
    """Failure modes -> steered candidates -> screening. Returns ``(kept records, their entries, notes)``."""
    from jdelta.data.charts import GeneratorConfig, generate_record
    from jdelta.synth.failure_modes import failure_modes, target_modes
    from jdelta.synth.screen import screen
    from jdelta.synth.steered import steered_plan
    from jdelta.toy.world import split_seed

    world = pair.world
    analysis = failure_modes(seed_entries)
    targets = target_modes(analysis)
    weights = world_weights(targets, world, s.floor)
    plan = steered_plan(s.candidates, weights, seed)
    gen_seed = split_seed(world, "distill")
    cands = []
    for i, (fam, _level) in enumerate(plan):
        spec = world.spec(fam)
        cfg = GeneratorConfig(width=world.width, height=world.height, difficulty=spec.difficulty)
        rec = generate_record(seed * s.candidates + i, gen_seed, fam, config=cfg, kind=spec.kind)
        rec.id = f"syn-{seed}-{i:05d}"
        cands.append(rec)
    log(f"  targeted modes: {[(m['group'], m['outcome'], round(m['delta_mass'], 2)) for m in targets]}; "
        f"weights {', '.join(f'{k} {v:.2f}' for k, v in weights.items())}; scoring {len(cands)} candidates")
    entries = C.score_delta(pair, cands, n=s.n, seed=10_000 + seed)
    kept, counts = screen([c.to_json() for c in cands], entries, tau=s.tau, min_teacher_accuracy=s.min_teacher_accuracy)
    by_id = {c.id: (c, e) for c, e in zip(cands, entries, strict=True)}
    recs = [by_id[k["id"]][0] for k in kept]
    notes = {"targeted_modes": [{k: m[k] for k in ("group", "outcome", "prompts", "delta_mass")} for m in targets],
             "weights": weights, "candidates": len(cands), "candidate_families": dict(Counter(c.family for c in cands)),
             "screen": counts}
    return recs, [by_id[r.id][1] for r in recs], notes


def run_seed(s: Settings, seed: int, workdir: Path, log) -> C.SeedResult:
    pair = C.load_pair()
    fams = pair.families
    heldout = C.encode(pair, C.heldout_records(pair, s.heldout_per_family, seed))
    seeds = C.seed_records(pair, s.seeds, seed)
    log(f"seed {seed}: scoring {len(seeds)} seed prompts (n = {s.n})")
    seed_entries = C.score_delta(pair, seeds, n=s.n, seed=seed)
    synth, synth_entries, notes = synthesize(pair, seed_entries, s, seed, log)
    log(f"seed {seed}: {len(synth)} screened prompts kept ({dict(Counter(r.family for r in synth))})")
    rng = np.random.default_rng([seed, 2])
    order = {"synth": rng.permutation(len(synth)), "seed": rng.permutation(len(seeds))}
    pools = {"synth": (synth, synth_entries), "seed": (seeds, seed_entries)}
    enc = {k: C.encode(pair, recs) for k, (recs, _) in pools.items() if recs}
    dist = C.distiller(pair, C.DistillSettings(mode="reverse_kl", steps=s.steps, batch=s.batch, rollouts=s.rollouts,
                                               learning_rate=s.learning_rate, temperature=s.temperature,
                                               top_p=s.top_p, max_new_tokens=16))
    metrics = {"before": C.family_metrics("accuracy", {k: 100 * v for k, v in
                                                       C.accuracy(pair.student, heldout, fams).items()})}
    curves: C.Curves = {}
    for size_name, size in zip(SIZE_NAMES, s.sizes, strict=True):
        n_use = min(int(size), len(synth))
        for kind in ("synth", "seed"):
            cond = f"{kind}_{size_name}"
            if n_use == 0:
                metrics[cond] = {"prompts": 0.0}
                continue
            rows = np.sort(order[kind][:n_use])
            recs, ents = pools[kind]
            comp = Counter(recs[i].family for i in rows)
            log(f"seed {seed}: {cond}: {n_use} prompts ({dict(comp)})")
            run = dist.run(C.subset(enc[kind], rows), seed=seed, heldout=heldout, eval_every=s.eval_every, log=log,
                           label=cond)
            final = {k: 100 * v[-1][1] for k, v in run.curves.items() if k.startswith("accuracy/")}
            metrics[cond] = {**final, "prompts": float(n_use),
                             "mean_delta": float(np.mean([ents[i]["delta"]["tv"] for i in rows])),
                             **{f"set_share/{f}": 100 * comp.get(f, 0) / n_use for f in fams}}
            for k, pts in run.curves.items():
                if k.startswith("accuracy/"):
                    curves.setdefault(k, {})[cond] = [(st, 100 * v) for st, v in pts]
            curves.setdefault("train/loss", {})[cond] = run.curves["train/loss"]
    notes["kept"] = len(synth)
    notes["kept_families"] = dict(Counter(r.family for r in synth))
    return C.SeedResult(metrics=metrics, curves=curves, notes=notes)


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences synth − seed at each size (same seed, same initial student)."""
    from jdelta.experiments.runner import paired_table

    return paired_table(agg, [(f"synth_{n}", f"seed_{n}") for n in SIZE_NAMES],
                        title="Paired differences synth − seed",
                        labels=[f"{n} ({v})" for n, v in zip(SIZE_NAMES, s.sizes, strict=True)])


__all__ = ["CONDITIONS", "SMOKE", "Settings", "describe", "run_seed", "summarize", "synthesize", "world_weights"]
