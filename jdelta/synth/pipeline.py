"""``jdelta pipeline``: the staged DeltaPrompts pipeline, from seeds to a high-Δ prompt dataset.

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
    RUN/manifest.json  the run's config, identities and the counts of every stage

Map stages (seeds, score, synth, screen_score) run in units: resumable (a unit with its counts
file is never redone) and shardable (``--num-processes P --process-index i``: process i runs units
``u % P == i``; whichever process finds all units merges). Global stages (modes, screen, output)
are cheap and deterministic; any process may run them. Every stage writes ``DONE.json`` (with
counts that add up: in = out + dropped by reason) and is skipped once done. All randomness is
derived from (seed, round, stage, unit), so interrupted, resumed and sharded runs produce the
same bytes as one uninterrupted run.

Scorers: ``scorer.kind: models`` (teacher and student checkpoints, :func:`jdelta.delta_scoring.score_prompts`)
or ``oracle`` (a toy pair whose student fails configured families; tests and benchmarks).
Writers: ``synthesis.writer.kind: teacher`` (the teacher model writes) or ``oracle``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jdelta.config import load_config, merge
from jdelta.data.records import PromptRecord, RecordError
from jdelta.synth import failure_modes as fm
from jdelta.synth.screen import screen
from jdelta.synth.steered import steered_plan, steered_record, steering_weights
from jdelta.synth.units import (
    WaitingForShards,
    derive_seed,
    dumps_jsonl,
    read_json,
    read_jsonl,
    run_global_stage,
    run_map_stage,
    stage_done,
    stage_outputs,
    write_atomic,
    write_json,
)
from jdelta.synth.writer import OracleWriter, build_instruction, candidate_record, parse_generation

VERSION = 1

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "rounds": 1,
    "unit_size": 64,
    "source": {"kind": "procedural", "path": None, "layout": None, "split": None, "n": 256, "families": None,
               "difficulty": 2, "width": 128, "height": 96},
    "scorer": {"kind": "oracle", "failing_families": ["trend"], "n": 8, "fail_rate": 0.85,
               "teacher_noise": 0.05, "student_noise": 0.05, "metric": "tv",
               "num_permutations": 99, "num_posterior_draws": 100,
               "teacher": None, "student": None, "tokenizer": None, "mesh": None, "settings": {}},
    "failure_modes": {"group_by": "family", "zero_delta_test": "exact", "consistency": 0.75,
                      "targets": list(fm.DEFAULT_TARGETS), "top": None},
    "synthesis": {
        "writer": {"kind": "oracle", "seeds": 64, "k": 3, "malformed_rate": 0.25, "temperature": 0.7,
                   "top_p": 0.95, "max_new_tokens": 256, "near_duplicate": 0.8},
        "steered": {"n": 64, "floor": 0.05, "width": 128, "height": 96},
        "next_round_seeds": 256,
    },
    "screen": {"tau": 0.0, "min_teacher_accuracy": 0.5, "near_duplicate": 0.8, "shares": {},
               "balance_by": "family"},
    "output": {"include_seeds": True, "format": "jsonl"},
}


def allocate(budget: int, masses: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split ``budget`` over items in proportion to ``masses`` (largest remainder), each at most its
    cap; what a capped item cannot take goes to the others in order. Pure."""
    out = [0] * len(masses)
    left = int(budget)
    active = [i for i, c in enumerate(caps) if c > 0 and masses[i] > 0]
    while left > 0 and active:
        tot = sum(masses[i] for i in active)
        share = {i: left * masses[i] / tot for i in active}
        give = {i: min(int(share[i]), caps[i] - out[i]) for i in active}
        rem = left - sum(give.values())
        for i in sorted(active, key=lambda i: (-(share[i] - int(share[i])), i)):
            if rem <= 0:
                break
            if out[i] + give[i] < caps[i]:
                give[i] += 1
                rem -= 1
        if sum(give.values()) == 0:
            break
        for i, g in give.items():
            out[i] += g
        left = budget - sum(out)
        active = [i for i in active if out[i] < caps[i]]
    return out


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


def open_source(src: Mapping[str, Any]):
    """A record source from the ``source`` config (kinds other than ``procedural``).

    ``records``: jdelta records (``.jsonl``, ``.array_record`` or a dataset dir); with ``layout``
    (``chartqa``, ``docvqa``, ``infovqa``, ``ai2d``, ``charxiv``) a ``.jsonl`` / ``.json`` file of
    that benchmark's dicts. ``tfds``: a prepared TFDS builder dir (``split``, ``layout``).
    ``hf_disk``: a Hugging Face ``save_to_disk`` dir (``layout``, optional ``split``).
    """
    from jdelta.data import records as rd

    kind, path, layout = src.get("kind"), src.get("path"), src.get("layout") or "jdelta"
    if not path:
        raise ValueError(f"source.kind={kind} needs source.path")
    if kind == "records" and layout == "jdelta":
        return rd.open_records(path)
    if kind == "records":
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        items = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        return rd.MappedSource(items, layout, p.name)
    if kind == "tfds":
        return rd.tfds_source(path, src.get("split") or "train", layout)
    if kind == "hf_disk":
        return rd.hf_disk_source(path, layout, src.get("split"))
    raise ValueError(f"source.kind must be procedural, records, tfds or hf_disk; got {kind!r}")


class Pipeline:
    """One run directory, its config, scorer and writer; stages as methods (see module docstring)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any],
        *,
        scorer=None,
        writer=None,
        process_index: int = 0,
        num_processes: int = 1,
        wait_seconds: float = 0.0,
        after_unit: Callable[[str, int], None] | None = None,
        overwrite: bool = False,
        log: Callable[[str], None] | None = print,
        progress: bool = False,
    ):
        self.dir = Path(run_dir)
        self.cfg = merge(DEFAULTS, config)
        self.seed = int(self.cfg["seed"])
        self.p, self.P, self.wait = int(process_index), int(num_processes), float(wait_seconds)
        self.after_unit = after_unit
        self.log = log or (lambda s: None)
        self.progress = progress
        self._scorer, self._writer = scorer, writer
        self.seconds: dict[str, float] = {}  # stage -> seconds spent in this process
        self.metric = self.cfg["scorer"]["metric"]
        self._check_config(overwrite)

    # --------------------------------------------------------------------- setup

    def _check_config(self, overwrite: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.dir / "config.json"
        want = json.dumps(self.cfg, sort_keys=True, default=str)
        if p.is_file() and json.dumps(read_json(p), sort_keys=True, default=str) != want:
            if not overwrite:
                raise ValueError(f"{self.dir} holds a pipeline run with a different config; use a new run "
                                 "directory or --overwrite to discard that run's stages")
            import shutil

            for d in [*self.dir.glob("round-[0-9][0-9]"), self.dir / "output", self.dir / "manifest.json"]:
                if d.is_dir():
                    shutil.rmtree(d)
                elif d.exists():
                    d.unlink()
        write_atomic(p, json.dumps(self.cfg, indent=2, sort_keys=True, default=str) + "\n")

    @property
    def scorer(self):
        if self._scorer is None:
            sc = self.cfg["scorer"]
            if sc["kind"] == "oracle":
                from jdelta.synth.pair_scorers import OraclePairScorer

                self._scorer = OraclePairScorer(sc["failing_families"], n=sc["n"], fail_rate=sc["fail_rate"],
                                                teacher_noise=sc["teacher_noise"], student_noise=sc["student_noise"],
                                                metric=sc["metric"], unit_pad=int(self.cfg["unit_size"]),
                                                num_permutations=sc["num_permutations"],
                                                num_posterior_draws=sc["num_posterior_draws"])
            elif sc["kind"] == "models":
                from jdelta.synth.pair_scorers import ModelPairScorer

                if not sc["teacher"] or not sc["student"]:
                    raise ValueError("scorer.kind=models needs scorer.teacher and scorer.student checkpoint dirs")
                self._scorer = ModelPairScorer(sc["teacher"], sc["student"], tokenizer=sc["tokenizer"],
                                               mesh=sc["mesh"], settings={**sc["settings"], "metric": sc["metric"]})
            else:
                raise ValueError(f"scorer.kind must be 'oracle' or 'models', got {sc['kind']!r}")
        return self._scorer

    @property
    def writer(self):
        if self._writer is None:
            wc = self.cfg["synthesis"]["writer"]
            if wc["kind"] == "oracle":
                self._writer = OracleWriter(wc["k"], wc["malformed_rate"])
            elif wc["kind"] == "teacher":
                if not hasattr(self.scorer, "teacher_writer"):
                    raise ValueError("synthesis.writer.kind=teacher needs scorer.kind=models")
                self._writer = self.scorer.teacher_writer(temperature=wc["temperature"], top_p=wc["top_p"],
                                                          max_new_tokens=wc["max_new_tokens"])
            else:
                raise ValueError(f"synthesis.writer.kind must be 'oracle' or 'teacher', got {wc['kind']!r}")
        return self._writer

    def _map(self, d: Path, name: str, items, fn) -> dict:
        t0 = time.perf_counter()
        bar = None
        if self.progress and not stage_done(d):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"{d.parent.name}/{name}", unit="item", dynamic_ncols=True, leave=False)
        try:
            done = run_map_stage(d, name, items, int(self.cfg["unit_size"]), fn, process_index=self.p,
                                 num_processes=self.P, wait_seconds=self.wait, after_unit=self.after_unit,
                                 progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        self.seconds[str(d.relative_to(self.dir))] = round(time.perf_counter() - t0, 3)
        self.log(f"[{name}] {d.relative_to(self.dir)}: {_short(done['counts'])} ({time.perf_counter() - t0:.1f} s)")
        return done

    def _global(self, d: Path, name: str, fn) -> dict:
        t0 = time.perf_counter()
        was_done = stage_done(d)
        done = run_global_stage(d, name, fn)
        if self.after_unit is not None and not was_done:
            self.after_unit(name, 0)
        self.seconds[str(d.relative_to(self.dir))] = round(time.perf_counter() - t0, 3)
        self.log(f"[{name}] {d.relative_to(self.dir)}: {_short(done['counts'])} ({time.perf_counter() - t0:.1f} s)")
        return done

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
                limit = int(self.cfg["synthesis"]["next_round_seeds"])
                write_atomic(out / "out.jsonl", dumps_jsonl(kept[:limit]))
                return {"in": len(kept), "out": min(limit, len(kept)),
                        "dropped": {"beyond_next_round_seeds": max(0, len(kept) - limit)}}
            return self._global(d, "seeds", carry)
        src_cfg = self.cfg["source"]
        if src_cfg["kind"] == "procedural":
            source = ProceduralSource(src_cfg["n"], self.seed, src_cfg["families"], src_cfg["difficulty"],
                                      src_cfg["width"], src_cfg["height"])
        else:
            source = open_source(src_cfg)

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

    def stage_modes(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        fc, sc = self.cfg["failure_modes"], self.cfg["synthesis"]

        def fn(out: Path) -> dict:
            seeds = stage_outputs(rd / "seeds")
            entries = stage_outputs(rd / "score")
            analysis = fm.failure_modes(entries, group_by=fc["group_by"], metric=self.metric,
                                        zero_delta_test=fc["zero_delta_test"], consistency=fc["consistency"])
            write_json(out / "modes.json", analysis)
            write_atomic(out / "report.md", fm.report_markdown(analysis, title=f"Failure modes, round {r}"))
            fm.plot_modes(analysis, out / "report.png")
            targets = fm.target_modes(analysis, fc["targets"], fc["top"])
            # Writer: seeds per targeted mode in proportion to Δ mass, highest-Δ seeds first.
            n_ids = [len(m["ids"]) for m in targets]
            quota = allocate(int(sc["writer"]["seeds"]), [m["delta_mass"] for m in targets], n_ids)
            jobs: list[dict] = []
            for m, q in zip(targets, quota, strict=True):
                mode = {"group": m["group"], "outcome": m["outcome"]}
                jobs += [{"kind": "writer", "seed_id": i, "mode": mode} for i in m["ids"][:q]]
            # Steered generator: families and difficulty in proportion to Δ mass.
            difficulty = {s["id"]: (s.get("meta") or {}).get("difficulty", 2) for s in seeds}
            steer = steering_weights(targets, difficulty, floor=float(sc["steered"]["floor"]))
            plan = steered_plan(int(sc["steered"]["n"]), steer["weights"], derive_seed(self.seed, r, "steered"))
            jobs += [{"kind": "steered", "index": i, "family": f, "difficulty": lv,
                      "weight": steer["weights"][f"{f}/{lv}"]} for i, (f, lv) in enumerate(plan)]
            write_json(out / "jobs.json", {"jobs": jobs, "steering": steer})
            return {**analysis["counts"], "writer_jobs": sum(quota), "steered_jobs": len(plan),
                    "targeted_modes": len(targets)}
        return self._global(rd / "modes", "modes", fn)

    def stage_synth(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        jobs = read_json(rd / "modes" / "jobs.json")["jobs"]
        wc, stc = self.cfg["synthesis"]["writer"], self.cfg["synthesis"]["steered"]
        seeds_by_id: dict[str, dict] | None = None

        def fn(unit_jobs, u):
            nonlocal seeds_by_id
            out: list[dict] = []
            dropped: Counter = Counter()
            slots = 0
            wj = [j for j in unit_jobs if j["kind"] == "writer"]
            if wj:
                if seeds_by_id is None:
                    seeds_by_id = {s["id"]: s for s in stage_outputs(rd / "seeds")}
                recs = [PromptRecord.from_json(seeds_by_id[j["seed_id"]]) for j in wj]
                instr = [build_instruction(s, j["mode"]["outcome"], int(wc["k"])) for s, j in zip(recs, wj, strict=True)]
                texts = self.writer.write(recs, instr, derive_seed(self.seed, r, "writer", u))
                for s, j, text in zip(recs, wj, texts, strict=True):
                    pairs, rej = parse_generation(text, s, int(wc["k"]), near_duplicate=float(wc["near_duplicate"]))
                    slots += len(pairs) + sum(rej.values())
                    dropped.update(rej)
                    out += [candidate_record(s, q, a, n, round_index=r, mode=j["mode"]).to_json()
                            for n, (q, a) in enumerate(pairs)]
            n_written = len(out)
            for j in unit_jobs:
                if j["kind"] == "steered":
                    rec = steered_record(j["index"], j["family"], j["difficulty"], seed=derive_seed(self.seed, r, "steered"),
                                         round_index=r, width=int(stc["width"]), height=int(stc["height"]), weight=j["weight"])
                    out.append(rec.to_json())
                    slots += 1
            return out, {"in": slots, "out": len(out), "dropped": dict(dropped), "writer_generations": len(wj),
                         "writer_questions": n_written, "steered_records": len(out) - n_written}
        return self._map(rd / "synth", "synth", jobs, fn)

    def stage_screen_score(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        return self._map(rd / "screen_score", "screen_score", stage_outputs(rd / "synth"),
                         self._score_fn("screen_score", r))

    def stage_screen(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        sc = self.cfg["screen"]

        def fn(out: Path) -> dict:
            existing = [x for q in range(r) for x in read_jsonl(self.dir / f"round-{q:02d}" / "screen" / "kept.jsonl")]
            kept, counts = screen(stage_outputs(rd / "synth"), stage_outputs(rd / "screen_score"), tau=float(sc["tau"]),
                                  metric=self.metric, min_teacher_accuracy=sc["min_teacher_accuracy"],
                                  near_duplicate=float(sc["near_duplicate"]), shares=sc["shares"],
                                  balance_by=sc["balance_by"], existing=existing)
            write_atomic(out / "kept.jsonl", dumps_jsonl(kept))
            return counts
        return self._global(rd / "screen", "screen", fn)

    def stage_output(self) -> dict:
        rounds = int(self.cfg["rounds"])
        oc = self.cfg["output"]
        tau = float(self.cfg["screen"]["tau"])

        def fn(out: Path) -> dict:
            rows: list[dict] = []
            dropped: Counter = Counter()
            n_in = 0
            if oc["include_seeds"]:
                seeds = stage_outputs(self.dir / "round-00" / "seeds")
                entries = stage_outputs(self.dir / "round-00" / "score")
                zt = self.cfg["failure_modes"]["zero_delta_test"]
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
            for r in range(rounds):
                kept = read_jsonl(self.dir / f"round-{r:02d}" / "screen" / "kept.jsonl")
                n_in += len(kept)
                rows += kept
            if oc["format"] == "jsonl":
                write_atomic(out / "records.jsonl", dumps_jsonl(rows))
            elif oc["format"] == "array_record":
                from jdelta.data.records import write_array_record

                tmp = out / f".records.{time.monotonic_ns()}.array_record"
                write_array_record((PromptRecord.from_json(x) for x in rows), tmp)
                tmp.replace(out / "records.array_record")
            else:
                raise ValueError(f"output.format must be jsonl or array_record, got {oc['format']!r}")
            seed_fam = Counter(x.get("family") or "(none)" for x in stage_outputs(self.dir / "round-00" / "seeds"))
            syn_fam = Counter(x.get("family") or "(none)" for x in rows[n_seed_rows:])
            gen = Counter(x["provenance"].get("generator", "seed") if x["provenance"].get("stage") == "synthesis"
                          else "seed" for x in rows)
            counts = {"in": n_in, "out": len(rows), "dropped": dict(dropped), "seed_records": n_seed_rows,
                      "synthesized_records": len(rows) - n_seed_rows, "by_generator": dict(sorted(gen.items()))}
            write_json(out / "manifest.json", {
                "stage": "output", "version": VERSION, "records": "records." + oc["format"], "count": len(rows),
                "counts": counts, "config": self.cfg, "scorer": self.scorer_identity(), "writer": self.writer_identity(),
                "family_share": {"seeds": _shares(seed_fam), "synthesized": _shares(syn_fam)},
            })
            return counts
        return self._global(self.dir / "output", "output", fn)

    def scorer_identity(self) -> dict:
        sc = self.cfg["scorer"]
        if sc["kind"] == "oracle":
            return {k: sc[k] for k in ("kind", "failing_families", "n", "fail_rate", "teacher_noise", "student_noise")}
        from jdelta.models.loading import model_identity

        return {"kind": "models", "teacher": model_identity(sc["teacher"]), "student": model_identity(sc["student"]),
                "settings": sc["settings"]}

    def writer_identity(self) -> dict:
        wc = self.cfg["synthesis"]["writer"]
        return {"kind": wc["kind"], **({"teacher": self.scorer_identity().get("teacher")} if wc["kind"] == "teacher" else {}),
                **{k: wc[k] for k in ("k", "seeds")}}

    # --------------------------------------------------------------------- driver

    def run(self) -> dict:
        """Run (or resume) every stage; returns the run manifest. Raises :class:`WaitingForShards`."""
        t0 = time.perf_counter()
        stages: dict[str, Any] = {}

        def manifest(complete: bool) -> dict:
            m = {
                "stage": "pipeline", "version": VERSION, "complete": complete, "config": self.cfg,
                "scorer": self.scorer_identity(), "writer": self.writer_identity(), "stages": stages,
                "output": str(self.dir / "output"), "seconds_this_process": round(time.perf_counter() - t0, 3),
                "seconds_by_stage": dict(self.seconds),
            }
            write_json(self.dir / "manifest.json", m)
            return m

        for r in range(int(self.cfg["rounds"])):
            for name in ("seeds", "score", "modes", "synth", "screen_score", "screen"):
                stages[f"round-{r:02d}/{name}"] = getattr(self, f"stage_{name}")(r)["counts"]
                manifest(False)
        stages["output"] = self.stage_output()["counts"]
        return manifest(True)


def _shares(c: Counter) -> dict[str, float]:
    tot = sum(c.values())
    return {k: round(v / tot, 6) for k, v in sorted(c.items())} if tot else {}


def _short(counts: Mapping[str, Any]) -> str:
    dropped = {k: v for k, v in (counts.get("dropped") or {}).items() if v}
    return f"in {counts['in']} -> out {counts['out']}" + (f", dropped {dropped}" if dropped else "")


def run_pipeline(run_dir: str | Path, config: Mapping[str, Any], **kw) -> dict:
    """Library entry point: ``Pipeline(run_dir, config, **kw).run()``."""
    return Pipeline(run_dir, config, **kw).run()


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (see jdelta.synth.pipeline.DEFAULTS)")
    parser.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    parser.add_argument("--num-processes", type=int, default=1, help="shard map stages over this many processes")
    parser.add_argument("--process-index", type=int, default=0, help="this process's shard (0-based)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for other processes' units before exiting (exit code 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="the run dir holds a run with another config: discard its stages and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        manifest = run_pipeline(args.out, cfg, process_index=args.process_index, num_processes=args.num_processes,
                                wait_seconds=args.wait, overwrite=args.overwrite, progress=not args.no_progress)
    except WaitingForShards as e:
        print(f"jdelta pipeline: {e}", file=sys.stderr)
        return 3
    out = manifest["stages"]["output"]
    print(f"output: {out['out']} records ({out['seed_records']} seeds, {out['synthesized_records']} synthesized) "
          f"in {Path(args.out) / 'output'}")
    return 0
