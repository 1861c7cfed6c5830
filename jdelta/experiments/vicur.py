"""Experiment 6 (ViCuR): full vs hint only vs module only vs answer-privileged self-distillation vs plain OPD.

Per seed ``k``, the shipped student is trained from the same weights, on the same prompts (the
world's ``distill`` split, its k-th slice, families in turn), for the same steps x prompts x
rollouts, five ways (:mod:`jdelta.distill.vicur`, :mod:`jdelta.models.cue_recovery`; METHODS.md):

* ``full``: ViCuR loss; teacher = the shipped teacher given the question plus ``[Hint]: ...`` (the
  generator's description of the visual evidence: every bar's label and value, the line's end
  points, the receipt's items; never the answer itself); the student carries the cue-recovery module;
* ``hint_only``: the same without the module;
* ``module_only``: the module, the teacher given the plain question;
* ``answer_self``: answer-privileged self-distillation (ViCuR's baseline): teacher = the student's
  own initial weights given the question plus ``[Answer]: ...``, no module;
* ``opd``: plain on-policy distillation (reverse KL over the vocabulary) towards the shipped
  teacher on the plain question.

The first three use the stronger-teacher mode (the shipped teacher): the toy student given a hint is
not a usable self-teacher (it was never trained with hints; measured and reported as
``student_hint``). References: ``teacher_hint`` / ``student_hint``: held-out accuracy of the
teacher / the untrained student when the hint is appended to the question (does the hint help
at all?).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jdelta.config import check
from jdelta.experiments import common as C
from jdelta.experiments.toy_runs import RunSettings, opd_run

RUNS: dict[str, dict] = {
    "full": {"mode": "vicur", "privileged": "hint", "cue_recovery": True, "teacher": "shipped"},
    "hint_only": {"mode": "vicur", "privileged": "hint", "cue_recovery": False, "teacher": "shipped"},
    "module_only": {"mode": "vicur", "privileged": "none", "cue_recovery": True, "teacher": "shipped"},
    "answer_self": {"mode": "vicur", "privileged": "answer", "cue_recovery": False, "teacher": "self"},
    "opd": {"mode": "reverse_kl", "privileged": "none", "cue_recovery": False, "teacher": "shipped"},
}
CONDITIONS: tuple[str, ...] = ("before", *RUNS, "teacher_hint", "student_hint")


@dataclasses.dataclass(frozen=True)
class Settings:
    """prompts: training prompts per seed. steps x batch prompts x rollouts: every run (ViCuR: one
    rollout per prompt, METHODS.md); learning_rate, temperature: every run. heldout_per_family,
    eval_every: the held-out curves. pair: a ``jdelta toy-models`` output or a shipped pair's name (default ``v2``, built
    for ViCuR by ``configs/toy_v2.yaml``: a hint-trained teacher, a two-layer student; None: v1)."""

    prompts: int = 128
    steps: int = 100
    batch: int = 16
    rollouts: int = 1
    learning_rate: float = 1e-3
    temperature: float = 1.0
    heldout_per_family: int = 100
    eval_every: int = 25
    pair: str | None = "v2"

    def __post_init__(self):
        for name in ("prompts", "steps", "batch", "rollouts", "heldout_per_family", "eval_every"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


SMOKE: dict = {"prompts": 8, "steps": 2, "batch": 2, "heldout_per_family": 4, "eval_every": 2}


def describe(s: Settings) -> str:
    return "\n".join([
        f"ViCuR's ablation at toy scale: the student of pair {s.pair or 'v1'} trained five ways from "
        "the same weights on the same prompts at an equal budget (`jdelta.distill.vicur`, "
        "`jdelta.models.cue_recovery`); `shipped teacher` below is that pair's teacher.", "",
        "| condition | loss | teacher | teacher's prompt adds | cue-recovery module |", "|---|---|---|---|---|",
        *(f"| `{c}` | {'ViCuR (clipped sampled-token k1 advantage)' if r['mode'] == 'vicur' else 'reverse KL (OPD)'} | "
          f"{'shipped teacher' if r['teacher'] == 'shipped' else 'the student itself (initial weights)'} | "
          f"{ {'hint': '`[Hint]: ...`', 'answer': '`[Answer]: ...`', 'none': 'nothing'}[r['privileged']]} | "
          f"{'yes' if r['cue_recovery'] else 'no'} |" for c, r in RUNS.items()),
        "",
        f"- prompts: {s.prompts} of the `distill` split per seed (seed k: its k-th slice), families in turn; "
        "hints are the pair's world's (`cues.hint`: world v1, the generator's evidence: bars' labels and values, "
        "the line's end points, the receipt's items; world v2's `hints=evidence`: the bar labels from left to "
        "right, the receipt's items, the line's point labels), never which item is the answer;",
        f"- budget: {s.steps} steps x {s.batch} prompts x {s.rollouts} rollout(s) (temperature {s.temperature:g}, "
        f"up to 16 tokens) for every condition; AdamW lr {s.learning_rate:g} (betas 0.9/0.98, 5 warmup steps then "
        "constant, no weight decay, clip 1.0); ViCuR's clip 0.2/0.2, dual clip 3, k1 clamp 10 (METHODS.md); "
        "module: after decoder layer 0 (read by the student's later layers, if it has any), zero-output init;",
        f"- measured: greedy exact-match held-out accuracy (%) on {s.heldout_per_family} records per family "
        f"(the seed's slice) every {s.eval_every} steps, plain question, no hint (the module, when present, "
        "runs at inference); `teacher_hint` / `student_hint`: the teacher's / untrained student's accuracy "
        "with the hint appended (reference only).",
    ])


def hinted(records):
    """The records with the ViCuR hint appended to the question (as the privileged prompt)."""
    from jdelta.data.chat import with_hint

    return [dataclasses.replace(r, question=with_hint(r.question, r.cues.hint if r.cues else None)) for r in records]


def run_seed(s: Settings, seed: int, workdir: Path, log) -> C.SeedResult:
    from jdelta.toy.train import encode_records

    pair = C.load_pair(s.pair)
    fams = pair.families
    held_recs = C.heldout_records(pair, s.heldout_per_family, seed)
    heldout = C.encode(pair, held_recs)
    w = pair.world
    held_hint = encode_records(hinted(held_recs), pair.tokenizer, width=w.width, height=w.height, length=128)
    train = C.seed_records(pair, s.prompts, seed, split="distill")

    def evaluate(model):
        return {f"accuracy/{k}": 100 * v for k, v in C.accuracy(model, heldout, fams).items()}

    metrics = {"before": evaluate(pair.student),
               "teacher_hint": {f"accuracy/{k}": 100 * v for k, v in C.accuracy(pair.teacher, held_hint, fams).items()},
               "student_hint": {f"accuracy/{k}": 100 * v for k, v in C.accuracy(pair.student, held_hint, fams).items()}}
    curves: C.Curves = {}
    rs = RunSettings(steps=s.steps, batch=s.batch, lr=s.learning_rate, rollouts=s.rollouts,
                     temperature=s.temperature, eval_every=s.eval_every)
    for cond, r in RUNS.items():
        log(f"seed {seed}: {cond}")
        _, cv = opd_run(pair, train, rs, seed=seed, mode=r["mode"], privileged=r["privileged"],
                        cue_recovery=r["cue_recovery"], teacher=pair.teacher if r["teacher"] == "shipped" else None,
                        evaluate=evaluate, log=log, name=f"seed {seed} {cond}")
        metrics[cond] = {k: pts[-1][1] for k, pts in cv.items() if k.startswith("accuracy/")}
        for k, pts in cv.items():
            if k.startswith("accuracy/") or k == "loss":
                curves.setdefault(k if k != "loss" else "train/loss", {})[cond] = pts
    return C.SeedResult(metrics=metrics, curves=curves, notes={"prompts": len(train)})


def summarize(s: Settings, agg: dict) -> str:
    """Paired differences against plain OPD and full ViCuR against its ablations."""
    from jdelta.experiments.runner import paired_table

    return paired_table(agg, (("full", "opd"), ("full", "hint_only"), ("full", "module_only"), ("full", "answer_self"),
                              ("full", "before")))


__all__ = ["CONDITIONS", "RUNS", "SMOKE", "Settings", "describe", "hinted", "run_seed", "summarize"]
