"""``jdelta score``: sample n answers from a teacher and a student per prompt and measure Δ (a run directory).

Run directory written by the stage::

    RUN_DIR/manifest.json          config, model identities, counts (input = scored + skipped)
    RUN_DIR/shards/shard-00000.jsonl  one JSON object per input prompt of the shard (status
                                      "scored" or "skipped" with a reason); written atomically
    RUN_DIR/scores.jsonl           all shards concatenated in input order (when complete)
    RUN_DIR/report.md, report.json, delta_hist.png

Resumable: a shard whose file exists (and holds one line per prompt of the shard) is never
scored again; kill the stage at any point and rerun the same command to finish.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jdelta import divergence as dv
from jdelta.delta_report import write_report
from jdelta.delta_scoring import Scorer, ScoreSettings, _bar
from jdelta.models.loading import load_model, model_identity, parse_mesh, tokenizer_fingerprint

RECORD_VERSION = 1

def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


FINGERPRINT_KEYS = ("prompts", "teacher", "student", "tokenizer", "settings", "shard_size")


def run_score(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    prompts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: int = 64,
    tokenizer: str | os.PathLike | None = None,
    mesh: str | None = None,
    max_shards: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    notes: Sequence[str] = (),
    after_shard: Callable[[int], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The ``jdelta score`` stage as a function; returns the manifest.

    ``max_shards``: stop (resumably) after scoring this many new shards. ``after_shard(k)`` is
    called after shard ``k`` is written (tests inject failures with it).
    """
    import jax

    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import load_tokenizer

    settings_d = ScoreSettings.make(**settings)
    run_dir = Path(out)
    shard_dir = run_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    prompts_p = Path(prompts)
    source = open_records(prompts_p)
    total = len(source)
    if total == 0:
        raise ValueError(f"{prompts_p}: no prompt records to score")
    tok_dir = Path(tokenizer) if tokenizer is not None else Path(teacher)
    tok = load_tokenizer(tok_dir)
    st_tok = Path(student) / "tokenizer.json"
    if tokenizer is None and st_tok.is_file() and tokenizer_fingerprint(load_tokenizer(student)) != tokenizer_fingerprint(tok):
        raise ValueError(f"{student}: its tokenizer differs from the teacher's ({teacher}); both models must share "
                         "one tokenizer (pass --tokenizer to force one)")
    fingerprint = {
        "prompts": {"path": str(prompts_p.resolve()), "records": total,
                    "size": prompts_p.stat().st_size if prompts_p.is_file() else None},
        "teacher": model_identity(teacher),
        "student": model_identity(student),
        "tokenizer": {"path": str(tok_dir.resolve()), "vocab_sha256": tokenizer_fingerprint(tok)},
        "settings": dict(settings_d),
        "shard_size": int(shard_size),
    }
    manifest_p = run_dir / "manifest.json"
    if manifest_p.is_file():
        old = json.loads(manifest_p.read_text())
        diff = [k for k in FINGERPRINT_KEYS if json.dumps(old.get("config", {}).get(k), sort_keys=True, default=str)
                != json.dumps(fingerprint[k], sort_keys=True, default=str)]
        if diff and not overwrite:
            raise ValueError(f"{run_dir} holds a score run with different {', '.join(diff)}; use a new --out "
                             "or --overwrite to discard it")
        if diff:
            for f in shard_dir.glob("shard-*.jsonl"):
                f.unlink()
    num_shards = max(1, -(-total // shard_size))

    def shard_path(k: int) -> Path:
        return shard_dir / f"shard-{k:05d}.jsonl"

    def shard_indices(k: int) -> list[int]:
        return list(range(k * shard_size, min(total, (k + 1) * shard_size)))

    def shard_done(k: int) -> bool:
        p = shard_path(k)
        if not p.is_file():
            return False
        try:
            rows = _read_jsonl(p)
        except (OSError, json.JSONDecodeError):
            return False
        return [r.get("index") for r in rows] == shard_indices(k)

    done_before = [k for k in range(num_shards) if shard_done(k)]
    todo = [k for k in range(num_shards) if k not in set(done_before)]
    manifest: dict[str, Any] = {
        "stage": "score",
        "version": RECORD_VERSION,
        "config": fingerprint,
        "shards": {"total": num_shards, "resumed": len(done_before), "scored_now": 0},
        "complete": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")

    t0 = time.perf_counter()
    scored_now = 0
    if todo:
        mesh_obj = parse_mesh(mesh)
        t_model, _ = load_model(teacher, mesh_obj)
        s_model, _ = load_model(student, mesh_obj)
        scorer = Scorer(t_model, s_model, tok, settings_d, mesh=mesh_obj, source=source)
        done_prompts = sum(len(shard_indices(k)) for k in done_before)
        bar = _bar(total, "score", progress, initial=done_prompts)
        base = jax.random.key(int(settings_d["seed"]))
        try:
            for k in todo:
                if max_shards is not None and scored_now >= max_shards:
                    break
                rows = scorer.score_indices(shard_indices(k), jax.random.fold_in(base, k), bar)
                _write_atomic(shard_path(k), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                scored_now += 1
                manifest["shards"]["scored_now"] = scored_now
                _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")
                if after_shard is not None:
                    after_shard(k)
        finally:
            if bar is not None:
                bar.close()
    manifest["seconds"] = time.perf_counter() - t0
    finished = [k for k in range(num_shards) if shard_done(k)]
    entries = [r for k in finished for r in _read_jsonl(shard_path(k))]
    complete = len(finished) == num_shards
    counts = Counter(e["status"] for e in entries)
    by_reason = Counter(e["reason"] for e in entries if e["status"] == "skipped")
    manifest["counts"] = {
        "input": total,
        "accounted": len(entries),
        "scored": counts.get("scored", 0),
        "skipped": counts.get("skipped", 0),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "remaining": total - len(entries),
    }
    manifest["shards"]["done"] = len(finished)
    manifest["complete"] = complete
    if complete:
        ids = [e["index"] for e in entries]
        if ids != list(range(total)):
            raise RuntimeError(f"{run_dir}: shard contents do not cover prompts 0..{total - 1} exactly once")
        with (run_dir / "scores.jsonl.tmp").open("w", encoding="utf-8") as f:
            for k in range(num_shards):
                f.write(shard_path(k).read_text(encoding="utf-8"))
        os.replace(run_dir / "scores.jsonl.tmp", run_dir / "scores.jsonl")
        summary = write_report(run_dir, entries, settings_d["metric"], notes=notes)
        manifest["summary"] = {
            "zero_delta_exact": summary["zero_delta"]["exact"]["overall"],
            "zero_delta_permutation": summary["zero_delta"]["permutation"]["overall"],
            "zero_delta_posterior": summary["zero_delta"]["posterior"]["overall"],
            "mean_delta": summary["delta"]["mean"],
        }
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_atomic(manifest_p, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher HF checkpoint directory (with tokenizer)")
    parser.add_argument("--student", required=True, help="student HF checkpoint directory")
    parser.add_argument("--prompts", required=True, help="prompt records: .jsonl, .array_record or a dataset dir")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the teacher's)")
    parser.add_argument("--n", type=int, default=8, help="samples per model per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampling batch")
    parser.add_argument("--shard-size", type=int, default=64, help="prompts per output shard (unit of resume)")
    parser.add_argument("--metric", default="tv", choices=dv.METRICS, help="Δ used for tests and the report")
    parser.add_argument("--epsilon", type=float, default=0.1, help="posterior test: P(Δ_true > epsilon)")
    parser.add_argument("--max-posterior", type=float, default=0.5, help="posterior test: zero if P <= this")
    parser.add_argument("--level", type=float, default=0.05, help="permutation test level")
    parser.add_argument("--num-permutations", type=int, default=999)
    parser.add_argument("--num-posterior-draws", type=int, default=1000)
    parser.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default Qwen3-VL's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=4,tensor=2 (default: one device)")
    parser.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run with other settings")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = run_score(
            args.teacher, args.student, args.prompts, args.out, shard_size=args.shard_size,
            tokenizer=args.tokenizer, mesh=args.mesh, max_shards=args.max_shards, overwrite=args.overwrite,
            progress=not args.no_progress, n=args.n, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, metric=args.metric,
            epsilon=args.epsilon, max_posterior=args.max_posterior, level=args.level,
            num_permutations=args.num_permutations, num_posterior_draws=args.num_posterior_draws,
            max_pixels=args.max_pixels, seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"jdelta score: error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"{c['input']} prompts: {c['scored']} scored, {c['skipped']} skipped {c['skipped_by_reason'] or ''}"
          f", {c['remaining']} remaining")
    if manifest["complete"]:
        print((Path(args.out) / "report.md").read_text())
    else:
        print(f"stopped with {manifest['shards']['done']}/{manifest['shards']['total']} shards done; "
              "rerun the same command to continue")
    return 0
