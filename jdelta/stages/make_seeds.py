"""Generate chart/table/receipt questions with exact answers (a seed dataset in a run directory).

Run directory: ``records.jsonl`` (images inline, or as PNGs under ``images/`` with ``image_dir``)
or ``records.array_record``; ``manifest.json`` (config, counts per family / kind / answer type);
with ``tokenizer_vocab N`` a demo tokenizer trained on the dataset's text in ``tokenizer/``.
Lists and per-family mappings take YAML (``families=[trend,total]``, ``difficulty={trend: 3}``)
or the comma forms ``--families trend,total`` and ``--difficulty trend=3,total=1``.
A rerun with the same settings finds the dataset complete; other settings need ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Literal

from pydantic import BeforeValidator

from jdelta.config import check, to_dict
from jdelta.data.charts import FAMILIES
from jdelta.data.make_seeds import SeedCounts, draw_records, parse_family_mapping, write_records
from jdelta.runs import RunDir


def comma_list(value):
    """``"a,b"`` -> ``("a", "b")``; anything else unchanged (the type check decides)."""
    return tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else value


def family_mapping(cast):
    """A validator turning ``"trend=3,total=1"`` into ``{"trend": 3, "total": 1}``."""
    def parse(value):
        if isinstance(value, str) and "=" in value:
            return parse_family_mapping(value, cast, "family=value pairs")
        return value
    return BeforeValidator(parse)


@dataclasses.dataclass(frozen=True)
class Config:
    """out: run directory. n: records. seed: dataset seed (each record depends on (seed, index, family)).
    families: subset of the question families (None: all). family_weights: relative frequency per
    family (missing ones weigh 1). difficulty: 1..3 for all families, or per family.
    image_dir: JSONL only, images as PNG files. tokenizer_vocab: also train a demo tokenizer of this
    size (0: none). workers: processes drawing records (the output is identical).
    """

    out: str
    n: int = 10000
    seed: int = 0
    format: Literal["jsonl", "array_record"] = "jsonl"
    families: Annotated[tuple[str, ...] | None, BeforeValidator(comma_list)] = None
    family_weights: Annotated[dict[str, float] | None, family_mapping(float)] = None
    difficulty: Annotated[int | dict[str, int], family_mapping(int)] = 2
    width: int = 384
    height: int = 288
    image_dir: bool = False
    tokenizer_vocab: int = 0
    workers: int = 1
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        check(self.height >= 1, "height", f"must be >= 1, got {self.height}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(self.tokenizer_vocab >= 0, "tokenizer_vocab", f"must be >= 0, got {self.tokenizer_vocab}")
        check(not self.image_dir or self.format == "jsonl", "image_dir", "applies to format jsonl only")
        per_family = {"families": self.families, "family_weights": self.family_weights,
                      "difficulty": self.difficulty if isinstance(self.difficulty, dict) else None}
        for name, value in per_family.items():
            unknown = [f for f in value or () if f not in FAMILIES]
            check(not unknown, name, f"unknown family {unknown[0] if unknown else ''!r}; known: {', '.join(FAMILIES)}")
        weights = list((self.family_weights or {}).values())
        check(all(w >= 0 for w in weights) and (not weights or sum(weights) > 0), "family_weights",
              f"must be >= 0 with a positive sum, got {self.family_weights}")
        levels = self.difficulty.values() if isinstance(self.difficulty, dict) else [self.difficulty]
        check(all(d in (1, 2, 3) for d in levels), "difficulty", f"levels must be 1, 2 or 3, got {self.difficulty}")


def run(cfg: Config) -> int:
    from tqdm import tqdm

    gen_args = dict(families=cfg.families, family_weights=cfg.family_weights, difficulty=cfg.difficulty,
                    width=cfg.width, height=cfg.height)
    next(draw_records(1, cfg.seed, **gen_args))  # the whole configuration is valid before anything is written
    with RunDir(cfg.out, "make-seeds", config=to_dict(cfg), overwrite=cfg.overwrite,
                ignore=("workers", "overwrite", "progress")) as run_dir:
        if run_dir.previous.get("complete"):
            print(f"{run_dir.path} already holds this dataset ({run_dir.previous.get('count')} records); "
                  "nothing to do (overwrite=true regenerates it)")
            run_dir.update(**{k: v for k, v in run_dir.previous.items()
                              if k in ("records", "format", "count", "counts", "seconds", "tokenizer")},
                           complete=True)
            return 0
        start = time.time()
        counts = SeedCounts(keep_text=cfg.tokenizer_vocab > 0)
        records = draw_records(cfg.n, cfg.seed, workers=cfg.workers, **gen_args)
        records = tqdm(counts.observe(records), total=cfg.n, desc="make-seeds", unit="rec", mininterval=5.0,
                       disable=not cfg.progress)
        path, n = write_records(records, run_dir.path, cfg.format, image_dir=cfg.image_dir)
        run_dir.commit()
        fields = {"records": path.name, "format": cfg.format, "count": n, "counts": counts.as_dict()}
        if cfg.tokenizer_vocab:
            from jdelta.data.tokenizer import build_demo_tokenizer

            build_demo_tokenizer(run_dir.path / "tokenizer", counts.texts, vocab_size=cfg.tokenizer_vocab)
            fields["tokenizer"] = "tokenizer"
        fields["seconds"] = round(time.time() - start, 2)
        run_dir.update(**fields, complete=True)
    print(f"wrote {n} records to {path} ({fields['seconds']} s); counts per family: {fields['counts']['family']}")
    return 0
