"""The staged DeltaPrompts pipeline, from seeds to a high-Δ prompt dataset (library of ``jdelta pipeline``).

Per round ``r`` (directory ``RUN/round-RR/``)::

    seeds/         round 0: the seed source (records file or the procedural generator), validated;
                   round r > 0: the previous round's screened prompts, highest Δ first
    score/         teacher + student answers and Δ per seed (round r > 0 reuses the screening scores)
    modes/         failure modes ranked by Δ mass (modes.json, report.md, report.png) and the
                   synthesis plan (jobs.json: writer seeds per targeted mode + steered draws)
    synth/         candidates: teacher-as-writer questions on seed images + steered procedural records
    screen_score/  teacher + student answers and Δ per candidate
    screen/        kept.jsonl: Δ > τ, teacher reliable, deduplicated, balanced
    RUN/output/    records.jsonl (or .array_record) + manifest.json (counts, config, identities)
    RUN/manifest.json  the run's config, input fingerprints, identities and the counts of every stage

Map stages (seeds, score, synth, screen_score) run in units: resumable (a unit with its counts
file is never redone) and shardable (``num_processes`` P, ``process_index`` i: process i runs
units ``u % P == i``; whichever process finds all units merges). Global stages (modes, screen,
output) are cheap and deterministic; any process may run them. Every stage writes ``DONE.json``
(with counts that add up: in = out + dropped by reason) and is skipped once done. All randomness
is derived from (seed, round, stage, unit), so interrupted, resumed and sharded runs produce the
same bytes as one uninterrupted run.

Config: :class:`~jdelta.synth.pipeline_config.PipelineConfig`. Scorers: ``scorer.kind: models``
(teacher and student checkpoints, :func:`jdelta.delta_scoring.score_prompts`) or ``oracle`` (a toy
pair whose student fails configured families; tests and benchmarks). Writers:
``synthesis.writer.kind: teacher`` (the teacher model writes) or ``oracle``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jdelta.data.records import PromptRecord, RecordError
from jdelta.runs import dumps_jsonl, input_fingerprint, read_jsonl, write_atomic, write_json
from jdelta.synth import failure_modes as fm
from jdelta.synth.pipeline_config import PipelineConfig, SourceConfig
from jdelta.synth.screen import screen
from jdelta.synth.synthesize import VERSION, SynthesisRun
from jdelta.synth.unit_runner import derive_seed, stage_outputs


class ProceduralSource:
    """The chart generator as an indexable record source (family sequence fixed by n and seed)."""

    def __init__(self, n: int, seed: int, families=None, difficulty=2, width: int = 128, height: int = 96):
        from jdelta.data.charts import GeneratorConfig, family_sequence

        self.n, self.seed = int(n), int(seed)
        self.families = family_sequence(self.n, self.seed, families, None)
        self.config = GeneratorConfig(width=width, height=height, difficulty=difficulty)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def to_record(self, raw: int, index: int) -> PromptRecord:
        from jdelta.data.charts import generate_record

        return generate_record(index, self.seed, self.families[index], config=self.config)


def open_source(src: SourceConfig, seed: int = 0):
    """A record source from the ``source`` config.

    ``procedural``: :class:`ProceduralSource`. ``records``: jdelta records (``.jsonl``,
    ``.array_record`` or a dataset dir); with ``layout`` (``chartqa``, ``docvqa``, ``infovqa``,
    ``ai2d``, ``charxiv``) a ``.jsonl`` / ``.json`` file of that benchmark's dicts. ``tfds``: a
    prepared TFDS builder dir (``split``, ``layout``). ``hf_disk``: a Hugging Face
    ``save_to_disk`` dir (``layout``, optional ``split``).
    """
    from jdelta.data import records as rd

    if src.kind == "procedural":
        return ProceduralSource(src.n, seed, src.families, src.difficulty, src.width, src.height)
    path = Path(str(src.path))
    if src.kind == "records" and src.layout == "jdelta":
        return rd.open_records(path)
    if src.kind == "records":
        text = path.read_text(encoding="utf-8")
        items = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        return rd.MappedSource(items, src.layout, path.name)
    if src.kind == "tfds":
        return rd.tfds_source(path, src.split or "train", src.layout)
    return rd.hf_disk_source(path, src.layout, src.split)


class Pipeline(SynthesisRun):
    """The DeltaPrompts pipeline in one run directory (see the module docstring and
    :class:`~jdelta.synth.synthesize.SynthesisRun` for the arguments)."""

    STAGE = "pipeline"
    CONFIG = PipelineConfig
    cfg: PipelineConfig

    def uses_models(self) -> dict[str, bool]:
        return {"scorer": self.cfg.scorer.kind == "models", "writer": self.cfg.synthesis.writer.kind == "teacher"}

    def inputs(self) -> dict[str, Any]:
        src = self.cfg.source
        if src.kind != "procedural" and not Path(str(src.path)).exists():
            raise FileNotFoundError(f"source.path {src.path} does not exist")
        seeds = {"source": input_fingerprint(src.path)} if src.kind != "procedural" else {}
        return {**seeds, **super().inputs()}

    def _score_fn(self, name: str, r: int):
        def fn(rows, u):
            recs = [PromptRecord.from_json(x) for x in rows]
            entries = self.scorer.score(recs, derive_seed(self.seed, r, name, u))
            reasons = Counter(e.get("reason", "unknown") for e in entries if e["status"] != "scored")
            return entries, {"in": len(rows), "out": len(entries), "dropped": {},
                             "scored": len(entries) - sum(reasons.values()), "skipped_by_reason": dict(reasons)}
        return fn

    # --------------------------------------------------------------------- stages

    def stage_seeds(self, r: int) -> dict:
        d = self.dir / f"round-{r:02d}" / "seeds"
        if r > 0:
            prev = self.dir / f"round-{r - 1:02d}" / "screen"

            def carry(out: Path) -> dict:
                kept = read_jsonl(prev / "kept.jsonl")
                kept.sort(key=lambda x: (-x["provenance"]["screening"]["delta"], x["id"]))
                limit = int(self.cfg.synthesis.next_round_seeds)
                write_atomic(out / "out.jsonl", dumps_jsonl(kept[:limit]))
                return {"in": len(kept), "out": min(limit, len(kept)),
                        "dropped": {"beyond_next_round_seeds": max(0, len(kept) - limit)}}
            return self._global(d, "seeds", carry)
        source = open_source(self.cfg.source, self.seed)

        def fn(indices, u):
            out, dropped = [], Counter()
            for i in indices:
                try:
                    rec = source.to_record(source[i], i)
                except RecordError as e:
                    dropped[e.reason] += 1
                    self.log(f"[seeds] dropped source item {i}: {e}")
                    continue
                except Exception as e:  # an unreadable item is dropped with a reason, not a crash
                    dropped["unreadable"] += 1
                    self.log(f"[seeds] dropped source item {i}: {type(e).__name__}: {e}")
                    continue
                rec.provenance = {"stage": "seed", "round": 0, **dict(rec.provenance or {})}
                out.append(rec.to_json())
            return out, {"in": len(indices), "out": len(out), "dropped": dict(dropped)}
        return self._map(d, "seeds", list(range(len(source))), fn)

    def stage_score(self, r: int) -> dict:
        d = self.dir / f"round-{r:02d}" / "score"
        seeds = stage_outputs(self.dir / f"round-{r:02d}" / "seeds")
        if r > 0:
            prev = self.dir / f"round-{r - 1:02d}" / "screen_score"

            def reuse(out: Path) -> dict:
                by_id = {e["id"]: e for e in stage_outputs(prev)}
                entries = [by_id[s["id"]] for s in seeds]
                write_atomic(out / "out.jsonl", dumps_jsonl(entries))
                return {"in": len(seeds), "out": len(entries), "dropped": {}, "reused_screening_scores": len(entries)}
            return self._global(d, "score", reuse)
        return self._map(d, "score", seeds, self._score_fn("score", r))

    def stage_screen_score(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        return self._map(rd / "screen_score", "screen_score", stage_outputs(rd / "synth"),
                         self._score_fn("screen_score", r))

    def stage_screen(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        sc = self.cfg.screen

        def fn(out: Path) -> dict:
            existing = [x for q in range(r) for x in read_jsonl(self.dir / f"round-{q:02d}" / "screen" / "kept.jsonl")]
            kept, counts = screen(stage_outputs(rd / "synth"), stage_outputs(rd / "screen_score"), tau=float(sc.tau),
                                  metric=self.metric, min_teacher_accuracy=sc.min_teacher_accuracy,
                                  near_duplicate=float(sc.near_duplicate), shares=sc.shares,
                                  balance_by=sc.balance_by, existing=existing)
            write_atomic(out / "kept.jsonl", dumps_jsonl(kept))
            return counts
        return self._global(rd / "screen", "screen", fn)

    def stage_output(self) -> dict:
        oc = self.cfg.output
        tau = float(self.cfg.screen.tau)
        zt = self.cfg.failure_modes.zero_delta_test

        def fn(out: Path) -> dict:
            rows: list[dict] = []
            dropped: Counter = Counter()
            n_in = 0
            if oc.include_seeds:
                seeds = stage_outputs(self.dir / "round-00" / "seeds")
                entries = stage_outputs(self.dir / "round-00" / "score")
                n_in += len(seeds)
                for s, e in zip(seeds, entries, strict=True):
                    if e["status"] != "scored":
                        dropped["seed_skipped_by_scorer"] += 1
                    elif (e.get("zero_delta") or {}).get(zt) or fm.delta_of(e, self.metric) <= tau:
                        dropped["seed_low_delta"] += 1
                    else:
                        s = dict(s)
                        s["provenance"] = {**s["provenance"], "screening": {
                            "delta": fm.delta_of(e, self.metric), "metric": self.metric,
                            "teacher_accuracy": e.get("teacher_accuracy"), "student_accuracy": e.get("student_accuracy"),
                            "p_value": e.get("p_value")}}
                        rows.append(s)
            n_seed_rows = len(rows)
            for r in range(int(self.cfg.rounds)):
                kept = read_jsonl(self.dir / f"round-{r:02d}" / "screen" / "kept.jsonl")
                n_in += len(kept)
                rows += kept
            if oc.format == "jsonl":
                write_atomic(out / "records.jsonl", dumps_jsonl(rows))
            else:
                from jdelta.data.records import write_array_record

                tmp = out / f".records.{time.monotonic_ns()}.array_record"
                write_array_record((PromptRecord.from_json(x) for x in rows), tmp)
                tmp.replace(out / "records.array_record")
            seed_fam = Counter(x.get("family") or "(none)" for x in stage_outputs(self.dir / "round-00" / "seeds"))
            syn_fam = Counter(x.get("family") or "(none)" for x in rows[n_seed_rows:])
            gen = Counter(x["provenance"].get("generator", "seed") if x["provenance"].get("stage") == "synthesis"
                          else "seed" for x in rows)
            counts = {"in": n_in, "out": len(rows), "dropped": dict(dropped), "seed_records": n_seed_rows,
                      "synthesized_records": len(rows) - n_seed_rows, "by_generator": dict(sorted(gen.items()))}
            write_json(out / "manifest.json", {
                "stage": "output", "version": VERSION, "records": "records." + oc.format, "count": len(rows),
                "counts": counts, "config": self._config_dict(), "scorer": self.scorer_identity(),
                "writer": self.writer_identity(),
                "family_share": {"seeds": _shares(seed_fam), "synthesized": _shares(syn_fam)},
            })
            return counts
        return self._global(self.dir / "output", "output", fn)

    # --------------------------------------------------------------------- driver

    def plan(self) -> list[tuple[str, Callable[[], dict]]]:
        steps: list[tuple[str, Callable[[], dict]]] = []
        for r in range(int(self.cfg.rounds)):
            for name in ("seeds", "score", "modes", "synth", "screen_score", "screen"):
                steps.append((f"round-{r:02d}/{name}", lambda r=r, name=name: getattr(self, f"stage_{name}")(r)))
        steps.append(("output", self.stage_output))
        return steps

    def final_stage(self) -> Path:
        return self.dir / "output"

    def manifest_fields(self) -> dict[str, Any]:
        return {**super().manifest_fields(), "scorer": self.scorer_identity(), "output": str(self.dir / "output")}


def _shares(c: Counter) -> dict[str, float]:
    tot = sum(c.values())
    return {k: round(v / tot, 6) for k, v in sorted(c.items())} if tot else {}


def run_pipeline(run_dir: str | Path, config: PipelineConfig | dict, **kw) -> dict:
    """Library entry point: ``Pipeline(run_dir, config, **kw).run()``."""
    return Pipeline(run_dir, config, **kw).run()
