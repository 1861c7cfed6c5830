"""``jdelta make-seeds``: write a generated chart/table/receipt question dataset with a manifest.

Output directory: ``records.jsonl`` (images inline, or under ``images/`` with ``--image-dir``)
or ``records.array_record``, ``manifest.json`` (config, counts per family / kind / answer type),
and with ``--tokenizer-vocab N`` a demo tokenizer trained on the dataset's text in ``tokenizer/``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from jdelta.data.charts import (
    FAMILIES,
    GeneratorConfig,
    corpus_text,
    family_sequence,
    generate_record,
    iter_records,
)
from jdelta.data.records import write_array_record, write_jsonl


def _parse_mapping(text: str | None, cast, what: str) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--{what}: expected family=value pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        if k.strip() not in FAMILIES:
            raise ValueError(f"--{what}: unknown family {k.strip()!r}; known: {', '.join(FAMILIES)}")
        out[k.strip()] = cast(v)
    return out


def _draw(job: tuple) -> object:
    index, seed, family, config = job
    return generate_record(index, seed, family, config=config)


def _parallel_records(args, families, weights, difficulty):
    """Records in index order, drawn by ``args.workers`` processes (each record depends only on
    (seed, index, family), so the output equals the single-process one)."""
    import multiprocessing

    config = GeneratorConfig(width=args.width, height=args.height, difficulty=difficulty)
    jobs = [
        (i, args.seed, f, config) for i, f in enumerate(family_sequence(args.n, args.seed, families, weights))
    ]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        yield from pool.imap(_draw, jobs, chunksize=32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=10000, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jsonl", "array_record"), default="jsonl")
    parser.add_argument("--families", default=None, help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    parser.add_argument("--family-weights", default=None, help="family=weight,... (relative frequencies)")
    parser.add_argument("--difficulty", default="2", help="1..3 for all families, or family=level,...")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument(
        "--image-dir", action="store_true", help="JSONL only: write images as PNG files under images/"
    )
    parser.add_argument(
        "--tokenizer-vocab", type=int, default=0, help="also train a demo tokenizer of this size"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes drawing records (output is identical)"
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.n < 1:
        raise SystemExit(f"jdelta make-seeds: --n must be >= 1, got {args.n}")
    if (out / "manifest.json").exists() and not args.overwrite:
        raise SystemExit(f"jdelta make-seeds: {out} already holds a dataset (pass --overwrite to replace it)")
    if args.image_dir and args.format != "jsonl":
        raise SystemExit("jdelta make-seeds: --image-dir applies to --format jsonl only")
    try:
        families = [f.strip() for f in args.families.split(",")] if args.families else None
        weights = _parse_mapping(args.family_weights, float, "family-weights")
        difficulty = (
            int(args.difficulty)
            if args.difficulty.isdigit()
            else _parse_mapping(args.difficulty, int, "difficulty")
        )
        # Validate the whole configuration before writing anything.
        next(iter_records(1, args.seed, families, weights, difficulty, width=args.width, height=args.height))
    except ValueError as e:
        raise SystemExit(f"jdelta make-seeds: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    counts = {"family": Counter(), "kind": Counter(), "answer_type": Counter()}
    texts: list[str] = []

    def records():
        if args.workers > 1:
            gen = _parallel_records(args, families, weights, difficulty)
        else:
            gen = iter_records(
                args.n, args.seed, families, weights, difficulty, width=args.width, height=args.height
            )
        for rec in tqdm(gen, total=args.n, desc="make-seeds", unit="rec", mininterval=5.0):
            counts["family"][rec.family] += 1
            counts["kind"][rec.category] += 1
            counts["answer_type"][rec.answer_type] += 1
            if args.tokenizer_vocab:
                texts.extend(corpus_text([rec]))
            yield rec

    start = time.time()
    if args.format == "jsonl":
        path = out / "records.jsonl"
        n = write_jsonl(records(), path, image_dir=out / "images" if args.image_dir else None)
    else:
        path = out / "records.array_record"
        n = write_array_record(records(), path)
    manifest = {
        "stage": "make-seeds",
        "records": path.name,
        "format": args.format,
        "count": n,
        "config": {
            "n": args.n,
            "seed": args.seed,
            "families": families or list(FAMILIES),
            "family_weights": weights,
            "difficulty": difficulty,
            "width": args.width,
            "height": args.height,
            "image_dir": bool(args.image_dir),
        },
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "seconds": round(time.time() - start, 2),
    }
    if args.tokenizer_vocab:
        from jdelta.data.tokenizer import build_demo_tokenizer

        build_demo_tokenizer(out / "tokenizer", texts, vocab_size=args.tokenizer_vocab)
        manifest["tokenizer"] = "tokenizer"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        f"wrote {n} records to {path} ({manifest['seconds']} s); counts per family: {manifest['counts']['family']}"
    )
    return 0
