"""Failure modes + targeted candidates (teacher-as-writer, steered generator) from a `jdelta score` run.

    jdelta synthesize --scores runs/score --out runs/synth [--config FILE] [key=value ...]

Reads the score run's ``scores.jsonl`` and its prompts (``prompts``, default: the path in the
score run's manifest), runs the pipeline's ``modes`` and ``synth`` stages (same code, same
resumable, shardable run directory) and writes ``OUT/candidates.jsonl`` (unscreened) and the
failure-mode report ``OUT/round-00/modes/report.md`` (layout: :mod:`jdelta.synth.synthesize`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jdelta.stages.pipeline import check_processes, log
from jdelta.synth.pipeline_config import SynthesisRunConfig
from jdelta.synth.synthesize import SynthesizeFromScores
from jdelta.synth.unit_runner import WaitingForShards


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(SynthesisRunConfig):
    """scores: a ``jdelta score`` run directory or its scores.jsonl. prompts: the scored prompts
    (default: from the score run's manifest). out: the run directory. num_processes /
    process_index / wait / overwrite / progress: as in ``jdelta pipeline``."""

    scores: str
    out: str
    prompts: str | None = None
    num_processes: int = 1
    process_index: int = 0
    wait: float = 0.0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_processes(self)


def run(cfg: Config) -> int:
    synth = SynthesizeFromScores(cfg.out, cfg, scores=cfg.scores, prompts=cfg.prompts,
                                 process_index=cfg.process_index, num_processes=cfg.num_processes,
                                 wait_seconds=cfg.wait, overwrite=cfg.overwrite, progress=cfg.progress, log=log)
    try:
        m = synth.run()
    except WaitingForShards as e:
        print(f"jdelta synthesize: {e}", file=sys.stderr)
        return 3
    s = m["stages"]["synth"]
    print(f"{s['out']} candidates ({s['writer_questions']} written, {s['steered_records']} steered) in {m['candidates']}; "
          f"failure modes: {Path(cfg.out) / 'round-00' / 'modes' / 'report.md'}")
    return 0
