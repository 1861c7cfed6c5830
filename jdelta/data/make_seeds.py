"""Generated seed datasets: draw chart/table/receipt records (optionally in parallel) and write them.

The ``jdelta make-seeds`` stage (:mod:`jdelta.stages.make_seeds`) wraps this in a run directory.
Each record depends only on ``(seed, index, family)``, so the output does not depend on the
number of worker processes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jdelta.data.charts import GeneratorConfig, corpus_text, family_sequence, generate_record
from jdelta.data.records import PromptRecord, write_array_record, write_jsonl

RECORDS_FILE = {"jsonl": "records.jsonl", "array_record": "records.array_record"}


def parse_family_mapping(text: str, cast, what: str) -> dict[str, Any]:
    """``"trend=3,total=1"`` -> ``{"trend": cast("3"), "total": cast("1")}`` (names are not checked)."""
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"{what}: expected family=value pairs separated by commas, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            out[k] = cast(v)
        except ValueError:
            raise ValueError(f"{what}: {k}={v!r} is not a {cast.__name__}") from None
    return out


def _draw(job: tuple) -> PromptRecord:
    index, seed, family, config = job
    return generate_record(index, seed, family, config=config)


def draw_records(n: int, seed: int, families: Sequence[str] | None = None,
                 family_weights: Mapping[str, float] | None = None, difficulty: int | Mapping[str, int] = 2, *,
                 width: int = 384, height: int = 288, workers: int = 1) -> Iterator[PromptRecord]:
    """Records ``0 .. n-1`` in index order, drawn by ``workers`` processes (same records for any count)."""
    config = GeneratorConfig(width=width, height=height, difficulty=difficulty)
    jobs = [(i, seed, f, config) for i, f in enumerate(family_sequence(n, seed, families, family_weights))]
    if workers <= 1:
        yield from map(_draw, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_draw, jobs, chunksize=32)


def write_records(records: Iterator[PromptRecord], out_dir: str | os.PathLike, fmt: str = "jsonl", *,
                  image_dir: bool = False) -> tuple[Path, int]:
    """Write ``records`` to ``out_dir/records.{jsonl,array_record}`` (images inline, or as PNGs under
    ``out_dir/images`` for JSONL with ``image_dir``). The file is written under a temporary name
    and renamed when complete. Returns ``(path, count)``."""
    out = Path(out_dir)
    path = out / RECORDS_FILE[fmt]
    tmp = out / f".{path.name}.tmp"
    if fmt == "jsonl":
        n = write_jsonl(records, tmp, image_dir=out / "images" if image_dir else None)
    elif image_dir:
        raise ValueError("image_dir applies to format jsonl only")
    else:
        n = write_array_record(records, tmp)
    os.replace(tmp, path)
    return path, n


class SeedCounts:
    """Running counts of drawn records per family, kind and answer type (and their text, if kept)."""

    def __init__(self, keep_text: bool = False):
        self.counts = {"family": Counter(), "kind": Counter(), "answer_type": Counter()}
        self.texts: list[str] | None = [] if keep_text else None

    def observe(self, records: Iterator[PromptRecord]) -> Iterator[PromptRecord]:
        for rec in records:
            self.counts["family"][rec.family] += 1
            self.counts["kind"][rec.category] += 1
            self.counts["answer_type"][rec.answer_type] += 1
            if self.texts is not None:
                self.texts.extend(corpus_text([rec]))
            yield rec

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(sorted(v.items())) for k, v in self.counts.items()}
