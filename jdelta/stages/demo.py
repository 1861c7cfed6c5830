"""End-to-end CPU demo on the trained toy pair: accuracies, Δ by family, distillation on Δ > 0 vs random prompts.

``jdelta demo --out DIR`` runs the DeltaPrompts flow in a few minutes on CPU, on the small
Qwen3-VL teacher and student that ship with jdelta, trained from scratch on the chart world
(``jdelta toy-models``; ``docs/toy_world.md``). Nothing is trained before the distillation and
nothing is downloaded.

1. seeds (the world's ``seeds`` split: charts, line charts, receipts with exact answers) ->
   ``DIR/seeds/records.jsonl``; a held-out set (the ``heldout`` split, never trained on);
2. held-out accuracy of both models per family (greedy, exact match, 95% Wilson intervals);
3. the ``score`` stage on the seeds -> ``DIR/score``: n answers per model per prompt, Δ per prompt,
   the zero-Δ share with its interval, Δ by family;
4. two equal-budget distillations of the student (the ``distill`` stage, ``distill_mode``): on the
   seeds whose Δ is significantly non-zero (the permutation test rejects "one answer
   distribution") and on as many seeds drawn at random -> ``DIR/distill-delta``,
   ``DIR/distill-random`` (HF exports in ``DIR/models/``);
5. the student's held-out accuracy before and after each -> ``DIR/summary.md``, ``summary.json``,
   ``accuracy.png``.

A rerun resumes every step; other settings in the same directory are refused (``overwrite``
starts over). ``pair`` points at another ``jdelta toy-models`` output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jdelta.config import build, check, to_dict
from jdelta.runs import RunDir, read_jsonl
from jdelta.stages import distill as distill_stage
from jdelta.stages import score as score_stage

ARMS = ("delta", "random")  # distillation prompt sets, equal budget


@dataclasses.dataclass(frozen=True)
class Config:
    """out: demo directory. pair: a ``jdelta toy-models`` output directory (None: the shipped pair).
    n_prompts: seed prompts (the world's families in turn). heldout_per_family: held-out records per
    family. n: samples per model per prompt. distill_steps: steps of each distillation (0: skip).
    distill_batch: prompts per step. distill_mode: the loss."""

    out: str
    pair: str | None = None
    n_prompts: int = 64
    heldout_per_family: int = 50
    seed: int = 0
    n: int = 8
    max_new_tokens: int = 16
    shard_size: int = 32
    batch_size: int = 16
    distill_steps: int = 16
    distill_batch: int = 4
    distill_mode: Literal["va_opd", "reverse_kl"] = "va_opd"
    learning_rate: float = 1e-3
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("n_prompts", "heldout_per_family", "n", "max_new_tokens", "shard_size", "batch_size",
                     "distill_batch"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.distill_steps >= 0, "distill_steps", f"must be >= 0, got {self.distill_steps}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")


def load_world(teacher_dir: Path):
    from jdelta.toy import toy_info
    from jdelta.toy.world import WorldConfig

    return build(WorldConfig, toy_info(teacher_dir)["world"])


def score_config(cfg: Config, teacher: Path, student: Path, world) -> score_stage.Config:
    """The ``score`` stage's config for the pair on the demo's seeds (images kept at their size)."""
    root = Path(cfg.out)
    return build(score_stage.Config, {
        "teacher": str(teacher), "student": str(student),
        "prompts": str(root / "seeds" / "records.jsonl"), "out": str(root / "score"), "shard_size": cfg.shard_size,
        "sampling": {"n": cfg.n, "temperature": 1.0, "max_new_tokens": cfg.max_new_tokens,
                     "batch_size": cfg.batch_size, "seed": cfg.seed},
        "prompt": {"max_pixels": world.pixels, "min_pixels": world.pixels},
        "delta": {"num_permutations": 199, "num_posterior_draws": 400},
        "progress": cfg.progress,
    })


def distill_config(cfg: Config, arm: str, prompts: Path, teacher: Path, student: Path, world) -> distill_stage.Config:
    """The ``distill`` stage's config of one arm (records -> on-policy -> Orbax -> HF export)."""
    root = Path(cfg.out)
    steps = cfg.distill_steps
    return build(distill_stage.Config, {
        "run_dir": str(root / f"distill-{arm}"),
        "method": "on_policy",
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {
            "source": "records", "path": str(prompts), "tokenizer": str(teacher), "batch_size": cfg.distill_batch,
            "seed": cfg.seed,
            "pipeline": {"image": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                                   "max_pixels": world.pixels, "min_pixels": world.pixels},
                         "seq_buckets": [64, 128]},
        },
        "train": {"steps": steps, "log_every": 1, "seed": cfg.seed},
        "optimizer": {"learning_rate": cfg.learning_rate, "weight_decay": 0.0, "warmup_fraction": 0.1},
        "checkpoint": {"save_every": steps, "keep": 1, "async_save": False},
        "distill": {"mode": cfg.distill_mode, "rollouts_per_prompt": 4, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": cfg.max_new_tokens, "chunk_size": 16, "completion_bucket": 16,
                    "prompt_bucket": 64, "seed": cfg.seed},
        "export": {"path": str(root / "models" / f"student-{arm}")},
        "progress": cfg.progress,
    })


def _write_records(path: Path, records) -> None:
    from jdelta.data.records import write_jsonl

    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_jsonl(records, tmp)
    os.replace(tmp, path)


def heldout_accuracy(model_dir: Path, heldout, world) -> dict[str, dict]:
    """Greedy held-out accuracy per family (and ``all``) of the model in ``model_dir``."""
    from jdelta.models.family import load_checkpoint
    from jdelta.toy.evaluate import by_family, greedy_correct

    model, _ = load_checkpoint(model_dir)
    return by_family(greedy_correct(model, heldout), heldout.families, world.names)


def delta_by_family(entries: list[dict], world) -> dict[str, dict]:
    """Per family: prompts, mean Δ (tv), zero-Δ share (permutation test) with a Wilson interval,
    and the teacher's / student's sampled accuracy."""
    from jdelta.divergence import proportion_interval

    out = {}
    scored = [e for e in entries if e["status"] == "scored"]
    for name in [*world.names, "all"]:
        rows = [e for e in scored if name == "all" or e.get("family") == name]
        zero = sum(e["zero_delta"]["permutation"] for e in rows)
        lo, hi = proportion_interval(zero, len(rows))
        mean = lambda key, rows=rows: float(np.mean([e[key] for e in rows if e.get(key) is not None])) if rows else None  # noqa: E731
        out[name] = {"prompts": len(rows), "mean_delta": float(np.mean([e["delta"]["tv"] for e in rows])) if rows else None,
                     "zero_delta": zero, "zero_share": zero / len(rows) if rows else None, "ci_low": lo, "ci_high": hi,
                     "teacher_sampled_accuracy": mean("teacher_accuracy"),
                     "student_sampled_accuracy": mean("student_accuracy")}
    return out


def _pct(row: dict | None) -> str:
    if not row or not row.get("n"):
        return "n/a"
    return f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def summary_markdown(res: dict[str, Any], world) -> str:
    acc, delta = res["accuracy"], res["delta_by_family"]
    names = [*world.names, "all"]
    lines = ["# jdelta demo (trained toy pair)", "",
             f"Teacher and student: {res['pair']} (trained from scratch on the chart world by `jdelta toy-models`; "
             "docs/toy_world.md). Held-out: the world's held-out split, greedy answers, exact match, "
             "95% Wilson intervals.", "",
             "## Accuracy and Δ by family", "",
             "| family | needs | teacher | student | seeds | mean Δ (tv) | zero-Δ share [95% CI] |", "|---|---|---|---|---|---|---|"]
    details = {f.family: f.detail for f in world.families}
    for f in names:
        d = delta[f]
        zs = "n/a" if d["zero_share"] is None else \
            f"{100 * d['zero_share']:.0f}% [{100 * d['ci_low']:.0f}, {100 * d['ci_high']:.0f}]"
        md = "n/a" if d["mean_delta"] is None else f"{d['mean_delta']:.3f}"
        lines.append(f"| {'**all**' if f == 'all' else f} | {details.get(f, '')} | {_pct(acc['teacher'][f])} | "
                     f"{_pct(acc['student'][f])} | {d['prompts']} | {md} | {zs} |")
    z = delta["all"]
    lines += ["", f"Zero-Δ share of the {z['prompts']} seeds (permutation test at 5%, n = {res['n']} answers per "
              f"model): **{100 * z['zero_share']:.0f}% [{100 * z['ci_low']:.0f}, {100 * z['ci_high']:.0f}]**."]
    if res.get("distill"):
        dist = res["distill"]
        lines += ["", "## Distillation: Δ > 0 prompts vs random prompts (equal budget)", "",
                  f"{dist['steps']} {dist['mode']} steps of {dist['batch']} prompts each, from the same student; "
                  f"Δ > 0 set: {dist['prompts']['delta']} seeds, random set: {dist['prompts']['random']} seeds "
                  f"({dist['overlap']} in both).", "",
                  "| family | student before | after Δ > 0 prompts | after random prompts |", "|---|---|---|---|"]
        for f in names:
            lines.append(f"| {'**all**' if f == 'all' else f} | {_pct(acc['student'][f])} | "
                         f"{_pct(acc['student-delta'][f])} | {_pct(acc['student-random'][f])} |")
        lines += ["", "![accuracy](accuracy.png)"]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()), ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], world, path: Path) -> None:
    """Held-out accuracy per family (teacher, student before, after each distillation) and Δ by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*world.names, "all"]
    series = [k for k in ("teacher", "student", "student-delta", "student-random") if k in res["accuracy"]]
    labels = {"teacher": "teacher", "student": "student", "student-delta": "student after Δ>0 distill",
              "student-random": "student after random distill"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(names))
    w = 0.8 / len(series)
    for i, key in enumerate(series):
        rows = [res["accuracy"][key][f] for f in names]
        y = np.array([100 * r["accuracy"] for r in rows])
        err = np.array([[100 * (r["accuracy"] - r["ci_low"]) for r in rows], [100 * (r["ci_high"] - r["accuracy"]) for r in rows]])
        ax.bar(x + (i - (len(series) - 1) / 2) * w, y, w, yerr=err, capsize=2, label=labels[key])
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.set_title("held-out accuracy, 95% Wilson intervals")
    d = [res["delta_by_family"][f]["mean_delta"] or 0.0 for f in names]
    bx.bar(names, d, color="tab:purple")
    bx.set_ylabel("mean Δ (total variation)")
    bx.set_title(f"Δ by family ({res['n']} answers per model per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: Config) -> dict[str, Any]:
    """The demo as a function; returns the summary dict (also written to ``DIR/summary.json``)."""
    from jdelta.data.records import read_records_jsonl
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.loading import ModelSession
    from jdelta.toy import trained_pair
    from jdelta.toy.train import encode_records
    from jdelta.toy.world import world_records

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    teacher, student = trained_pair(cfg.pair)
    world = load_world(teacher)
    print(f"jdelta demo -> {cfg.out}\npair: {teacher.parent} (trained toy teacher and student)\n", flush=True)
    with RunDir(cfg.out, "demo", config=to_dict(cfg), overwrite=cfg.overwrite,
                ignore=("out", "progress", "overwrite")) as run:
        out = run.path
        seeds_path = out / "seeds" / "records.jsonl"
        _write_records(seeds_path, world_records(world, "seeds", cfg.n_prompts))
        run.commit()
        heldout_records = world_records(world, "heldout", cfg.heldout_per_family * len(world.families))
        tok = load_tokenizer(teacher)
        heldout = encode_records(heldout_records, tok, width=world.width, height=world.height, length=96)
        acc = {"teacher": heldout_accuracy(teacher, heldout, world), "student": heldout_accuracy(student, heldout, world)}
        seconds["accuracy"] = time.perf_counter() - t0
        session = ModelSession()
        t1 = time.perf_counter()
        manifest = score_stage.run_score(score_config(cfg, teacher, student, world), session=session,
                                         notes=["Trained toy teacher and student (jdelta toy-models)."])
        seconds["score"] = time.perf_counter() - t1
        entries = read_jsonl(out / "score" / "scores.jsonl")
        res: dict[str, Any] = {"pair": str(teacher.parent), "n": cfg.n, "world": to_dict(world),
                               "delta_by_family": delta_by_family(entries, world), "accuracy": acc,
                               "score_summary": manifest.get("summary"), "distill": None}
        scored = [e for e in entries if e["status"] == "scored"]
        keep = [e["id"] for e in scored if not e["zero_delta"]["permutation"]]
        if cfg.distill_steps > 0 and keep:
            rng = np.random.default_rng(cfg.seed)
            pool = [e["id"] for e in scored]
            chosen = {"delta": set(keep), "random": {pool[i] for i in rng.choice(len(pool), len(keep), replace=False)}}
            seeds = list(read_records_jsonl(seeds_path))
            dist: dict[str, Any] = {"steps": cfg.distill_steps, "mode": cfg.distill_mode, "batch": cfg.distill_batch,
                                    "prompts": {a: len(chosen[a]) for a in ARMS},
                                    "overlap": len(chosen["delta"] & chosen["random"]), "runs": {}}
            for arm in ARMS:
                path = out / f"prompts-{arm}" / "records.jsonl"
                _write_records(path, [r for r in seeds if r.id in chosen[arm]])
                t2 = time.perf_counter()
                print(f"\ndistilling on {len(chosen[arm])} {arm} prompts ({cfg.distill_steps} {cfg.distill_mode} steps)",
                      flush=True)
                dcfg = distill_config(cfg, arm, path, teacher, student, world)
                summary = distill_stage.train(dcfg).summary
                export = Path(dcfg.export.path)
                tok.save_pretrained(str(export))
                dist["runs"][arm] = {"last_loss": summary["last"].get("loss"), "nan_steps": summary["nan_steps"]}
                acc[f"student-{arm}"] = heldout_accuracy(export, heldout, world)
                seconds[f"distill-{arm}"] = time.perf_counter() - t2
            res["distill"] = dist
        elif cfg.distill_steps > 0:
            print("no seed has a significantly non-zero Δ: nothing to distill on", flush=True)
        seconds["total"] = time.perf_counter() - t0
        res["seconds"] = seconds
        text = summary_markdown(res, world)
        if res["distill"] is not None:
            plot(res, world, out / ".accuracy.png")
            os.replace(out / ".accuracy.png", out / "accuracy.png")
        run.write_atomic("summary.md", text)
        run.write_atomic("summary.json", json.dumps(res, indent=2) + "\n")
        run.update(complete=True, counts=manifest["counts"])
    print("\n" + text, flush=True)
    return res


def run(cfg: Config) -> int:
    run_demo(cfg)
    return 0
