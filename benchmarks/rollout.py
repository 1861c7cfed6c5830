"""Continuous vs static batching of rollouts on a heavy-tailed completion-length distribution.

Both sides are :class:`jdelta.rollout_engine.RolloutEngine` with the same slots, model, prompts,
keys and per-prompt lengths (``max_new_per_prompt``; sampled at T = 1 with no stop ids, so every
row ends exactly at its length): ``refill="static"`` admits prompts only when every slot is free
(a static batch runs until its longest row ends, as :class:`jdelta.sampling.Sampler`), and
``refill="continuous"`` refills slots as rows finish. Lengths are log-normal with the given median
and 99th percentile, capped at ``--max-new`` (default: the p99). Each side runs twice, the second
(warm, no compilation) is reported; the two sides alternate. Useful tokens/s = generated tokens /
wall time.

    python benchmarks/rollout.py                                  # CPU-sized: median 16, p99 256
    python benchmarks/rollout.py --preset 2b --dtype bfloat16 --median 256 --p99 4096 --prompts 512 --slots 64
    python benchmarks/rollout.py --preset 100m --prompts 64 --p99 64 --compare-head   # + the model's own LM head

``--compare-head`` adds a continuous engine that forms logits with the model's own head
(``DecodeOptions(head_copy=False)``; on CPU the default copies a tied head to a contiguous ``[H, V]``
once per call), in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_decode import build_model, versions  # noqa: E402  (benchmarks/gpu_decode.py)
from sampling import PRESETS  # noqa: E402

PRESETS = {**PRESETS, "cpu": dict(vocab=4096, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                                  intermediate=384)}


def heavy_tailed_lengths(n: int, median: float, p99: float, cap: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths with the given median and 99th percentile, in ``[1, cap]``."""
    sigma = np.log(p99 / median) / 2.3263478740408408  # z of the 99th percentile
    z = np.random.default_rng(seed).standard_normal(n)
    return np.clip(np.round(median * np.exp(sigma * z)), 1, cap).astype(np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--median", type=float, default=16)
    ap.add_argument("--p99", type=float, default=256)
    ap.add_argument("--max-new", type=int, default=None)
    ap.add_argument("--chunk-steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-head", action="store_true", help="add a continuous engine without the LM head copy")
    args = ap.parse_args(argv)
    max_new = args.max_new or int(args.p99)
    print(versions(), flush=True)

    from jdelta.rollout_engine import RolloutEngine
    from jdelta.sampling import DecodeOptions, SamplingParams

    p = PRESETS[args.preset]
    model, _ = build_model(p, args.dtype, logit_std=3.0)
    rng = np.random.default_rng(args.seed)
    prompts = [{"input_ids": rng.integers(1, p["vocab"] - 8, args.prompt_len)} for _ in range(args.prompts)]
    caps = heavy_tailed_lengths(args.prompts, args.median, args.p99, max_new, args.seed)
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, n=args.n)

    def rope(ids, grid, mask):  # text-only positions: 0.. over the real tokens
        pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 1)
        return np.broadcast_to(pos[None], (3,) + mask.shape).astype(np.int32), (mask.sum(-1) - mask.shape[1])

    sides = {"static": ("static", None), "continuous": ("continuous", None)}
    if args.compare_head:
        sides["continuous, model's head"] = ("continuous", DecodeOptions(head_copy=False))
    engines = {label: RolloutEngine(model, slots=args.slots, prompt_len=args.prompt_len, chunk_steps=args.chunk_steps,
                                    refill=mode, rope_index_fn=rope, decode_options=opts)
               for label, (mode, opts) in sides.items()}
    results = {}
    for _ in range(2):  # the second round is warm
        for mode, engine in engines.items():
            t0 = time.perf_counter()
            res = engine.generate(prompts, params, rng=args.seed, max_new_per_prompt=caps)
            results[mode] = (time.perf_counter() - t0, res)
            print(f"{mode}: {time.perf_counter() - t0:.1f} s, {res.stats['steps']} steps", flush=True)
    for label, (_, res) in results.items():
        assert (res.tokens == results["static"][1].tokens).all(), f"completions differ: {label}"
    tokens = int(np.repeat(caps, args.n).sum())
    print(f"\nQwen3-VL {args.preset} shape ({args.dtype}), {args.slots} slots, {args.prompts} prompts x n {args.n}, "
          f"prompt {args.prompt_len} tokens; lengths: median {np.median(caps):.0f}, p99 "
          f"{np.percentile(caps, 99):.0f}, max {caps.max()}, mean {caps.mean():.1f} ({tokens:,} tokens)\n")
    print("| batching | wall (s) | decode steps | slot utilization | chunks | prefills | compactions | useful tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, (wall, res) in results.items():
        s = res.stats
        print(f"| {mode} | {wall:.2f} | {s['steps']:,} | {100 * s['utilization']:.0f}% | {s['chunks']} "
              f"| {s['prefills']} | {s['compactions']} | {tokens / wall:,.0f} |")
    ratio = results["static"][0] / results["continuous"][0]
    print(f"\ncontinuous / static useful tokens/s: {ratio:.2f}x (completions identical)")
    if args.compare_head:
        head = results["continuous, model's head"][0] / results["continuous"][0]
        print(f"continuous with the head copy / with the model's head: {head:.2f}x")


if __name__ == "__main__":
    main()
