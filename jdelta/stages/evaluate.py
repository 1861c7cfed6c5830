"""greedy / majority-vote answers of one model on benchmark sets, each scored with its own metric (a run directory).

``jdelta eval --model M --data chartqa=chartqa:/data/chartqa,runs/heldout.jsonl --out D [--metric auto] [--n 1]``

``--data`` takes comma-separated sets, each ``[NAME=]PATH`` (a jdelta records file or directory)
or ``[NAME=]LAYOUT:DIR`` (a Hugging Face dataset saved to disk in a known layout). ``--n 1``
answers greedily; ``--n k`` samples ``k`` completions (at ``--temperature``) and answers with the
majority class. ``--metric auto`` scores each benchmark with its own metric (see
:mod:`jdelta.evaluation`); any other choice forces one metric for all.

Run directory (:class:`jdelta.runs.RunDir`: lock, manifest, reuse check)::

    D/predictions-<name>.jsonl  one line per input prompt: the answer and its score, or the reason
                                it was skipped (written atomically; the unit of resume)
    D/results.md, results.json  per-benchmark table with the macro average
    D/manifest.json             config, input fingerprints (benchmark content hashes, model
                                identity, tokenizer), counts
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

import numpy as np

from jdelta.config import MeshConfig, ModelSpec, PromptConfig, SamplingConfig, check, to_dict
from jdelta.evaluation import METRIC_ALIASES


@dataclasses.dataclass(frozen=True)
class EvalSamplingConfig(SamplingConfig):
    """:class:`~jdelta.config.SamplingConfig` with eval's defaults: greedy (``n`` 1); with ``n`` > 1,
    the majority of ``n`` samples at ``temperature`` 0.7. (Field defaults, not a default instance, so
    that ``--batch-size 4`` alone keeps them.)"""

    n: int = 1
    temperature: float = 0.7


@dataclasses.dataclass(frozen=True)
class Config:
    """``jdelta eval``: model, benchmarks and run directory, then the settings."""

    model: ModelSpec
    data: str  # comma-separated [NAME=]PATH or [NAME=]LAYOUT:DIR
    out: str
    tokenizer: str | None = None  # default: the model's directory
    metric: Literal[tuple(METRIC_ALIASES)] = "auto"
    sampling: EvalSamplingConfig = dataclasses.field(default_factory=EvalSamplingConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    limit: int | None = None  # first N prompts of each benchmark
    overwrite: bool = False  # discard a previous run with other settings
    progress: bool = True

    def __post_init__(self):
        check(self.model.path is not None, "model", "needs a checkpoint directory (model.path)")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


IGNORED_KEYS = ("out", "progress", "overwrite", "mesh")


def run_eval(cfg: Config, *, session=None, notes=()) -> dict:
    """The stage as a function; returns ``results.json``'s content."""
    import jax

    from jdelta.completions import progress_bar, sampling_params
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.distributed import run_dir
    from jdelta.evaluation import evaluate_source, parse_data_spec, results_markdown, summarize_benchmark
    from jdelta.models.family import prompt_special_tokens
    from jdelta.models.loading import (
        ModelSession,
        check_checkpoint_dir,
        model_identity,
        pipeline_config_for,
        tokenizer_fingerprint,
    )
    from jdelta.runs import dumps_jsonl, input_fingerprint, read_jsonl, write_json

    benchmarks = parse_data_spec(cfg.data)
    sources = {b.name: b.open() for b in benchmarks}
    model_dir = check_checkpoint_dir(cfg.model.path, "model")
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else model_dir
    tok = load_tokenizer(tok_dir)
    special = prompt_special_tokens(tok)
    greedy = cfg.sampling.n == 1
    params = sampling_params(cfg.sampling, special.stop_ids, greedy=greedy)
    identity = model_identity(model_dir)
    inputs = {
        "data": {b.name: {**input_fingerprint(b.path), "layout": b.layout, "records": len(sources[b.name])}
                 for b in benchmarks},
        "model": identity,
        "tokenizer": {"path": str(tok_dir.resolve()), "fingerprint": tokenizer_fingerprint(tok)},
    }
    # multi-host: process 0 writes the run directory, the others evaluate with it and write nothing
    with run_dir(cfg.out, "eval", config=to_dict(cfg), inputs=inputs, overwrite=cfg.overwrite,
                 ignore=IGNORED_KEYS) as run:
        t0 = time.perf_counter()
        rows = []
        loaded = None
        for b in benchmarks:
            pred = f"predictions-{b.name}.jsonl"
            if run.resumed and run.file(pred).is_file():  # done in an earlier run with these settings
                entries = read_jsonl(run.file(pred))
            else:
                if loaded is None:
                    session = session if session is not None else ModelSession(cfg.mesh.make())
                    model, model_config = session.load(cfg.model, role="model")
                    pcfg = pipeline_config_for(model_config, cfg.prompt, batch_size=cfg.sampling.batch_size)
                    loaded = (session.sampler(model, pipeline=pcfg, pad_id=special.pad), pcfg)
                sampler, pcfg = loaded
                source = sources[b.name]
                total = len(source) if cfg.limit is None else min(cfg.limit, len(source))
                bar = progress_bar(total, f"eval {b.name}", cfg.progress)
                try:
                    entries = evaluate_source(sampler, tok, source, pipeline=pcfg, params=params,
                                              key=jax.random.key(cfg.sampling.seed), metric=cfg.metric,
                                              limit=cfg.limit, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
                run.write_atomic(pred, dumps_jsonl(entries, sort_keys=False))
                run.commit()
            rows.append(summarize_benchmark(b.name, entries))
        scores = [r["score"] for r in rows if r["score"] is not None]
        average = float(np.mean(scores)) if scores else None
        results = {"model": identity, "decoding": "greedy" if greedy else f"majority of {cfg.sampling.n} samples",
                   "benchmarks": rows, "average": average}
        if run.writes:
            write_json(run.file("results.json"), results)
        run.write_atomic("results.md", results_markdown(rows, average, notes))
        run.update(complete=True, seconds=time.perf_counter() - t0, counts={
            r["benchmark"]: {k: r[k] for k in ("prompts", "scored", "skipped", "skipped_by_reason")} for r in rows})
    return results


def run(cfg: Config) -> int:
    from jdelta.distributed import is_primary

    run_eval(cfg)
    if not is_primary():  # multi-host: process 0 reports
        return 0
    print((Path(cfg.out) / "results.md").read_text(encoding="utf-8"))
    return 0
