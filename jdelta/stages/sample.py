"""``jdelta sample``: n answers per prompt from a Qwen3-VL checkpoint, written as JSONL.

Reads prompt records (JSONL / ArrayRecord, see ``jdelta.data.records``) through the Grain
prompt pipeline (chat template, image processing, bucketed left-padded batches), samples
with :class:`jdelta.sampling.Sampler`, and writes one line per sample:

    {"prompt_id", "record_index", "sample_index", "text", "token_ids", "logprobs",
     "raw_logprobs", "finish_reason"}

``logprobs`` are under the sampling distribution, ``raw_logprobs`` under the model at
temperature 1. A manifest (``<out>.manifest.json``) holds the settings, the counts and the
records the pipeline left out, by reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF Qwen3-VL checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--prompts", required=True, help="prompt records: .jsonl, .array_record or a dataset dir")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's, float32)")
    p.add_argument("--mesh", default="", help="mesh axes, e.g. fsdp=4,tensor=2 (default: one device)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--enable-thinking", choices=("true", "false"), default=None)
    p.add_argument("--min-pixels", type=int, default=None, help="image resize floor (default: Qwen3-VL's)")
    p.add_argument("--max-pixels", type=int, default=None, help="image resize cap (default: Qwen3-VL's)")


def _parse_mesh(spec: str):
    if not spec:
        return None
    from jdelta.sharding import make_mesh

    try:
        shape = {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    except ValueError as e:
        raise SystemExit(f"--mesh {spec!r}: expected axis=size pairs like fsdp=4,tensor=2 ({e})") from e
    return make_mesh(shape)


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from jdelta.data.pipeline import PipelineConfig, make_prompt_batches
    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import SpecialTokens, load_tokenizer
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
    from jdelta.sampling import Sampler, SamplingParams

    tok = load_tokenizer(args.tokenizer or args.model)
    special = SpecialTokens.from_tokenizer(tok)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, stop_token_ids=special.stop_ids, n=args.n)
    mesh = _parse_mesh(args.mesh)
    model, config = load_hf_checkpoint(args.model, mesh=mesh, dtype=args.dtype)
    source = open_records(args.prompts)
    total = len(source) if args.limit is None else min(args.limit, len(source))
    if args.limit is not None:
        source = _Limited(source, total)
    enable_thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    pcfg = PipelineConfig(batch_size=args.batch_size, num_epochs=1, enable_thinking=enable_thinking,
                          image=_image_config(config, args.min_pixels, args.max_pixels))
    batches = make_prompt_batches(source, tokenizer=tok, shuffle=False, config=pcfg)
    sampler = Sampler(model, mesh=mesh, pad_id=special.pad, seq_buckets=pcfg.seq_buckets,
                      patch_buckets=pcfg.patch_buckets, image_buckets=pcfg.image_buckets,
                      batch_buckets=(args.batch_size,))

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rng = jax.random.key(args.seed)
    prompts = samples = new_tokens = 0
    finish = {"stop": 0, "length": 0}
    t_start = time.perf_counter()
    with out_path.open("w", encoding="utf-8") as f, tqdm(total=total, unit="prompt", desc="sample") as bar:
        for step, batch in enumerate(batches):
            real = np.flatnonzero(np.asarray(batch["record_index"]) >= 0)
            if real.size == 0:
                continue
            # padding rows of a short final batch are dropped here and re-added (as dead rows) by
            # the sampler's batch bucket, so the compiled shapes stay the same
            sub = {"input_ids": batch["input_ids"][real], "attention_mask": batch["attention_mask"][real]}
            if batch.get("pixel_values") is not None and np.asarray(batch["image_grid_thw"]).any():
                sub["pixel_values"], sub["image_grid_thw"] = batch["pixel_values"], batch["image_grid_thw"]
            res = sampler.generate(sub, params, rng=jax.random.fold_in(rng, step))
            for r in range(res.tokens.shape[0]):
                i = real[res.prompt_index[r]]
                n_tok = int(res.lengths[r])
                ids = res.tokens[r, :n_tok].tolist()
                text_ids = ids[:-1] if res.finish_reason[r] == "stop" else ids
                f.write(json.dumps({
                    "prompt_id": str(batch["ids"][i]),
                    "record_index": int(batch["record_index"][i]),
                    "sample_index": int(res.sample_index[r]),
                    "text": tok.decode(text_ids, skip_special_tokens=False),
                    "token_ids": ids,
                    "logprobs": [round(float(x), 6) for x in res.logprobs[r, :n_tok]],
                    "raw_logprobs": [round(float(x), 6) for x in res.raw_logprobs[r, :n_tok]],
                    "finish_reason": res.finish_reason[r],
                }, ensure_ascii=False) + "\n")
                finish[res.finish_reason[r]] += 1
            prompts += real.size
            samples += res.tokens.shape[0]
            new_tokens += int(res.lengths.sum())
            elapsed = time.perf_counter() - t_start
            bar.update(real.size)
            bar.set_postfix(tok_s=f"{new_tokens / max(elapsed, 1e-9):.0f}", compiles=sampler.compile_count)
    elapsed = time.perf_counter() - t_start
    skipped = batches.skip_report
    manifest = {
        "stage": "sample", "model": str(args.model), "prompts_file": str(args.prompts),
        "params": {"n": args.n, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                   "max_new_tokens": args.max_new_tokens, "stop_token_ids": list(params.stop_token_ids),
                   "seed": args.seed, "batch_size": args.batch_size, "dtype": args.dtype, "mesh": args.mesh},
        "counts": {"records": total, "prompts": prompts, "samples": samples, "new_tokens": new_tokens,
                   "skipped": skipped.total, "finish_reason": finish},
        "skipped": skipped.as_dict(),
        "seconds": elapsed, "compiles": sampler.compile_count,
    }
    Path(str(out_path) + ".manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"sample: {prompts} prompts x {args.n} = {samples} samples, {new_tokens} tokens in {elapsed:.1f} s "
          f"({new_tokens / max(elapsed, 1e-9):.1f} tokens/s, {sampler.compile_count} compiles); "
          f"{skipped.total} records skipped -> {out_path}", file=sys.stderr)
    if skipped.total:
        print(skipped.summary(), file=sys.stderr)
    return 0 if prompts else 1


class _Limited:
    """The first ``n`` items of a records source."""

    def __init__(self, source, n: int):
        self._source, self._n = source, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._source[i]

    def to_record(self, raw, index):
        return self._source.to_record(raw, index)


def _image_config(config, min_pixels=None, max_pixels=None):
    """The pipeline's image settings matched to the model's vision config (patch/merge sizes)."""
    from jdelta.data.image_processor import ImageConfig

    v = config.vision
    kw = {"patch_size": v.patch_size, "merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size}
    if min_pixels is not None:
        kw["min_pixels"] = min_pixels
    if max_pixels is not None:
        kw["max_pixels"] = max_pixels
    return ImageConfig(**kw)
