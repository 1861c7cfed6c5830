"""``jdelta eval``: one model's answers on local benchmark sets, each scored with its own metric.

Per prompt the model answers greedily (``--n 1``, the default) or samples ``n`` completions and
answers with the majority class (:func:`jdelta.answers.class_answers`; ties go to the earliest
answer). The answer is scored against the reference(s) with the benchmark's metric
(``--metric auto``: ChartQA relaxed accuracy, DocVQA/InfoVQA ANLS, AI2D multiple choice, ... see
:func:`jdelta.delta_scoring.answer_metric_for`) or one metric forced for all.

``--data`` takes comma-separated sets, each ``[NAME=]PATH`` where PATH is a jdelta records file
or directory (``.jsonl`` / ``.array_record``), or ``LAYOUT:DIR`` for a Hugging Face dataset saved
to disk in a known layout (``chartqa:/data/chartqa``, see :data:`jdelta.data.records.LAYOUTS`).

Writes ``OUT/predictions-<name>.jsonl`` (one line per input prompt: the answer and its score, or
the reason it was skipped), ``OUT/results.md`` / ``OUT/results.json`` (per-benchmark table with
the macro average) and ``OUT/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jdelta import answers as ans
from jdelta.benchmark_metrics import answer_metric_for, classing_type_for, references_of
from jdelta.delta_scoring import PromptProcessor, make_sampler, record_id_of, sample_texts
from jdelta.models.loading import image_config_for, load_model, model_identity, parse_mesh

METRIC_ALIASES = {
    "auto": None,
    "relaxed": "relaxed_accuracy",
    "relaxed_accuracy": "relaxed_accuracy",
    "anls": "anls",
    "exact": "exact_match",
    "exact_match": "exact_match",
    "mc": "mc_accuracy",
    "mc_accuracy": "mc_accuracy",
}


def parse_data_spec(spec: str) -> list[tuple[str, str, str | None]]:
    """``"a.jsonl,docvqa=docvqa:/d/docvqa"`` -> ``[(name, path, layout or None), ...]``."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, rest = item.rpartition("=") if "=" in item else ("", "", item)
        layout = None
        head, sep, tail = rest.partition(":")
        from jdelta.data.records import LAYOUTS

        if sep and head in LAYOUTS and not Path(rest).exists():
            layout, rest = head, tail
        p = Path(rest)
        if not name:
            name = p.parent.name if p.name in ("records.jsonl", "records.array_record") else p.name.split(".")[0]
        out.append((name, rest, layout))
    names = [n for n, _, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--data: benchmark names {dup} repeat; name them as NAME=PATH")
    if not out:
        raise ValueError("--data: no benchmark given")
    return out


def open_benchmark(path: str, layout: str | None):
    from jdelta.data.records import hf_disk_source, open_records

    if layout is not None:
        return hf_disk_source(path, layout)
    if not Path(path).exists():
        raise FileNotFoundError(f"--data: {path} does not exist")
    return open_records(path)


def majority_answer(completions: Sequence[str], answer_type: str) -> tuple[str, str, int]:
    """(extracted answer of the modal class, its label, its count); ``("", INVALID_LABEL, k)`` if invalid."""
    c = ans.class_answers(list(completions), [], answer_type)
    j = int(np.argmax(c.teacher_counts))  # argmax: ties go to the earliest class
    rep = c.classes[j]
    return ("" if rep.kind == "invalid" else rep.raw), c.labels[j], int(c.teacher_counts[j])


def evaluate_source(model, tokenizer, source, *, metric: str = "auto", n: int = 1, temperature: float = 0.7,
                    max_new_tokens: int = 64, batch_size: int = 8, max_pixels: int | None = None, seed: int = 0,
                    limit: int | None = None, mesh=None, progress: bool = False, name: str = "eval") -> list[dict]:
    """One entry per prompt of ``source`` (first ``limit``): ``status`` ``"scored"`` with
    ``prediction``, ``score`` and ``metric``, or ``"skipped"`` with a ``reason``."""
    import jax

    from jdelta.data.pipeline import PipelineConfig
    from jdelta.sampling import SamplingParams

    if metric not in METRIC_ALIASES:
        raise ValueError(f"--metric {metric!r}: expected one of {sorted(METRIC_ALIASES)}")
    forced = METRIC_ALIASES[metric]
    pcfg = PipelineConfig(batch_size=batch_size, image=image_config_for(model.config, max_pixels), on_error="skip")
    proc = PromptProcessor(source, tokenizer, pcfg)
    params = SamplingParams(temperature=0.0 if n == 1 else float(temperature), max_new_tokens=int(max_new_tokens),
                            stop_token_ids=proc.special.stop_ids, n=int(n))
    sampler = make_sampler(model, mesh=mesh, pad_id=proc.special.pad, batch_size=batch_size)
    total = len(source) if limit is None else min(limit, len(source))
    entries: dict[int, dict] = {}
    good = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"eval {name}", unit="prompt", dynamic_ncols=True)
    for i in range(total):
        ex = proc.process(i)
        if "_skip" in ex:
            entries[i] = {"id": record_id_of(source, i), "index": i, "status": "skipped", "reason": ex["_skip"],
                          "message": ex["message"]}
            if bar is not None:
                bar.update(1)
        elif ex.get("answer") is None:
            entries[i] = {"id": ex["id"], "index": i, "status": "skipped", "reason": "no_reference",
                          "message": f"record {ex['id']!r} has no reference answer"}
            if bar is not None:
                bar.update(1)
        else:
            good.append(ex)
    key = jax.random.key(seed)
    for b, (chunk, batch) in enumerate(proc.batches(good)):
        texts, finish = sample_texts(sampler, tokenizer, batch, params, jax.random.fold_in(key, b))
        for e, comp, fin in zip(chunk, texts, finish, strict=True):
            idx = int(e["record_index"])
            rec = source.to_record(source[idx], idx)
            me = forced or answer_metric_for(rec)
            ty = classing_type_for(rec)
            pred, label, votes = majority_answer(comp, ty)
            refs = references_of(rec)
            score = ans.score_answer(pred, refs, me, rec.answer_type if rec.answer_type != "text" else "auto") if pred else 0.0
            entries[idx] = {"id": rec.id, "index": idx, "status": "scored", "category": rec.category,
                            "family": rec.family, "metric": me, "reference": refs, "prediction": pred,
                            "label": label, "votes": votes, "n": int(n), "score": float(score),
                            "completions": comp[:3], "truncated": int(sum(f == "length" for f in fin))}
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [entries[i] for i in range(total)]


def summarize_benchmark(name: str, entries: Sequence[dict]) -> dict[str, Any]:
    scored = [e for e in entries if e["status"] == "scored"]
    skipped = Counter(e["reason"] for e in entries if e["status"] == "skipped")
    metrics = sorted({e["metric"] for e in scored})
    return {
        "benchmark": name,
        "metric": metrics[0] if len(metrics) == 1 else "+".join(metrics) if metrics else None,
        "prompts": len(entries),
        "scored": len(scored),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "score": float(np.mean([e["score"] for e in scored])) if scored else None,
    }


def results_markdown(rows: Sequence[dict], average: float | None, notes: Sequence[str] = ()) -> str:
    lines = ["# jdelta eval", ""] + [f"> {x}" for x in notes] + ([""] if notes else [])
    lines += ["| benchmark | metric | prompts | scored | skipped | score |", "|---|---|---|---|---|---|"]
    for r in rows:
        sc = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}"
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['prompts']} | {r['scored']} | {r['skipped']} | {sc} |")
    lines.append(f"| **average** | | | | | {'n/a' if average is None else f'{100 * average:.1f}'} |")
    return "\n".join(lines) + "\n"


def run_eval(model_dir: str | os.PathLike, data: str, out: str | os.PathLike, *, metric: str = "auto", n: int = 1,
             temperature: float = 0.7, max_new_tokens: int = 64, batch_size: int = 8, max_pixels: int | None = None,
             seed: int = 0, limit: int | None = None, tokenizer: str | None = None, mesh: str | None = None,
             progress: bool = True, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The ``jdelta eval`` stage as a function; returns ``results.json``'s content."""
    from jdelta.data.tokenizer import load_tokenizer

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if metric not in METRIC_ALIASES:
        raise ValueError(f"--metric {metric!r}: expected one of {sorted(METRIC_ALIASES)}")
    sets = parse_data_spec(data)
    sources = [(name, open_benchmark(path, layout), path) for name, path, layout in sets]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer or model_dir)
    mesh_obj = parse_mesh(mesh)
    model, _ = load_model(model_dir, mesh_obj)
    t0 = time.perf_counter()
    rows = []
    for name, source, _ in sources:
        entries = evaluate_source(model, tok, source, metric=metric, n=n, temperature=temperature,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, max_pixels=max_pixels,
                                  seed=seed, limit=limit, mesh=mesh_obj, progress=progress, name=name)
        with (out / f"predictions-{name}.jsonl").open("w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        rows.append(summarize_benchmark(name, entries))
    scores = [r["score"] for r in rows if r["score"] is not None]
    average = float(np.mean(scores)) if scores else None
    results = {"model": model_identity(model_dir), "decoding": "greedy" if n == 1 else f"majority of {n} samples",
               "benchmarks": rows, "average": average}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(rows, average, notes))
    manifest = {"stage": "eval", "config": {"model": model_identity(model_dir), "data": [
        {"name": nm, "path": str(p), "layout": lay} for nm, p, lay in sets], "metric": metric, "n": n,
        "temperature": temperature if n > 1 else 0.0, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "max_pixels": max_pixels, "seed": seed, "limit": limit},
        "counts": {r["benchmark"]: {k: r[k] for k in ("prompts", "scored", "skipped", "skipped_by_reason")}
                   for r in rows}, "seconds": time.perf_counter() - t0}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF Qwen3-VL checkpoint directory (with tokenizer)")
    parser.add_argument("--data", required=True, help="comma-separated [NAME=]PATH or [NAME=]LAYOUT:DIR")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metric", default="auto", choices=sorted(METRIC_ALIASES))
    parser.add_argument("--n", type=int, default=1, help="1: greedy; >1: majority of n samples")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when n > 1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each benchmark")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        run_eval(args.model, args.data, args.out, metric=args.metric, n=args.n, temperature=args.temperature,
                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_pixels=args.max_pixels,
                 seed=args.seed, limit=args.limit, tokenizer=args.tokenizer, mesh=args.mesh,
                 progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"jdelta eval: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0
