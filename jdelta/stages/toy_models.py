"""Train the toy teacher and student from scratch on the procedural chart world (CPU, minutes).

``jdelta toy-models --out DIR [pair.seed=0]`` writes ``DIR/teacher`` and ``DIR/student`` (Hugging Face
layout, one tokenizer), ``DIR/metrics.json`` and ``DIR/report.md`` (held-out accuracy per family
with intervals, clean and pixelated, and the world's targets). The same config and seed give the
same weights, byte for byte. The pair shipped with jdelta (``jdelta.toy.trained_pair()``, used by
``jdelta demo``) was made by this stage with its defaults; ``docs/toy_world.md`` records every
setting tried.

Resumable: a model directory already complete (its ``toy.json`` is written last) is kept; a
rerun with other settings is refused naming the keys (``--overwrite`` starts over).
"""

from __future__ import annotations

import dataclasses
import json

from jdelta.config import to_dict
from jdelta.runs import RunDir
from jdelta.toy.build import PairConfig, build_pair, report_markdown, target_checks


@dataclasses.dataclass(frozen=True)
class Config:
    """out: run directory. pair: the world, model sizes, training settings and seed
    (:class:`jdelta.toy.build.PairConfig`)."""

    out: str
    pair: PairConfig = dataclasses.field(default_factory=PairConfig)
    overwrite: bool = False
    progress: bool = True


def run(cfg: Config) -> int:
    def log(message: str) -> None:
        if cfg.progress:
            print(message, flush=True)

    with RunDir(cfg.out, "toy-models", config=to_dict(cfg), overwrite=cfg.overwrite,
                ignore=("out", "progress", "overwrite")) as run_dir:
        metrics = build_pair(cfg.pair, run_dir.path, log=log, commit=run_dir.commit)
        metrics["targets"] = target_checks(metrics, cfg.pair.world)
        text = report_markdown(metrics, cfg.pair.world)
        run_dir.write_atomic("metrics.json", json.dumps(metrics, indent=2) + "\n")
        run_dir.write_atomic("report.md", text)
        run_dir.update(complete=True, counts={"heldout": metrics["heldout_rows"]})
    print(text, flush=True)
    return 0
