"""ViCuR hints: a model describes each record's question-relevant visual evidence; hints that state the answer are rejected.

``jdelta write-hints --model DIR --prompts P --out D [--n 1] [--max-new-tokens 256] [--drop-rejected]``

For every prompt record without a cue hint (``cues.hint``; records that carry one keep it), the
model is asked :data:`jdelta.hints.DEFAULT_INSTRUCTION` (``instruction``; placeholders
``{question}``, ``{answer}``) on the record's images; its output is parsed and checked by
:func:`jdelta.hints.check_hint` (thinking removed, text after ``Hint:``, rejected when it states
any accepted answer, is empty, over ``checks.max_chars``, cut at ``max_new_tokens`` or unparseable).
With ``sampling.n > 1`` the first of a record's samples that passes wins. Records without a
reference answer cannot be checked and are rejected (``no_reference``) unless
``require_reference=false``. Run directory (:class:`jdelta.runs.RunDir`: lock, manifest, reuse check)::

    D/manifest.json              config, input fingerprints (prompts content hash, model identity,
                                 tokenizer), shards, counts: input = hinted + kept + rejected
                                 (by reason) + unreadable (by reason)
    D/shards/shard-00000.jsonl   one audit entry per input record of the shard (status, reason, hint,
                                 the writer's raw outputs and the verdict on each); written atomically
    D/records.jsonl              the records (same schema as the input, images inline or as absolute
                                 paths) with ``cues.hint`` filled and ``provenance.hint`` naming the
                                 writer; rejected records without a new hint (``drop_rejected``: left
                                 out); unreadable records left out (listed in the shards)

Resumable: a shard whose file exists is never written again; kill the stage and rerun the same
command to finish (the same output as an uninterrupted run: each shard draws from its own key).
Other settings or inputs are refused naming what differs (``--overwrite`` discards the old run).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jdelta.config import MeshConfig, ModelSpec, PromptConfig, SamplingConfig, check, to_dict
from jdelta.hints import DEFAULT_INSTRUCTION, HintChecks, check_instruction

RECORDS = "records.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    """``jdelta write-hints``: writer model, prompts and run directory, then the settings."""

    model: ModelSpec
    prompts: str
    out: str
    tokenizer: str | None = None  # default: the model's directory
    instruction: str = DEFAULT_INSTRUCTION  # the writer's prompt; {question} required, {answer} optional
    # Qwen3-VL-Instruct's recommended sampling (temperature 0.7, top_p 0.8, top_k 20); one hint per record.
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(
        n=1, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=256))
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    checks: HintChecks = dataclasses.field(default_factory=HintChecks)
    require_reference: bool = True  # a record without a reference answer cannot be leak-checked: reject it
    drop_rejected: bool = False  # leave rejected records out of records.jsonl (default: keep them, no hint)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    shard_size: int = 64  # records per output shard (the unit of resume)
    max_shards: int | None = None  # stop (resumably) after writing this many new shards
    overwrite: bool = False  # discard a previous run with other settings
    progress: bool = True

    def __post_init__(self):
        check(self.model.path is not None, "model", "needs a checkpoint directory (model.path)")
        check_instruction(self.instruction)
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.max_shards is None or self.max_shards >= 0, "max_shards", f"must be >= 0, got {self.max_shards}")


# Keys that may change between runs of one directory without changing any result.
IGNORED_KEYS = ("out", "progress", "max_shards", "overwrite", "mesh")


def _shard_name(k: int) -> str:
    return f"shards/shard-{k:05d}.jsonl"


def _counts(entries: list[dict], total: int) -> dict[str, Any]:
    status = Counter(e["status"] for e in entries)
    by = {s: dict(sorted(Counter(e["reason"] for e in entries if e["status"] == s).items()))
          for s in ("rejected", "unreadable")}
    candidates = [c for e in entries for c in e["candidates"]]
    return {
        "input": total,
        "accounted": len(entries),
        "hinted": status.get("hinted", 0),
        "kept": status.get("kept", 0),
        "kept_stating_answer": sum(1 for e in entries if e["status"] == "kept" and e["leaked"] is not None),
        "rejected": status.get("rejected", 0),
        "rejected_by_reason": by["rejected"],
        "unreadable": status.get("unreadable", 0),
        "unreadable_by_reason": by["unreadable"],
        "remaining": total - len(entries),
        "samples": len(candidates),
        "samples_rejected_by_reason": dict(sorted(Counter(c["reason"] for c in candidates if c["reason"]).items())),
    }


def run_write_hints(cfg: Config, *, writer=None, session=None,
                    after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The stage as a function; returns the manifest.

    ``writer``: a :class:`jdelta.hints.HintWriter` to use instead of loading ``cfg.model`` (tests);
    ``session``: a :class:`~jdelta.models.loading.ModelSession` to load the model through;
    ``after_shard(k)`` is called after shard ``k`` is written (tests inject failures with it).
    """
    from jdelta.data.records import RecordError, open_records
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.hints import ModelHintWriter, hint_entries, with_written_hint
    from jdelta.models.loading import (
        ModelSession,
        check_checkpoint_dir,
        check_same_tokenizer,
        model_identity,
        tokenizer_fingerprint,
    )
    from jdelta.runs import RunDir, dumps_jsonl, input_fingerprint, read_jsonl

    prompts_path = Path(cfg.prompts).resolve()  # image paths are written back absolute
    source = open_records(prompts_path)
    total = len(source)
    if total == 0:
        raise ValueError(f"{cfg.prompts}: no prompt records")
    model_dir = check_checkpoint_dir(cfg.model.path, "model")
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else model_dir
    tok = load_tokenizer(tok_dir)
    if cfg.tokenizer is not None and (model_dir / "tokenizer.json").is_file():
        check_same_tokenizer(tok, load_tokenizer(model_dir), ("given", "model"))
    model = model_identity(model_dir)
    inputs = {
        "prompts": {**input_fingerprint(prompts_path), "records": total},
        "model": model,
        "tokenizer": {"path": str(tok_dir.resolve()), "fingerprint": tokenizer_fingerprint(tok)},
    }
    source_note = {"stage": "write-hints", "model": model["path"]}
    num_shards = -(-total // cfg.shard_size)
    shard_range = [range(k * cfg.shard_size, min(total, (k + 1) * cfg.shard_size)) for k in range(num_shards)]

    def parsed(i: int):
        try:
            return source.to_record(source[i], i)
        except RecordError as e:
            return e

    with RunDir(cfg.out, "write-hints", config=to_dict(cfg), inputs=inputs, overwrite=cfg.overwrite,
                ignore=IGNORED_KEYS) as run:

        def shard_done(k: int) -> bool:
            p = run.file(_shard_name(k))
            if not p.is_file():
                return False
            try:
                rows = read_jsonl(p)
            except Exception:  # a damaged shard is written again
                return False
            return [r.get("index") for r in rows] == list(shard_range[k])

        done_before = [k for k in range(num_shards) if shard_done(k)]
        todo = [k for k in range(num_shards) if k not in set(done_before)]
        shards = {"total": num_shards, "resumed": len(done_before), "written_now": 0}
        run.update(shards=shards)
        t0 = time.perf_counter()
        if todo:
            import jax

            from jdelta.completions import progress_bar

            def make_writer():
                nonlocal writer
                if writer is None:
                    writer = ModelHintWriter(session if session is not None else ModelSession(cfg.mesh.make()),
                                             cfg.model, tok, prompt=cfg.prompt, sampling=cfg.sampling)
                return writer

            class LazyWriter:  # the model is loaded only when a shard has a record to write a hint for
                def write(self, records, instructions, key):
                    return make_writer().write(records, instructions, key)

            base = jax.random.key(cfg.sampling.seed)
            bar = progress_bar(total, "write-hints", cfg.progress,
                               initial=sum(len(shard_range[k]) for k in done_before))
            try:
                for k in todo:
                    if cfg.max_shards is not None and shards["written_now"] >= cfg.max_shards:
                        break
                    items = [(i, parsed(i)) for i in shard_range[k]]
                    entries = hint_entries(items, LazyWriter(), jax.random.fold_in(base, k),
                                           instruction=cfg.instruction, checks=cfg.checks,
                                           require_reference=cfg.require_reference)
                    run.write_atomic(_shard_name(k), dumps_jsonl(entries, sort_keys=False))
                    run.commit()
                    shards["written_now"] += 1
                    run.update(shards=shards)
                    if bar is not None:
                        bar.update(len(items))
                    if after_shard is not None:
                        after_shard(k)
            finally:
                if bar is not None:
                    bar.close()
        finished = [k for k in range(num_shards) if shard_done(k)]
        entries = [e for k in finished for e in read_jsonl(run.file(_shard_name(k)))]
        counts = _counts(entries, total)
        shards["done"] = len(finished)
        run.update(seconds=time.perf_counter() - t0, shards=shards, counts=counts)
        if len(finished) < num_shards:
            return run.manifest
        if [e["index"] for e in entries] != list(range(total)):
            raise RuntimeError(f"{run.path}: shard contents do not cover records 0..{total - 1} exactly once")
        written = dropped = 0
        with run.open_atomic(RECORDS) as f:
            for e in entries:
                if e["status"] == "unreadable" or (e["status"] == "rejected" and cfg.drop_rejected):
                    dropped += e["status"] == "rejected"
                    continue
                rec = parsed(e["index"])
                if isinstance(rec, RecordError):  # the input changed under us: its fingerprint no longer holds
                    raise RuntimeError(f"{cfg.prompts}: record {e['index']} no longer parses ({rec})")
                if e["status"] == "hinted":
                    rec = with_written_hint(rec, e["hint"], source_note)
                f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
                written += 1
        counts.update(written=written, dropped_rejected=dropped)
        return run.update(complete=True, counts=counts)


def run(cfg: Config) -> int:
    manifest = run_write_hints(cfg)
    c = manifest["counts"]
    print(f"write-hints: {c['input']} records: {c['hinted']} hinted, {c['kept']} kept their own hint, "
          f"{c['rejected']} rejected {c['rejected_by_reason'] or ''}, {c['unreadable']} unreadable "
          f"{c['unreadable_by_reason'] or ''}, {c['remaining']} remaining", file=sys.stderr)
    if c["kept_stating_answer"]:
        print(f"write-hints: {c['kept_stating_answer']} kept hints state the reference answer (left unchanged; "
              f"see 'leaked' in {Path(cfg.out) / 'shards'})", file=sys.stderr)
    if manifest["complete"]:
        print(f"write-hints: {c['written']} records -> {Path(cfg.out) / RECORDS}", file=sys.stderr)
    else:
        print(f"write-hints: stopped with {manifest['shards']['done']}/{manifest['shards']['total']} shards done; "
              "rerun the same command to continue", file=sys.stderr)
    return 0
