"""End-to-end CPU demo on tiny random models: seeds, score, VA-OPD steps, re-score.

``jdelta demo --out DIR`` runs the whole DeltaPrompts flow on CPU in a few minutes:

1. seeds: procedurally drawn charts, tables and receipts with exact answers -> ``DIR/seeds/records.jsonl``;
2. a small byte-level BPE tokenizer trained on the seeds' text -> ``DIR/tokenizer``;
3. two tiny **randomly initialised** Qwen3-VL models (teacher larger than student, same tokenizer)
   in Hugging Face layout -> ``DIR/models/{teacher,student}``;
4. the ``score`` stage on the pair and the seeds -> ``DIR/score``;
5. ``distill_steps`` VA-OPD steps of the student (the ``distill`` stage) on the non-zero-Δ prompts
   (Orbax checkpoints in ``DIR/distill/checkpoints``, HF export in ``DIR/models/student-distilled``),
   then a re-score -> ``DIR/rescore``;
6. a summary table (``DIR/summary.md``, ``DIR/summary.json``).

The models are random: their answers are noise and Δ measures nothing about real models. The demo
proves the plumbing (records, sampling, answer extraction, Δ, reports, resumable runs,
distillation, checkpoints, export), not a result. A rerun resumes every step; other settings in
the same directory are refused (``overwrite`` starts over).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from jdelta.config import build, check, to_dict
from jdelta.runs import RunDir, read_jsonl
from jdelta.stages import distill as distill_stage
from jdelta.stages import score as score_stage

RANDOM_NOTE = (
    "The teacher and student here are tiny RANDOMLY INITIALISED Qwen3-VL models: their answers are noise, "
    "so Δ reflects random models, not real ones. The demo proves the plumbing, not a result."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """out: demo directory. n_prompts: seed records. n: samples per model per prompt.
    max_new_tokens: completion cap (sampling and rollouts). shard_size / batch_size: the score
    stage's. max_pixels: image budget. distill_steps: VA-OPD steps (0: skip distillation).
    vocab_size: the demo tokenizer's. teacher_layers: text layers of the teacher."""

    out: str
    n_prompts: int = 48
    seed: int = 0
    n: int = 4
    max_new_tokens: int = 16
    shard_size: int = 16
    batch_size: int = 8
    max_pixels: int = 96 * 128
    distill_steps: int = 4
    vocab_size: int = 512
    teacher_layers: int = 2
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("n_prompts", "n", "max_new_tokens", "shard_size", "batch_size", "teacher_layers"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.max_pixels >= 32 * 32, "max_pixels", f"must be >= {32 * 32}, got {self.max_pixels}")
        check(self.distill_steps >= 0, "distill_steps", f"must be >= 0, got {self.distill_steps}")
        check(self.vocab_size >= 256, "vocab_size", f"must be >= 256 (the byte alphabet), got {self.vocab_size}")


def score_config(cfg: Config, student: Path, out: Path) -> score_stage.Config:
    """The ``score`` stage's config for the demo's teacher and ``student`` on the seeds."""
    root = Path(cfg.out)
    return build(score_stage.Config, {
        "teacher": str(root / "models" / "teacher"), "student": str(student),
        "prompts": str(root / "seeds" / "records.jsonl"), "out": str(out), "shard_size": cfg.shard_size,
        "sampling": {"n": cfg.n, "temperature": 1.0, "max_new_tokens": cfg.max_new_tokens,
                     "batch_size": cfg.batch_size, "seed": cfg.seed},
        "prompt": {"max_pixels": cfg.max_pixels},
        "delta": {"num_permutations": 199, "num_posterior_draws": 400},
        "progress": cfg.progress,
    })


def distill_config(cfg: Config, prompts: Path) -> distill_stage.Config:
    """The ``distill`` stage's config of the demo's VA-OPD run (records -> on-policy -> Orbax -> HF export)."""
    root = Path(cfg.out)
    teacher = root / "models" / "teacher"
    steps = cfg.distill_steps
    return build(distill_stage.Config, {
        "run_dir": str(root / "distill"),
        "method": "on_policy",
        "student": {"path": str(root / "models" / "student")},
        "teacher": {"path": str(teacher)},
        "data": {
            "source": "records", "path": str(prompts), "tokenizer": str(teacher), "batch_size": 4, "seed": cfg.seed,
            "pipeline": {"image": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                                   "max_pixels": cfg.max_pixels, "min_pixels": min(cfg.max_pixels, 32 * 32)},
                         "seq_buckets": [128, 256, 512]},
        },
        "train": {"steps": steps, "log_every": 1, "seed": cfg.seed},
        "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.25},
        "checkpoint": {"save_every": steps, "keep": 1, "async_save": False},
        "distill": {"mode": "va_opd", "rollouts_per_prompt": 4, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": cfg.max_new_tokens, "chunk_size": 16, "completion_bucket": 16,
                    "prompt_bucket": 32, "seed": cfg.seed},
        "export": {"path": str(root / "models" / "student-distilled")},
        "progress": cfg.progress,
    })


def distill_student(cfg: Config, prompts: Path) -> dict[str, Any]:
    """The VA-OPD steps through the ``distill`` stage, then the tokenizer beside the exported weights."""
    from jdelta.data.tokenizer import load_tokenizer

    dcfg = distill_config(cfg, prompts)
    summary = distill_stage.train(dcfg).summary
    export = Path(dcfg.export.path)
    load_tokenizer(dcfg.teacher.path).save_pretrained(str(export))
    (export / "RANDOM_WEIGHTS.txt").write_text(
        f"A random student after {summary['steps']} VA-OPD steps towards a random teacher (jdelta demo); "
        "not a trained model.\n")
    ckpts = sorted(int(p.name) for p in (Path(dcfg.run_dir) / "checkpoints").iterdir() if p.name.isdigit())
    return {"steps": summary["steps"], "last_loss": summary["last"].get("loss"), "checkpoint_steps": ckpts,
            "time_split": summary["time_split"], "nan_steps": summary["nan_steps"]}


def prepare(cfg: Config, run: RunDir) -> None:
    """Seeds, tokenizer and the random teacher/student pair (each kept when already there)."""
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

    out = run.path
    seeds = out / "seeds" / "records.jsonl"
    if not seeds.is_file():
        make_seeds(seeds.parent, cfg.n_prompts, cfg.seed)
    run.commit()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        make_tokenizer(seeds, tok_dir, cfg.vocab_size)
    models = out / "models"
    if not (models / "student" / "RANDOM_WEIGHTS.txt").is_file():  # written last
        make_tiny_pair(models, load_tokenizer(tok_dir), seed=cfg.seed, teacher_layers=cfg.teacher_layers)


def _overall(manifest: dict, key: str) -> str:
    s = manifest.get("summary", {}).get(key)
    if not s or not s["prompts"]:
        return "n/a"
    return f"{100 * s['fraction']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"


def summary_markdown(rows: list[tuple[str, Path, dict]], out: Path, distilled: dict | None,
                     seconds: dict[str, float]) -> str:
    lines = ["# jdelta demo", "", f"> {RANDOM_NOTE}", "",
             "| run | prompts | scored | skipped | mean Δ (tv) | zero-Δ exact [95% CI] | zero-Δ permutation [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for name, path, m in rows:
        c = m["counts"]
        md = m.get("summary", {}).get("mean_delta")
        lines.append(f"| {name} (`{path.relative_to(out)}`) | {c['input']} | {c['scored']} | {c['skipped']} | "
                     f"{'n/a' if md is None else f'{md:.3f}'} | {_overall(m, 'zero_delta_exact')} | "
                     f"{_overall(m, 'zero_delta_permutation')} |")
    if distilled is not None:
        lines += ["", f"Distillation: {distilled['steps']} VA-OPD steps, last loss {distilled['last_loss']:.4f}; "
                  f"Orbax checkpoint in `distill/checkpoints`, HF export in `models/student-distilled`."]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), ""]
    return "\n".join(lines)


def run_demo(cfg: Config) -> dict[str, Any]:
    """The demo as a function: ``{"rows": [(name, run dir, score manifest)], "distill": summary | None,
    "seconds": {...}}``."""
    from jdelta.data.records import read_records_jsonl as read_records
    from jdelta.data.records import write_jsonl
    from jdelta.models.loading import ModelSession

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    print(f"jdelta demo -> {cfg.out}\nNOTE: {RANDOM_NOTE}\n", flush=True)
    with RunDir(cfg.out, "demo", config=to_dict(cfg), overwrite=cfg.overwrite, ignore=("out", "progress", "overwrite")) as run:
        out = run.path
        prepare(cfg, run)
        seconds["setup"] = time.perf_counter() - t0
        session = ModelSession()  # the teacher is loaded once for score and re-score
        t1 = time.perf_counter()
        score = score_stage.run_score(score_config(cfg, out / "models" / "student", out / "score"), session=session,
                                      notes=[RANDOM_NOTE])
        seconds["score"] = time.perf_counter() - t1
        rows = [("before distillation", out / "score", score)]
        distilled = None
        if cfg.distill_steps > 0:
            entries = read_jsonl(out / "score" / "scores.jsonl")
            keep = {e["id"] for e in entries if e["status"] == "scored" and not e["zero_delta"]["exact"]}
            print(f"\ndistilling on {len(keep)} non-zero-Δ prompts ({cfg.distill_steps} VA-OPD steps)", flush=True)
            if keep:
                train_path = out / "distill-prompts" / "records.jsonl"
                if not train_path.is_file():
                    tmp = train_path.with_name(".records.jsonl.tmp")
                    write_jsonl([r for r in read_records(out / "seeds" / "records.jsonl") if r.id in keep], tmp)
                    os.replace(tmp, train_path)
                t2 = time.perf_counter()
                distilled = distill_student(cfg, train_path)
                seconds["distill"] = time.perf_counter() - t2
                t3 = time.perf_counter()
                rescore = score_stage.run_score(
                    score_config(cfg, out / "models" / "student-distilled", out / "rescore"), session=session,
                    notes=[RANDOM_NOTE])
                seconds["rescore"] = time.perf_counter() - t3
                rows.append(("after distillation", out / "rescore", rescore))
            else:
                print("every prompt is zero-Δ: nothing to distill on", flush=True)
        seconds["total"] = time.perf_counter() - t0
        text = summary_markdown(rows, out, distilled, seconds)
        run.write_atomic("summary.md", text)
        run.write_atomic("summary.json", json.dumps({
            "runs": {name: m.get("summary") for name, _, m in rows}, "counts": {name: m["counts"] for name, _, m in rows},
            "distill": distilled, "seconds": seconds, "random_models": True, "note": RANDOM_NOTE}, indent=2) + "\n")
        run.update(complete=True, counts={name: m["counts"] for name, _, m in rows})
    print("\n" + text, flush=True)
    return {"rows": rows, "distill": distilled, "seconds": seconds}


def run(cfg: Config) -> int:
    run_demo(cfg)
    return 0
