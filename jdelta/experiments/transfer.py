"""Experiment 3 (DeltaPrompts, transfer): Δ-prompts built with one pair distil another pair, without regeneration.

The prompts are chosen with the shipped pair (teacher + shipped student). The other pair is the
shipped teacher with a *different student*: a new toy Qwen3-VL of another size and seed, trained
from scratch in the experiment with :func:`jdelta.toy.train.train_model` (the shipped student's
recipe, see ``Settings``; trained once per process and shared by every seed). Per seed ``k``, a
pool of seed prompts (the ``seeds`` split's k-th slice) is scored twice:

* ``delta_transfer``: the Δ > 0 prompts under the *shipped* pair, used as they are for the new
  student (the transfer setting: no regeneration);
* ``delta_own``: the Δ > 0 prompts under the *new* pair (regenerated: the reference);
* ``random``: as many prompts as ``delta_transfer`` drawn at random from the pool.

The new student is distilled on-policy (standard OPD, reverse KL) towards the shipped teacher with
the same steps, prompts per step and rollouts on each set. Held-out accuracy per family.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np

from jdelta.config import check
from jdelta.experiments import common
from jdelta.experiments.common import SeedResult
from jdelta.experiments.toy_runs import RunSettings, opd_run, pick

CONDITIONS: tuple[str, ...] = ("before", "delta_transfer", "delta_own", "random")
_STUDENTS: dict = {}  # trained other students, by their settings (one training per process)


@dataclasses.dataclass(frozen=True)
class Settings:
    """pool: seed prompts scored per seed. n: answers per model per prompt for Δ. steps x batch
    prompts x rollouts, learning_rate, temperature: each OPD run. heldout_per_family, eval_every:
    the held-out accuracy curves. student_*: the other student (trained from scratch, seed
    ``student_seed``, on ``student_records`` training records, AdamW at lr 3e-3 with balanced batches
    of 32 and 20% pixelated rows: the shipped student's recipe)."""

    pool: int = 192
    n: int = 8
    steps: int = 100
    batch: int = 8
    rollouts: int = 4
    learning_rate: float = 1e-3
    temperature: float = 0.7
    heldout_per_family: int = 100
    eval_every: int = 25
    student_hidden: int = 48
    student_layers: int = 1
    student_vision_hidden: int = 16
    student_steps: int = 1200
    student_records: int = 3000
    student_seed: int = 11

    def __post_init__(self):
        for name in ("pool", "n", "steps", "batch", "rollouts", "heldout_per_family", "eval_every", "student_layers",
                     "student_steps", "student_records"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.student_hidden >= 16 and self.student_hidden % 16 == 0, "student_hidden",
              f"must be a multiple of 16, got {self.student_hidden}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"pool": 16, "n": 4, "steps": 3, "batch": 2, "rollouts": 2, "heldout_per_family": 4, "eval_every": 3,
               "student_hidden": 16, "student_steps": 20, "student_records": 64}


def describe(s: Settings) -> str:
    return "\n".join([
        "On-policy distillation (standard OPD: reverse KL, `jdelta.distill.on_policy`) of a *new* toy student "
        "towards the shipped toy teacher, on prompts whose Δ was measured with the *shipped* pair (no "
        "regeneration) vs prompts whose Δ was measured with the new pair vs random prompts, at an equal budget.", "",
        f"- the new student: toy Qwen3-VL, text {s.student_hidden} wide x {s.student_layers} layer(s) "
        f"(MLP {2 * s.student_hidden}), vision {s.student_vision_hidden} wide x 1 block; trained from scratch "
        f"with `jdelta.toy.train.train_model` for {s.student_steps} steps x 32 rows on {s.student_records} "
        f"`train`-split records (AdamW lr 3e-3, cosine, balanced batches, family weights 2/1/3/3, 20% "
        f"pixelated rows), init seed {s.student_seed}; the shipped student is 32 wide, 1 layer, vision 16, "
        "2,000 steps on 6,000 records, seed 1. Trained once and shared by all seeds. The teacher stays the "
        "shipped one (another teacher would cost ~14 CPU-minutes to train: not affordable here);",
        f"- pool: {s.pool} prompts of the `seeds` split per seed (seed k: its k-th slice), families in turn;",
        f"- Δ per prompt: {s.n} answers per model at temperature 1, total variation, Δ > 0 = permutation test "
        "(199 permutations) rejects at 5%; scored once with the shipped pair (`delta_transfer`) and once with "
        "the shipped teacher and the new student (`delta_own`);",
        "- `random`: as many prompts as `delta_transfer`, drawn without replacement from the pool;",
        f"- budget: {s.steps} steps x {s.batch} prompts x {s.rollouts} rollouts (temperature {s.temperature:g}, "
        f"up to 8 tokens) on each set; AdamW lr {s.learning_rate:g} (betas 0.9/0.98, 5 warmup steps then "
        "constant, no weight decay, clip 1.0);",
        f"- measured: greedy exact-match accuracy (%) of the new student on {s.heldout_per_family} held-out "
        f"records per family (the seed's slice) every {s.eval_every} steps; `before`: the new student untrained "
        "by distillation; `prompts`, `set_share/<family>` (%): the set; `overlap_own` (%): share of the set "
        "also in `delta_own`.",
    ])


def other_student(pair, s: Settings, log):
    """The new student (trained on first use, then reused): ``(model, seconds dict)``."""
    key = (s.student_hidden, s.student_layers, s.student_vision_hidden, s.student_steps, s.student_records,
           s.student_seed)
    if key in _STUDENTS:
        return _STUDENTS[key]
    from jdelta.toy import toy_info
    from jdelta.toy.train import ModelSize, TrainSettings, encode_records, model_config, train_model
    from jdelta.toy.world import world_records

    w = pair.world
    t0, c0 = time.perf_counter(), time.process_time()
    # The shipped student's recipe: the families it was trained on (world v2 leaves some out).
    families = toy_info(pair.root / "student").get("families") or list(w.names)
    records = [r for r in world_records(w, "train", s.student_records) if r.family in families]
    enc = encode_records(records, pair.tokenizer, width=w.width, height=w.height, length=64, with_pixelated=True)
    size = ModelSize(hidden=s.student_hidden, layers=s.student_layers, intermediate=2 * s.student_hidden,
                     vision_hidden=s.student_vision_hidden, vision_depth=1)
    settings = TrainSettings(steps=s.student_steps, batch_size=32, seed=s.student_seed, pixelated_fraction=0.2)
    weights = {f.family: f.weight for f in w.families}
    model, losses = train_model(model_config(pair.tokenizer, size), enc, settings, family_weights=weights,
                                log=lambda st, loss, sec: log(f"  new student step {st}/{s.student_steps} loss "
                                                              f"{loss:.3f} ({sec:.0f}s)"),
                                log_every=max(1, s.student_steps // 4))
    out = (model, {"student_train_wall_s": time.perf_counter() - t0, "student_train_cpu_s": time.process_time() - c0,
                   "student_final_loss": float(np.mean(losses[-50:]))})
    _STUDENTS[key] = out
    return out


def score_with(pair, student, records, *, n: int, seed: int) -> list[dict]:
    """Δ per prompt for the shipped teacher and ``student`` (as :func:`common.score_delta`)."""
    from jdelta.config import PromptConfig, SamplingConfig
    from jdelta.delta_scoring import DeltaTestConfig, score_prompts

    px = pair.world.pixels
    return score_prompts(pair.teacher, student, list(records), tokenizer=pair.tokenizer,
                         sampling=SamplingConfig(n=n, temperature=1.0, max_new_tokens=16, batch_size=16, seed=seed),
                         prompt=PromptConfig(min_pixels=px, max_pixels=px),
                         tests=DeltaTestConfig(num_permutations=199, num_posterior_draws=200), session=pair.session)


def run_seed(settings: Settings, seed: int, workdir: Path, log) -> SeedResult:
    s = settings
    pair = common.load_pair()
    names = pair.families
    student, train_notes = other_student(pair, s, log)
    heldout = common.encode(pair, common.heldout_records(pair, s.heldout_per_family, seed))
    pool = common.seed_records(pair, s.pool, seed)
    log(f"seed {seed}: scoring {len(pool)} prompts with the shipped pair and with the new pair (n = {s.n})")
    shipped = common.score_delta(pair, pool, n=s.n, seed=seed)
    own = score_with(pair, student, pool, n=s.n, seed=seed)
    transfer = [i for i, e in enumerate(shipped) if not common.is_zero_delta(e)]
    own_pos = [i for i, e in enumerate(own) if e.get("status") == "scored" and not common.is_zero_delta(e)]
    rng = np.random.default_rng(2000 + seed)
    sets = {"delta_transfer": transfer, "delta_own": own_pos,
            "random": sorted(pick(rng, list(range(len(pool))), len(transfer)))}

    def evaluate(model):
        return {f"accuracy/{k}": 100 * v for k, v in common.accuracy(model, heldout, names).items()}

    metrics = {"before": evaluate(student)}
    notes: dict = {**train_notes, "teacher_heldout": evaluate(pair.teacher),
                   "shipped_student_heldout": evaluate(pair.student)}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    rs = RunSettings(steps=s.steps, batch=s.batch, lr=s.learning_rate, rollouts=s.rollouts,
                     temperature=s.temperature, eval_every=s.eval_every)
    for cond, idx in sets.items():
        fam = Counter(pool[i].family for i in idx)
        log(f"seed {seed}: {cond}: {len(idx)} prompts ({dict(fam)})")
        set_metrics = {"prompts": float(len(idx)),
                       **{f"set_share/{f}": 100 * fam.get(f, 0) / max(len(idx), 1) for f in names},
                       "overlap_own": 100 * len(set(idx) & set(own_pos)) / max(len(idx), 1)}
        if not idx:
            metrics[cond] = set_metrics
            continue
        _, cv = opd_run(pair, [pool[i] for i in idx], rs, seed=seed, student=student, evaluate=evaluate, log=log,
                        name=f"seed {seed} {cond}")
        metrics[cond] = {**{k: pts[-1][1] for k, pts in cv.items() if k.startswith("accuracy/")}, **set_metrics}
        for k, pts in cv.items():
            if k.startswith("accuracy/") or k == "loss":
                curves.setdefault(k if k != "loss" else "train/loss", {})[cond] = pts
        notes[f"{cond}_families"] = dict(fam)
    return SeedResult(metrics=metrics, curves=curves, notes=notes)


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences (same seed, same initial new student)."""
    from jdelta.experiments.runner import paired_table

    return paired_table(agg, (("delta_transfer", "random"), ("delta_own", "random"), ("delta_transfer", "before")))


__all__ = ["CONDITIONS", "SMOKE", "Settings", "describe", "run_seed", "summarize"]
