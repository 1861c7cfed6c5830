"""Records/s of the data path on this machine: the generator, and the full prompt pipeline
(read JSONL -> parse -> decode PNG -> Qwen3-VL image processing -> chat template + tokenise ->
bucketed padding and batching).

    python benchmarks/data.py                         # 512 records, 384x288, batch 16
    python benchmarks/data.py --n 2000 --workers 0 1 2 --batch 16

Prints a table. The pipeline runs one warm-up batch, then times a full pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.image_processor import ImageConfig
from jdelta.data.pipeline import PipelineConfig, make_prompt_batches
from jdelta.data.records import JsonlSource, write_jsonl
from jdelta.data.tokenizer import build_demo_tokenizer


def time_pipeline(source, tok, cfg: PipelineConfig) -> tuple[float, int, float]:
    """(records/s over the timed pass, records seen, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = make_prompt_batches(source, tokenizer=tok, seed=0, config=cfg, process_index=0, process_count=1)
    first = next(it)
    t_first = time.perf_counter() - t0
    n = int((first["record_index"] >= 0).sum())
    t1 = time.perf_counter()
    n_timed = 0
    for batch in it:
        n_timed += int((batch["record_index"] >= 0).sum())
    dt = time.perf_counter() - t1
    return n_timed / dt, n + n_timed, t_first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        records = generate_records(args.n, seed=0, width=args.width, height=args.height)
        gen_dt = time.perf_counter() - t
        rows.append(("generate (draw + PNG encode)", "-", f"{args.n / gen_dt:,.0f}", "-"))
        write_jsonl(records, Path(d) / "records.jsonl")
        tok = build_demo_tokenizer(Path(d) / "tok", corpus_text(records), vocab_size=2048)
        source = JsonlSource(Path(d) / "records.jsonl")
        image = ImageConfig(min_pixels=32 * 32 * 4, max_pixels=args.max_pixels)
        for workers in args.workers:
            cfg = PipelineConfig(
                batch_size=args.batch, image=image, seq_buckets=(256, 512, 1024), worker_count=workers
            )
            rps, seen, first = time_pipeline(source, tok, cfg)
            assert seen == args.n, (seen, args.n)
            rows.append(
                (f"pipeline, {workers} worker process(es)", str(args.batch), f"{rps:,.0f}", f"{first:.2f}")
            )
            rows.append(("  = batches/s", str(args.batch), f"{rps / args.batch:,.1f}", ""))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{args.n} records, {args.width}x{args.height} PNG charts, max_pixels {args.max_pixels}; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load:.1f}\n"
    )
    print(f"| {'stage':<36} | batch | records/s | first batch (s) |")
    print(f"| {'-' * 36} | ----: | --------: | --------------: |")
    for name, b, rps, first in rows:
        print(f"| {name:<36} | {b:>5} | {rps:>9} | {first:>15} |")


if __name__ == "__main__":
    main()
