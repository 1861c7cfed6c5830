"""sample n answers from teacher and student per prompt; answer divergence Δ and report (a run directory).

``jdelta score --teacher T --student S --prompts P --out D [--n 8] [--metric tv] [--mesh fsdp=8]``

Run directory (:class:`jdelta.runs.RunDir`: lock, manifest, reuse check)::

    D/manifest.json                  config, input fingerprints (prompts content hash, model
                                     identities, tokenizer), shards, counts (input = scored + skipped)
    D/shards/shard-00000.jsonl       one JSON object per input prompt of the shard (status "scored",
                                     or "skipped" with a reason); written atomically
    D/scores.jsonl                   all shards in input order (when complete)
    D/report.md, report.json, delta_hist.png

Resumable: a shard whose file exists (one line per prompt of the shard) is never scored again;
kill the stage at any point and rerun the same command to finish. A rerun with other settings or
other inputs is refused naming what differs (``--overwrite`` discards the old run).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from jdelta.config import MeshConfig, ModelSpec, PromptConfig, SamplingConfig, check, to_dict
from jdelta.delta_scoring import DeltaTestConfig

RECORD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """``jdelta score``: teacher, student, prompts and run directory, then the settings."""

    teacher: ModelSpec
    student: ModelSpec
    prompts: str
    out: str
    tokenizer: str | None = None  # default: the teacher's (the student's must then match it)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    delta: DeltaTestConfig = dataclasses.field(default_factory=DeltaTestConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    shard_size: int = 64  # prompts per output shard (the unit of resume)
    max_shards: int | None = None  # stop (resumably) after scoring this many new shards
    engine: Literal["static", "continuous"] = "static"  # static batches, or continuous batching (same samples)
    engine_slots: int | None = None  # continuous: decode rows kept busy per model (default batch_size * n)
    overwrite: bool = False  # discard a previous run with other settings
    progress: bool = True

    def __post_init__(self):
        check(self.teacher.path is not None, "teacher", "needs a checkpoint directory (teacher.path)")
        check(self.student.path is not None, "student", "needs a checkpoint directory (student.path)")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.max_shards is None or self.max_shards >= 0, "max_shards", f"must be >= 0, got {self.max_shards}")
        check(self.engine_slots is None or self.engine_slots >= self.sampling.n, "engine_slots",
              f"must be >= sampling.n ({self.sampling.n}), got {self.engine_slots}")


# Keys that may change between runs of one directory without changing any result.
IGNORED_KEYS = ("out", "progress", "max_shards", "overwrite", "mesh", "engine", "engine_slots")


def _shard_name(k: int) -> str:
    return f"shards/shard-{k:05d}.jsonl"


def run_score(cfg: Config, *, session=None, notes: Sequence[str] = (),
              after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The stage as a function; returns the manifest.

    ``session``: a :class:`~jdelta.models.loading.ModelSession` to load the models through (the demo
    passes one so the teacher is loaded once for score and re-score); ``notes``: lines quoted at the
    top of the report; ``after_shard(k)`` is called after shard ``k`` is written (tests inject
    failures with it).
    """
    import jax

    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.delta_report import write_report
    from jdelta.delta_scoring import Scorer
    from jdelta.distributed import barrier, run_dir
    from jdelta.models.loading import (
        ModelSession,
        check_checkpoint_dir,
        check_same_tokenizer,
        model_identity,
        tokenizer_fingerprint,
    )
    from jdelta.runs import input_fingerprint, read_jsonl

    source = open_records(cfg.prompts)
    total = len(source)
    if total == 0:
        raise ValueError(f"{cfg.prompts}: no prompt records to score")
    teacher_dir = check_checkpoint_dir(cfg.teacher.path, "teacher")
    student_dir = check_checkpoint_dir(cfg.student.path, "student")
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else teacher_dir
    tok = load_tokenizer(tok_dir)
    if cfg.tokenizer is None and (student_dir / "tokenizer.json").is_file():
        check_same_tokenizer(tok, load_tokenizer(student_dir), ("teacher", "student"))
    inputs = {
        "prompts": {**input_fingerprint(cfg.prompts), "records": total},
        "teacher": model_identity(teacher_dir),
        "student": model_identity(student_dir),
        "tokenizer": {"path": str(tok_dir.resolve()), "fingerprint": tokenizer_fingerprint(tok)},
    }
    num_shards = -(-total // cfg.shard_size)
    shard_range = [range(k * cfg.shard_size, min(total, (k + 1) * cfg.shard_size)) for k in range(num_shards)]

    # multi-host: process 0 writes the run directory, the others score with it and write nothing
    with run_dir(cfg.out, "score", config=to_dict(cfg), inputs=inputs, overwrite=cfg.overwrite,
                 ignore=IGNORED_KEYS) as run:

        def shard_done(k: int) -> bool:
            p = run.file(_shard_name(k))
            if not p.is_file():
                return False
            try:
                rows = read_jsonl(p)
            except Exception:  # a damaged shard is scored again
                return False
            return [r.get("index") for r in rows] == list(shard_range[k])

        done_before = [k for k in range(num_shards) if shard_done(k)]
        todo = [k for k in range(num_shards) if k not in set(done_before)]
        shards = {"total": num_shards, "resumed": len(done_before), "scored_now": 0}
        run.update(version=RECORD_VERSION, shards=shards)
        t0 = time.perf_counter()
        if todo:
            session = session if session is not None else ModelSession(cfg.mesh.make())
            teacher = session.model(cfg.teacher, role="teacher")
            student = session.model(cfg.student, role="student")
            scorer = Scorer(teacher, student, tok, sampling=cfg.sampling, prompt=cfg.prompt, tests=cfg.delta,
                            session=session, engine=cfg.engine, engine_slots=cfg.engine_slots)
            from jdelta.completions import progress_bar
            from jdelta.runs import dumps_jsonl

            bar = progress_bar(total, "score", cfg.progress, initial=sum(len(shard_range[k]) for k in done_before))
            base = jax.random.key(cfg.sampling.seed)
            try:
                for k in todo:
                    if cfg.max_shards is not None and shards["scored_now"] >= cfg.max_shards:
                        break
                    r = shard_range[k]
                    rows = scorer.score(source, jax.random.fold_in(base, k), select=slice(r.start, r.stop),
                                        progress=bar)
                    run.write_atomic(_shard_name(k), dumps_jsonl(rows, sort_keys=False))
                    run.commit()
                    shards["scored_now"] += 1
                    run.update(shards=shards)
                    if after_shard is not None:
                        after_shard(k)
            finally:
                if bar is not None:
                    bar.close()
        barrier("score: shards written")  # the other processes read the shards process 0 wrote
        finished = [k for k in range(num_shards) if shard_done(k)]
        entries = [e for k in finished for e in read_jsonl(run.file(_shard_name(k)))]
        counts = Counter(e["status"] for e in entries)
        by_reason = Counter(e["reason"] for e in entries if e["status"] == "skipped")
        shards["done"] = len(finished)
        complete = len(finished) == num_shards
        run.update(seconds=time.perf_counter() - t0, shards=shards, counts={
            "input": total,
            "accounted": len(entries),
            "scored": counts.get("scored", 0),
            "skipped": counts.get("skipped", 0),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "remaining": total - len(entries),
        })
        if not complete or not run.writes:
            return run.manifest
        if [e["index"] for e in entries] != list(range(total)):
            raise RuntimeError(f"{run.path}: shard contents do not cover prompts 0..{total - 1} exactly once")
        with run.open_atomic("scores.jsonl") as f:
            for k in range(num_shards):
                f.write(run.file(_shard_name(k)).read_text(encoding="utf-8"))
        summary = write_report(run.path, entries, cfg.delta.metric, notes=notes)
        return run.update(complete=True, summary={
            "zero_delta_exact": summary["zero_delta"]["exact"]["overall"],
            "zero_delta_permutation": summary["zero_delta"]["permutation"]["overall"],
            "zero_delta_posterior": summary["zero_delta"]["posterior"]["overall"],
            "mean_delta": summary["delta"]["mean"],
        })


def run(cfg: Config) -> int:
    from jdelta.distributed import is_primary

    manifest = run_score(cfg)
    if not is_primary():  # multi-host: process 0 reports
        return 0
    c = manifest["counts"]
    print(f"{c['input']} prompts: {c['scored']} scored, {c['skipped']} skipped {c['skipped_by_reason'] or ''}"
          f", {c['remaining']} remaining")
    if manifest["complete"]:
        print((Path(cfg.out) / "report.md").read_text(encoding="utf-8"))
    else:
        print(f"stopped with {manifest['shards']['done']}/{manifest['shards']['total']} shards done; "
              "rerun the same command to continue")
    return 0
