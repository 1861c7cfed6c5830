"""Failure modes and targeted synthesis as resumable, shardable stages of a run directory.

:class:`SynthesisRun` holds what every synthesis run has: its run directory (lock, manifest,
config and input fingerprints; :func:`jdelta.synth.unit_runner.open_run_dir`), its config, the
scorer and the writer, the map/global stage machinery, and the stages ``modes`` (failure modes
ranked by Δ mass, report, synthesis plan) and ``synth`` (teacher-as-writer questions on seed images
and steered procedural records). :class:`~jdelta.synth.pipeline.Pipeline` adds seeds, scoring,
screening, rounds and the output dataset.

:class:`SynthesizeFromScores` (``jdelta synthesize``) imports round-0 seeds and scores from a
``jdelta score`` run, then runs ``modes`` and ``synth``::

    OUT/round-00/modes/report.md, report.png, modes.json, jobs.json
    OUT/candidates.jsonl     the candidates (teacher-as-writer + steered), with provenance
    OUT/manifest.json        config, input fingerprints, counts per stage, writer identity

The candidates are not screened: score them (``jdelta score``) or run ``jdelta pipeline``.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jdelta.config import build, to_dict
from jdelta.data.records import PromptRecord
from jdelta.runs import dumps_jsonl, input_fingerprint, read_json, read_jsonl, write_atomic, write_json
from jdelta.synth import failure_modes as fm
from jdelta.synth.pipeline_config import SynthesisRunConfig, narrow
from jdelta.synth.steered import steered_plan, steered_record, steering_weights
from jdelta.synth.unit_runner import (
    derive_seed,
    open_run_dir,
    run_global_stage,
    run_map_stage,
    stage_done,
    stage_outputs,
)
from jdelta.synth.writer import OracleWriter, build_instruction, candidate_record, parse_generation

VERSION = 1


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


class SynthesisRun:
    """A run directory with its config, scorer and writer; stages are methods (module docstring).

    Args:
      run_dir: the run directory (resumed if it holds a run with the same config and inputs).
      config: a :attr:`CONFIG` dataclass (or a subclass, e.g. a stage's Config) or a mapping
        validated into one.
      scorer, writer: injected instead of the configured ones (tests).
      process_index, num_processes: this process's share of every map stage's units.
      wait_seconds: how long to wait for other processes' units before raising
        :class:`~jdelta.synth.unit_runner.WaitingForShards`.
      after_unit: ``after_unit(stage, unit)`` after each unit / global stage is written (tests).
      overwrite: a run with another config in ``run_dir`` is discarded instead of refused.
      log: receives one line per stage (None: silent). progress: tqdm bars for map stages.
    """

    STAGE = "synthesize"
    CONFIG: type[SynthesisRunConfig] = SynthesisRunConfig
    # Config keys that may change between runs of one directory without changing any result.
    IGNORED_KEYS = ("scorer.mesh", "scorer.engine", "scorer.engine_slots")

    def __init__(
        self,
        run_dir: str | Path,
        config: SynthesisRunConfig | Mapping[str, Any],
        *,
        scorer=None,
        writer=None,
        process_index: int = 0,
        num_processes: int = 1,
        wait_seconds: float = 0.0,
        after_unit: Callable[[str, int], None] | None = None,
        overwrite: bool = False,
        log: Callable[[str], None] | None = None,
        progress: bool = False,
    ):
        self.dir = Path(run_dir)
        if isinstance(config, self.CONFIG):
            self.cfg = narrow(config, self.CONFIG)
        elif isinstance(config, Mapping):
            self.cfg = build(self.CONFIG, config)
        else:
            raise TypeError(f"{type(self).__name__} needs a {self.CONFIG.__name__} or a mapping, got {type(config).__name__}")
        self.seed = int(self.cfg.seed)
        self.p, self.P, self.wait = int(process_index), int(num_processes), float(wait_seconds)
        self.after_unit = after_unit
        self.overwrite = overwrite
        self.log = log or (lambda s: None)
        self.progress = progress
        self._scorer, self._writer = scorer, writer
        self._identity: dict[str, Any] | None = None
        self._run = None  # the open run directory while run() runs
        self.seconds: dict[str, float] = {}  # stage -> seconds spent in this process
        self.metric = self.cfg.scorer.delta.metric

    # --------------------------------------------------------------------- scorer, writer, inputs

    @property
    def scorer(self):
        if self._scorer is None:
            from jdelta.synth.pair_scorers import make_pair_scorer

            self._scorer = make_pair_scorer(self.cfg.scorer, unit_pad=int(self.cfg.unit_size))
        return self._scorer

    @property
    def writer(self):
        if self._writer is None:
            wc = self.cfg.synthesis.writer
            if wc.kind == "oracle":
                self._writer = OracleWriter(wc.k, wc.malformed_rate)
            else:  # teacher (the config guarantees scorer.kind=models)
                self._writer = self.scorer.teacher_writer(wc)
        return self._writer

    def uses_models(self) -> dict[str, bool]:
        """Which of the configured models this run loads: ``{"scorer": ..., "writer": ...}``."""
        return {"scorer": False, "writer": self.cfg.synthesis.writer.kind == "teacher"}

    def inputs(self) -> dict[str, Any]:
        """Content fingerprints of what the run reads besides its config (checked on resume)."""
        from jdelta.models.loading import check_checkpoint_dir, model_identity

        sc = self.cfg.scorer
        if not any(self.uses_models().values()):
            return {}
        out: dict[str, Any] = {"teacher": model_identity(check_checkpoint_dir(sc.teacher.path, "scorer.teacher")),
                               "student": model_identity(check_checkpoint_dir(sc.student.path, "scorer.student"))}
        if sc.tokenizer:
            out["tokenizer"] = input_fingerprint(sc.tokenizer)
        return out

    def _load_models(self) -> None:
        """Load the configured models before any work is committed, so a model that fails to load
        leaves the run directory reusable."""
        use = self.uses_models()
        if use["scorer"]:
            _ = self.scorer
        if use["writer"]:
            _ = self.writer

    def scorer_identity(self) -> dict:
        if self._identity is None:
            sc = self.cfg.scorer
            if sc.kind == "oracle":
                self._identity = {"kind": "oracle", "failing_families": list(sc.failing_families), "n": sc.sampling.n,
                                  "fail_rate": sc.fail_rate, "teacher_noise": sc.teacher_noise,
                                  "student_noise": sc.student_noise}
            else:
                from jdelta.models.loading import model_identity

                self._identity = {"kind": "models", "teacher": model_identity(sc.teacher.path),
                                  "student": model_identity(sc.student.path),
                                  "settings": to_dict({"sampling": sc.sampling, "delta": sc.delta, "prompt": sc.prompt})}
        return self._identity

    def _config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def writer_identity(self) -> dict:
        wc = self.cfg.synthesis.writer
        return {"kind": wc.kind, **({"teacher": self.scorer_identity().get("teacher")} if wc.kind == "teacher" else {}),
                "k": wc.k, "seeds": wc.seeds}

    # --------------------------------------------------------------------- stage machinery

    def _committed(self, name: str, unit: int) -> None:
        if self._run is not None:
            self._run.commit()
        if self.after_unit is not None:
            self.after_unit(name, unit)

    def _map(self, d: Path, name: str, items, fn) -> dict:
        t0 = time.perf_counter()
        bar = None
        if self.progress and not stage_done(d):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"{d.parent.name}/{name}", unit="item", dynamic_ncols=True, leave=False)
        try:
            done = run_map_stage(d, name, items, int(self.cfg.unit_size), fn, process_index=self.p,
                                 num_processes=self.P, wait_seconds=self.wait, after_unit=self._committed,
                                 progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        self._timed(d, name, done, t0)
        return done

    def _global(self, d: Path, name: str, fn: Callable[[Path], dict]) -> dict:
        t0 = time.perf_counter()
        was_done = stage_done(d)
        done = run_global_stage(d, name, fn)
        if not was_done:
            self._committed(name, 0)
        self._timed(d, name, done, t0)
        return done

    def _timed(self, d: Path, name: str, done: Mapping[str, Any], t0: float) -> None:
        sec = time.perf_counter() - t0
        self.seconds[str(d.relative_to(self.dir))] = round(sec, 3)
        self.log(f"[{name}] {d.relative_to(self.dir)}: {_short(done['counts'])} ({sec:.1f} s)")

    # --------------------------------------------------------------------- stages

    def stage_modes(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        fc, sc = self.cfg.failure_modes, self.cfg.synthesis

        def fn(out: Path) -> dict:
            seeds = stage_outputs(rd / "seeds")
            entries = stage_outputs(rd / "score")
            analysis = fm.failure_modes(entries, group_by=fc.group_by, metric=self.metric,
                                        zero_delta_test=fc.zero_delta_test, consistency=fc.consistency)
            write_json(out / "modes.json", analysis)
            write_atomic(out / "report.md", fm.report_markdown(analysis, title=f"Failure modes, round {r}"))
            fm.plot_modes(analysis, out / "report.png")
            targets = fm.target_modes(analysis, fc.targets, fc.top)
            # Writer: seeds per targeted mode in proportion to Δ mass, highest-Δ seeds first.
            n_ids = [len(m["ids"]) for m in targets]
            quota = allocate(int(sc.writer.seeds), [m["delta_mass"] for m in targets], n_ids)
            jobs: list[dict] = []
            for m, q in zip(targets, quota, strict=True):
                mode = {"group": m["group"], "outcome": m["outcome"]}
                jobs += [{"kind": "writer", "seed_id": i, "mode": mode} for i in m["ids"][:q]]
            # Steered generator: families and difficulty in proportion to Δ mass.
            difficulty = {s["id"]: (s.get("meta") or {}).get("difficulty", 2) for s in seeds}
            steer = steering_weights(targets, difficulty, floor=float(sc.steered.floor))
            plan = steered_plan(int(sc.steered.n), steer["weights"], derive_seed(self.seed, r, "steered"))
            jobs += [{"kind": "steered", "index": i, "family": f, "difficulty": lv,
                      "weight": steer["weights"][f"{f}/{lv}"]} for i, (f, lv) in enumerate(plan)]
            write_json(out / "jobs.json", {"jobs": jobs, "steering": steer})
            return {**analysis["counts"], "writer_jobs": sum(quota), "steered_jobs": len(plan),
                    "targeted_modes": len(targets)}
        return self._global(rd / "modes", "modes", fn)

    def stage_synth(self, r: int) -> dict:
        rd = self.dir / f"round-{r:02d}"
        jobs = read_json(rd / "modes" / "jobs.json")["jobs"]
        wc, stc = self.cfg.synthesis.writer, self.cfg.synthesis.steered
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
                instr = [build_instruction(s, j["mode"]["outcome"], int(wc.k)) for s, j in zip(recs, wj, strict=True)]
                texts = self.writer.write(recs, instr, derive_seed(self.seed, r, "writer", u))
                for s, j, text in zip(recs, wj, texts, strict=True):
                    pairs, rej = parse_generation(text, s, int(wc.k), near_duplicate=float(wc.near_duplicate))
                    slots += len(pairs) + sum(rej.values())
                    dropped.update(rej)
                    out += [candidate_record(s, q, a, n, round_index=r, mode=j["mode"]).to_json()
                            for n, (q, a) in enumerate(pairs)]
            n_written = len(out)
            for j in unit_jobs:
                if j["kind"] == "steered":
                    rec = steered_record(j["index"], j["family"], j["difficulty"], seed=derive_seed(self.seed, r, "steered"),
                                         round_index=r, width=int(stc.width), height=int(stc.height), weight=j["weight"])
                    out.append(rec.to_json())
                    slots += 1
            return out, {"in": slots, "out": len(out), "dropped": dict(dropped), "writer_generations": len(wj),
                         "writer_questions": n_written, "steered_records": len(out) - n_written}
        return self._map(rd / "synth", "synth", jobs, fn)

    # --------------------------------------------------------------------- driver

    def plan(self) -> list[tuple[str, Callable[[], dict]]]:
        """``(manifest key, stage call)`` in order; subclasses define their stages."""
        raise NotImplementedError

    def final_stage(self) -> Path:
        """The stage directory whose ``DONE.json`` means the whole run is done."""
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """Extra manifest fields once every stage is done."""
        return {}

    def manifest_fields(self) -> dict[str, Any]:
        return {"version": VERSION, "writer": self.writer_identity()}

    @contextlib.contextmanager
    def _opened(self) -> Iterator[Any]:
        with open_run_dir(self.dir, self.STAGE, config=self._config_dict(), inputs=self.inputs(),
                          overwrite=self.overwrite, ignore=self.IGNORED_KEYS, process_index=self.p,
                          num_processes=self.P) as run:
            self._run = run
            try:
                yield run
            finally:
                self._run = None

    def run(self) -> dict:
        """Run (or resume) every stage; returns the run manifest.

        Raises :class:`~jdelta.synth.unit_runner.WaitingForShards` when other processes' units
        are missing, :class:`~jdelta.errors.RunDirError` for a directory in use or holding a run
        with other settings.
        """
        t0 = time.perf_counter()
        stages: dict[str, Any] = {}
        with self._opened() as run:
            if not stage_done(self.final_stage()):
                self._load_models()

            def record(**extra: Any) -> dict:
                return run.update(**self.manifest_fields(), stages=stages, **extra,
                                  seconds_this_process=round(time.perf_counter() - t0, 3),
                                  seconds_by_stage=dict(self.seconds))

            for key, call in self.plan():
                stages[key] = call()["counts"]
                record()
            return record(**self.finish(), complete=True)


def _short(counts: Mapping[str, Any]) -> str:
    dropped = {k: v for k, v in (counts.get("dropped") or {}).items() if v}
    return f"in {counts['in']} -> out {counts['out']}" + (f", dropped {dropped}" if dropped else "")


class SynthesizeFromScores(SynthesisRun):
    """Round-0 seeds and scores imported from a ``jdelta score`` run, then ``modes`` and ``synth``.

    ``scores``: a score run directory or its ``scores.jsonl``; ``prompts``: the scored prompts
    (default: the path in the score run's manifest).
    """

    STAGE = "synthesize"

    def __init__(self, run_dir, config, *, scores: str | Path, prompts: str | Path | None = None, **kw):
        scores = Path(scores)
        self.scores_path = scores / "scores.jsonl" if scores.is_dir() else scores
        if not self.scores_path.is_file():
            raise FileNotFoundError(f"{self.scores_path}: no scores (run `jdelta score` first, or pass its scores.jsonl)")
        if prompts is None:
            man = self.scores_path.parent / "manifest.json"
            if not man.is_file():
                raise FileNotFoundError(f"{man}: not found; pass prompts")
            prompts = read_json(man).get("config", {}).get("prompts")
            prompts = prompts.get("path") if isinstance(prompts, Mapping) else prompts
            if not prompts:
                raise FileNotFoundError(f"{man}: names no prompts file; pass prompts")
        self.prompts_path = Path(prompts)
        if not self.prompts_path.exists():
            raise FileNotFoundError(f"{self.prompts_path}: prompts not found")
        super().__init__(run_dir, config, **kw)

    def inputs(self) -> dict[str, Any]:
        return {"scores": input_fingerprint(self.scores_path), "prompts": input_fingerprint(self.prompts_path),
                **super().inputs()}

    def stage_seeds(self) -> dict:
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

    def stage_score(self) -> dict:
        def fn(out: Path) -> dict:
            entries = read_jsonl(self.scores_path)
            write_atomic(out / "out.jsonl", dumps_jsonl(entries))
            return {"in": len(entries), "out": len(entries), "dropped": {}, "imported_from": 0}
        return self._global(self.dir / "round-00" / "score", "score", fn)

    def plan(self) -> list[tuple[str, Callable[[], dict]]]:
        return [("seeds", self.stage_seeds), ("score", self.stage_score),
                ("modes", lambda: self.stage_modes(0)), ("synth", lambda: self.stage_synth(0))]

    def final_stage(self) -> Path:
        return self.dir / "round-00" / "synth"

    def finish(self) -> dict[str, Any]:
        cand = self.dir / "round-00" / "synth" / "out.jsonl"
        write_atomic(self.dir / "candidates.jsonl", cand.read_bytes())
        return {"candidates": str(self.dir / "candidates.jsonl")}
