"""``jdelta synthesize``: failure modes and targeted candidates from an existing ``jdelta score`` run.

Reads the score run's ``scores.jsonl`` and its prompts (``--prompts``, default: the path in the
score run's manifest), then runs the pipeline's ``modes`` and ``synth`` stages (same code, same
resumable, shardable run directory layout) and writes::

    OUT/round-00/modes/report.md, report.png, modes.json, jobs.json
    OUT/candidates.jsonl     the candidates (teacher-as-writer + steered), with provenance
    OUT/manifest.json        config, counts per stage, writer identity

The candidates are not screened: score them (``jdelta score --prompts OUT/candidates.jsonl``) or
run ``jdelta pipeline`` for the full loop with screening and rounds.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from jdelta.config import load_config
from jdelta.synth.pipeline import Pipeline
from jdelta.synth.units import (
    WaitingForShards,
    dumps_jsonl,
    read_json,
    read_jsonl,
    write_atomic,
    write_json,
)


class SynthesizeFromScores(Pipeline):
    """A :class:`Pipeline` whose round-0 seeds and scores are imported from a ``jdelta score`` run."""

    def __init__(self, run_dir, config, *, scores: str | Path, prompts: str | Path | None = None, **kw):
        scores = Path(scores)
        self.scores_path = scores / "scores.jsonl" if scores.is_dir() else scores
        if not self.scores_path.is_file():
            raise FileNotFoundError(f"{self.scores_path}: no scores (run `jdelta score` first, or pass its scores.jsonl)")
        if prompts is None:
            man = self.scores_path.parent / "manifest.json"
            if not man.is_file():
                raise FileNotFoundError(f"{man}: not found; pass --prompts")
            prompts = read_json(man)["config"]["prompts"]["path"]
        self.prompts_path = Path(prompts)
        config = {**dict(config), "rounds": 1, "inputs": {"scores": str(self.scores_path.resolve()),
                                                           "prompts": str(self.prompts_path.resolve())}}
        super().__init__(run_dir, config, **kw)

    def stage_seeds(self, r: int) -> dict:
        from jdelta.data.records import RecordError, open_records

        def fn(out: Path) -> dict:
            src = open_records(self.prompts_path)
            rows, dropped = [], Counter()
            for i in range(len(src)):
                try:
                    rows.append(src.to_record(src[i], i).to_json())
                except (RecordError, OSError) as e:
                    dropped[getattr(e, "reason", "unreadable")] += 1
            write_atomic(out / "out.jsonl", dumps_jsonl(rows))
            return {"in": len(src), "out": len(rows), "dropped": dict(dropped)}
        return self._global(self.dir / "round-00" / "seeds", "seeds", fn)

    def stage_score(self, r: int) -> dict:
        def fn(out: Path) -> dict:
            entries = read_jsonl(self.scores_path)
            write_atomic(out / "out.jsonl", dumps_jsonl(entries))
            return {"in": len(entries), "out": len(entries), "dropped": {}, "imported_from": 0}
        return self._global(self.dir / "round-00" / "score", "score", fn)

    def run(self) -> dict:
        stages: dict[str, Any] = {}
        for name in ("seeds", "score", "modes", "synth"):
            stages[name] = getattr(self, f"stage_{name}")(0)["counts"]
        cand = self.dir / "round-00" / "synth" / "out.jsonl"
        write_atomic(self.dir / "candidates.jsonl", cand.read_bytes())
        manifest = {"stage": "synthesize", "complete": True, "config": self.cfg, "writer": self.writer_identity(),
                    "stages": stages, "candidates": str(self.dir / "candidates.jsonl")}
        write_json(self.dir / "manifest.json", manifest)
        return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="a `jdelta score` run directory or its scores.jsonl")
    parser.add_argument("--prompts", default=None, help="the scored prompts (default: from the score manifest)")
    parser.add_argument("--out", required=True, help="output run directory (resumed if it exists)")
    parser.add_argument("--config", default=None, help="YAML config (failure_modes, synthesis, scorer for the writer)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-index", type=int, default=0)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for other processes' units")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        m = SynthesizeFromScores(args.out, cfg, scores=args.scores, prompts=args.prompts,
                                 process_index=args.process_index, num_processes=args.num_processes,
                                 wait_seconds=args.wait).run()
    except WaitingForShards as e:
        print(f"jdelta synthesize: {e}", file=sys.stderr)
        return 3
    s = m["stages"]["synth"]
    print(f"{s['out']} candidates ({s['writer_questions']} written, {s['steered_records']} steered) in {m['candidates']}; "
          f"failure modes: {Path(args.out) / 'round-00' / 'modes' / 'report.md'}")
    return 0
