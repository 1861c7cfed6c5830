"""``jdelta demo --out DIR``: the whole DeltaPrompts flow on CPU in a few minutes.

1. seeds: procedurally drawn charts, tables and receipts with exact answers
   (:func:`jdelta.data.charts.generate_records`) -> ``DIR/seeds/records.jsonl``;
2. a small byte-level BPE tokenizer trained on the seeds' text (:func:`build_demo_tokenizer`);
3. two tiny **randomly initialised** Qwen3-VL models (teacher larger than student, same
   tokenizer) saved in Hugging Face layout -> ``DIR/models/{teacher,student}``;
4. ``jdelta score`` of the pair on the seeds -> ``DIR/score``;
5. a few VA-OPD on-policy distillation steps of the student on the non-zero-Δ prompts (Orbax
   checkpoint in ``DIR/distill/checkpoints``, HF export in ``DIR/models/student-distilled``),
   then a re-score -> ``DIR/rescore``;
6. a summary table (``DIR/summary.md``).

The models are random: their answers are noise and Δ measures nothing about real models. The
demo proves the plumbing (records, sampling, answer extraction, Δ, reports, resumable runs,
distillation, checkpoints, export), not a result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from jdelta.testing import (  # noqa: F401 (TRANSITION: re-exported for the tests until the demo stage lands)
    make_random_model_dir,
    make_seeds,
    make_tiny_pair,
    make_tokenizer,
    random_model_fast,
)
from jdelta.testing import tiny_config_for_tokenizer as tiny_config  # noqa: F401

RANDOM_NOTE = (
    "The teacher and student here are tiny RANDOMLY INITIALISED Qwen3-VL models: their answers are noise, "
    "so Δ reflects random models, not real ones. The demo proves the plumbing, not a result."
)


# ----------------------------------------------------------------------------- building blocks


# ----------------------------------------------------------------------------- distillation


def distill_available() -> bool:
    """Whether the ``jdelta distill`` stage (``jdelta.stages.distill.train``) is installed."""
    try:
        from jdelta.stages.distill import train  # noqa: F401
    except ImportError:
        return False
    return True


def distill_config(teacher_dir: Path, student_dir: Path, prompts_path: Path, out_dir: Path, export_dir: Path, *,
                   steps: int, max_pixels: int, seed: int = 0, rollouts: int = 4, batch_size: int = 4,
                   max_new_tokens: int = 16) -> dict[str, Any]:
    """The ``jdelta distill`` config of the demo's VA-OPD run (records -> on-policy -> Orbax -> HF export)."""
    return {
        "run_dir": str(out_dir),
        "method": "on_policy",
        "student": {"path": str(student_dir)},
        "teacher": {"path": str(teacher_dir)},
        "data": {
            "source": "records", "path": str(prompts_path), "tokenizer": str(teacher_dir),
            "batch_size": batch_size, "seed": seed,
            "pipeline": {"image": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                                   "max_pixels": max_pixels, "min_pixels": min(max_pixels, 32 * 32)},
                         "seq_buckets": [128, 256, 512]},
        },
        "train": {"steps": steps, "log_every": 1, "seed": seed},
        "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.25},
        "checkpoint": {"save_every": steps, "keep": 1, "async_save": False},
        "distill": {"mode": "va_opd", "rollouts_per_prompt": rollouts, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": max_new_tokens, "chunk_size": 16, "completion_bucket": 16,
                    "prompt_bucket": 32, "seed": seed},
        "export": {"path": str(export_dir)},
    }


def distill_student(teacher_dir: Path, student_dir: Path, prompts_path: Path, out_dir: Path, export_dir: Path, *,
                    progress: bool = True, **kw: Any) -> dict[str, Any]:
    """A few VA-OPD steps of the student through the ``jdelta distill`` stage, then HF export
    (with the tokenizer copied beside the weights)."""
    from jdelta.config import build
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.stages.distill import Config, train

    cfg = distill_config(teacher_dir, student_dir, prompts_path, out_dir, export_dir, **kw)
    summary = train(build(Config, {**cfg, "progress": progress})).summary
    load_tokenizer(teacher_dir).save_pretrained(str(export_dir))
    (export_dir / "RANDOM_WEIGHTS.txt").write_text(
        f"A random student after {summary['steps']} VA-OPD steps towards a random teacher (jdelta demo); "
        "not a trained model.\n")
    ckpts = sorted(int(p.name) for p in (out_dir / "checkpoints").iterdir() if p.name.isdigit())
    return {"steps": summary["steps"], "last_loss": summary["last"].get("loss"), "checkpoint_steps": ckpts,
            "time_split": summary["time_split"], "nan_steps": summary["nan_steps"]}


# ----------------------------------------------------------------------------- the stage


def _overall(manifest: dict, key: str) -> str:
    s = manifest.get("summary", {}).get(key)
    if not s or not s["prompts"]:
        return "n/a"
    return f"{100 * s['fraction']:.1f}% [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"


def run_demo(out: str | Path, *, n_prompts: int = 48, seed: int = 0, n: int = 4, max_new_tokens: int = 16,
             shard_size: int = 16, batch_size: int = 8, max_pixels: int = 96 * 128, distill_steps: int = 4,
             vocab_size: int = 512, teacher_layers: int = 2, progress: bool = True) -> dict[str, Any]:
    from jdelta.data.records import read_jsonl, write_jsonl
    from jdelta.stages.score import run_score

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    print(f"jdelta demo -> {out}\nNOTE: {RANDOM_NOTE}\n", flush=True)

    seeds = out / "seeds" / "records.jsonl"
    if not seeds.is_file():
        make_seeds(seeds.parent, n_prompts, seed)
    timings["seeds"] = time.perf_counter() - t0
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        make_tokenizer(seeds, tok_dir, vocab_size)
    from jdelta.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    models = out / "models"
    if not (models / "student" / "config.json").is_file():
        make_tiny_pair(models, tok, seed=seed, teacher_layers=teacher_layers)
    timings["setup"] = time.perf_counter() - t0
    common = dict(n=n, temperature=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size, max_pixels=max_pixels,
                  seed=seed, num_permutations=199, num_posterior_draws=400, progress=progress, notes=[RANDOM_NOTE])
    t1 = time.perf_counter()
    score = run_score(models / "teacher", models / "student", seeds, out / "score", shard_size=shard_size, **common)
    timings["score"] = time.perf_counter() - t1

    rows = [("before distillation", out / "score", score)]
    distilled = None
    if distill_steps > 0 and distill_available():
        entries = [json.loads(x) for x in (out / "score" / "scores.jsonl").read_text().splitlines() if x.strip()]
        keep = {e["id"] for e in entries if e["status"] == "scored" and not e["zero_delta"]["exact"]}
        train_path = out / "distill_prompts.jsonl"  # beside the distill run directory (it holds only its run)
        write_jsonl([r for r in read_jsonl(seeds) if r.id in keep], train_path)
        print(f"\ndistilling on {len(keep)} non-zero-Δ prompts ({distill_steps} VA-OPD steps)", flush=True)
        t2 = time.perf_counter()
        if keep:
            distilled = distill_student(models / "teacher", models / "student", train_path, out / "distill",
                                        models / "student-distilled", steps=distill_steps, max_pixels=max_pixels,
                                        seed=seed, max_new_tokens=max_new_tokens, progress=progress)
            timings["distill"] = time.perf_counter() - t2
            t3 = time.perf_counter()
            rescore = run_score(models / "teacher", models / "student-distilled", seeds, out / "rescore",
                                shard_size=shard_size, **common)
            timings["rescore"] = time.perf_counter() - t3
            rows.append(("after distillation", out / "rescore", rescore))
        else:
            print("every prompt is zero-Δ: nothing to distill on", flush=True)
    elif distill_steps > 0:
        print("\njdelta.distill is not available in this install: skipping the distillation step", flush=True)

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
    timings["total"] = time.perf_counter() - t0
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"runs": {name: m.get("summary") for name, _, m in rows},
                                                  "counts": {name: m["counts"] for name, _, m in rows},
                                                  "distill": distilled, "seconds": timings,
                                                  "random_models": True, "note": RANDOM_NOTE}, indent=2) + "\n")
    print("\n" + text, flush=True)
    return {"rows": rows, "distill": distilled, "seconds": timings}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="demo directory (resumed if it exists)")
    parser.add_argument("--n-prompts", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="samples per model per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=4, help="VA-OPD steps (0: skip distillation)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, n_prompts=args.n_prompts, seed=args.seed, n=args.n, max_new_tokens=args.max_new_tokens,
             distill_steps=args.distill_steps, progress=not args.no_progress)
    return 0
