"""n answers per prompt from a checkpoint of any family (KV-cache sampler), written to a run directory.

``jdelta sample --model DIR --prompts P --out D [--n 8] [--temperature 1.0] [--max-new-tokens 64]``

Prompt records (JSONL / ArrayRecord, see :mod:`jdelta.data.records`) go through the Grain prompt
pipeline (chat template, image processing, bucketed left-padded batches) to
:class:`jdelta.sampling.Sampler`. The run directory ``D`` (:class:`jdelta.runs.RunDir`: lock,
manifest, reuse check) holds::

    D/samples.jsonl   one line per sample: {"prompt_id", "record_index", "sample_index", "text",
                      "token_ids", "logprobs", "raw_logprobs", "finish_reason"}
    D/manifest.json   config, input fingerprints (prompts content hash, model identity,
                      tokenizer), counts, the records the pipeline left out by reason

``logprobs`` are under the sampling distribution, ``raw_logprobs`` under the model at
temperature 1. ``samples.jsonl`` is streamed to a temporary file and renamed into place only when
complete: a killed run never leaves a truncated file, and never touches a previous complete one.
Rerunning the same command on a complete directory does nothing; other settings are refused
naming what differs (``--overwrite`` discards the old run).

``--engine continuous`` samples every prompt through one :class:`jdelta.rollout_engine.RolloutEngine`
(``--engine-slots`` decode rows kept busy, default ``batch_size * n``) instead of one static batch
at a time; each row keeps the key the static sampler gives it, so the file is the same (log-probs
to float rounding). It runs on one device in one process (images included).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal

from jdelta.config import MeshConfig, ModelSpec, PromptConfig, SamplingConfig, check, to_dict

SAMPLES = "samples.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    """``jdelta sample``: model, prompts and run directory, then the settings."""

    model: ModelSpec
    prompts: str
    out: str
    tokenizer: str | None = None  # default: the model's directory
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    limit: int | None = None  # only the first N records
    engine: Literal["static", "continuous"] = "static"  # static batches, or continuous batching (same samples)
    engine_slots: int | None = None  # continuous: decode rows kept busy (default batch_size * n)
    overwrite: bool = False  # discard a previous run with other settings
    progress: bool = True

    def __post_init__(self):
        check(self.model.path is not None, "model", "needs a checkpoint directory (model.path)")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(self.engine_slots is None or self.engine_slots >= self.sampling.n, "engine_slots",
              f"must be >= sampling.n ({self.sampling.n}), got {self.engine_slots}")


IGNORED_KEYS = ("out", "progress", "overwrite", "mesh", "engine", "engine_slots")  # engine: same samples


def sample_rows(res, batch, tokenizer) -> list[dict]:
    """The output lines of one sampler call on a :class:`~jdelta.completions.PromptBatch`."""
    rows = []
    for r in range(res.tokens.shape[0]):
        i = int(res.prompt_index[r])
        n_tok = int(res.lengths[r])
        ids = res.tokens[r, :n_tok].tolist()
        text_ids = ids[:-1] if res.finish_reason[r] == "stop" else ids
        rows.append({
            "prompt_id": str(batch.records[i].id),
            "record_index": int(batch.indices[i]),
            "sample_index": int(res.sample_index[r]),
            "text": tokenizer.decode(text_ids, skip_special_tokens=False),
            "token_ids": ids,
            "logprobs": [round(float(x), 6) for x in res.logprobs[r, :n_tok]],
            "raw_logprobs": [round(float(x), 6) for x in res.raw_logprobs[r, :n_tok]],
            "finish_reason": res.finish_reason[r],
        })
    return rows


def run(cfg: Config) -> int:
    import jax

    from jdelta.completions import ContinuousSampler, progress_bar, prompt_batches, sampling_params
    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.distributed import run_dir
    from jdelta.models.family import prompt_special_tokens
    from jdelta.models.loading import (
        ModelSession,
        check_checkpoint_dir,
        model_identity,
        pipeline_config_for,
        tokenizer_fingerprint,
    )
    from jdelta.runs import input_fingerprint

    source = open_records(cfg.prompts)
    if len(source) == 0:
        raise ValueError(f"{cfg.prompts}: no prompt records to sample")
    total = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    model_dir = check_checkpoint_dir(cfg.model.path, "model")
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else model_dir
    tok = load_tokenizer(tok_dir)
    special = prompt_special_tokens(tok)
    params = sampling_params(cfg.sampling, special.stop_ids)
    inputs = {
        "prompts": {**input_fingerprint(cfg.prompts), "records": len(source)},
        "model": model_identity(model_dir),
        "tokenizer": {"path": str(tok_dir.resolve()), "fingerprint": tokenizer_fingerprint(tok)},
    }
    # multi-host: process 0 writes the run directory, the others see the same results and write nothing
    with run_dir(cfg.out, "sample", config=to_dict(cfg), inputs=inputs, overwrite=cfg.overwrite,
                 ignore=IGNORED_KEYS) as run:
        for stale in run.path.glob(f".{SAMPLES}.*.tmp") if run.writes else ():  # left by a killed run (we hold the lock)
            stale.unlink()
        if run.resumed and run.previous.get("complete") and run.file(SAMPLES).is_file():
            c = run.previous.get("counts", {})
            kept = ("counts", "skipped", "seconds", "compiles", "stop_token_ids")
            run.update(**{k: v for k, v in run.previous.items() if k in kept}, complete=True)
            print(f"sample: {run.path} is complete ({c.get('samples')} samples); nothing to do", file=sys.stderr)
            return 0
        session = ModelSession(cfg.mesh.make())
        model, model_config = session.load(cfg.model, role="model")
        pcfg = pipeline_config_for(model_config, cfg.prompt, batch_size=cfg.sampling.batch_size)
        batches = prompt_batches(source, tok, pcfg, select=slice(0, total))
        rng = jax.random.key(cfg.sampling.seed)
        if cfg.engine == "continuous":
            sampler = ContinuousSampler(model, pcfg, pad_id=special.pad, mesh=session.mesh,
                                        slots=cfg.engine_slots or cfg.sampling.batch_size * cfg.sampling.n)
            results = sampler.results(batches, params, lambda step: jax.random.fold_in(rng, step))
        else:
            sampler = session.sampler(model, pipeline=pcfg, pad_id=special.pad)
            results = ((batch, sampler.generate(batch.inputs, params, rng=jax.random.fold_in(rng, step)))
                       for step, batch in enumerate(batches))
        prompts = samples = new_tokens = 0
        finish = {"stop": 0, "length": 0}
        t_start = time.perf_counter()
        bar = progress_bar(total, "sample", cfg.progress)
        try:
            with run.open_atomic(SAMPLES) as f:
                for batch, res in results:
                    for row in sample_rows(res, batch, tok):
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        finish[row["finish_reason"]] += 1
                    prompts += len(batch.indices)
                    samples += res.tokens.shape[0]
                    new_tokens += int(res.lengths.sum())
                    if bar is not None:
                        bar.update(len(batch.indices))
                        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t_start, 1e-9):.0f}",
                                        compiles=sampler.compile_count)
                if not prompts:
                    raise ValueError(f"{cfg.prompts}: every record was skipped; "
                                     f"{batches.skip_report.summary()}")
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t_start
        skipped = batches.skip_report
        run.update(
            complete=True,
            stop_token_ids=list(params.stop_token_ids),
            counts={"records": total, "prompts": prompts, "samples": samples, "new_tokens": new_tokens,
                    "skipped": skipped.total, "finish_reason": finish},
            skipped=skipped.as_dict(),
            seconds=elapsed,
            compiles=sampler.compile_count,
        )
    print(f"sample: {prompts} prompts x {cfg.sampling.n} = {samples} samples, {new_tokens} tokens in {elapsed:.1f} s "
          f"({new_tokens / max(elapsed, 1e-9):.1f} tokens/s, {sampler.compile_count} compiles); "
          f"{skipped.total} records skipped -> {Path(cfg.out) / SAMPLES}", file=sys.stderr)
    if skipped.total:
        print(skipped.summary(), file=sys.stderr)
    return 0

