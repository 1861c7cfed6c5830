"""Benchmark: answer divergence Δ for many prompts on the host CPU.

1,000,000 prompts, 16 teacher + 16 student answers each, already classed (integer class ids). For
each metric it times Δ from ``[P, C]`` counts, and the full path from ``[P, 16]`` class ids (binning
into counts + Δ). Prints a markdown table (median of ``--repeats`` warm runs; compile time apart).

    python benchmarks/divergence.py [--prompts 1000000] [--samples 16] [--classes 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdelta import divergence as D


def _timeit(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of warm calls) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    return first, statistics.median(warm)


def make_class_ids(num_prompts: int, samples: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Teacher and student class ids ``[P, samples]`` int32 with a skewed, prompt-dependent spread.

    Per prompt, a random number of live classes k in [1, num_classes]; answers follow a geometric-
    like law over them, and the student's law is perturbed on half the prompts (so Δ is a mix of
    zeros and non-zeros, as in real data).
    """
    rng = np.random.default_rng(seed)
    k = rng.integers(1, num_classes + 1, size=(num_prompts, 1))
    u_t = rng.random((num_prompts, samples))
    u_s = rng.random((num_prompts, samples))
    shift = (rng.random((num_prompts, 1)) < 0.5) * 0.5
    teacher = np.minimum(np.floor(-np.log1p(-u_t) * 1.0), k - 1).astype(np.int32)
    student = np.minimum(np.floor(-np.log1p(-u_s) * (1.0 + shift)), k - 1).astype(np.int32)
    return teacher, student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=16, help="answers per model per prompt")
    parser.add_argument("--classes", type=int, default=32, help="padded class width C (2 x 16 at most)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    t_ids, s_ids = make_class_ids(args.prompts, args.samples, args.classes)
    t_ids, s_ids = jnp.asarray(t_ids), jnp.asarray(s_ids)
    c = args.classes
    t_counts = jax.block_until_ready(D.counts_from_class_ids(t_ids, c))
    s_counts = jax.block_until_ready(D.counts_from_class_ids(s_ids, c))
    mask = jax.block_until_ready((t_counts + s_counts) > 0)  # classes that occur; the rest is padding

    print(
        f"# answer divergence: {args.prompts:,} prompts x ({args.samples} + {args.samples}) samples, "
        f"C = {c} padded classes"
    )
    print(
        f"# jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}"
    )
    print()
    print("| step | compile + first (s) | warm median (s) | prompts/s |")
    print("| --- | ---: | ---: | ---: |")

    def row(name: str, fn) -> float:
        first, warm = _timeit(fn, args.repeats)
        print(f"| {name} | {first:.3f} | {warm:.3f} | {args.prompts / warm:,.0f} |", flush=True)
        return warm

    row(
        "class ids -> counts (teacher + student)",
        lambda: (D.counts_from_class_ids(t_ids, c), D.counts_from_class_ids(s_ids, c)),
    )
    for metric in D.METRICS:
        row(
            f"Δ {metric} from counts",
            lambda metric=metric: D.answer_divergence(t_counts, s_counts, mask, metric=metric),
        )
    row("exact zero-delta flag", lambda: D.is_zero_delta(t_counts, s_counts, mask))

    @jax.jit
    def tv_from_ids(a, b):
        tc = D._counts_from_ids_jit(a, c)
        sc = D._counts_from_ids_jit(b, c)
        return D._answer_divergence_jit(tc, sc, (tc + sc) > 0, "tv", jnp.float32(0.5))

    row("class ids -> counts -> Δ tv (one jit)", lambda: tv_from_ids(t_ids, s_ids))
    d = np.asarray(D.answer_divergence(t_counts, s_counts, mask))
    zero = np.asarray(D.is_zero_delta(t_counts, s_counts, mask))
    print()
    print(
        f"# check: mean Δ tv = {d.mean():.4f}, zero-delta fraction = {zero.mean():.4f}, NaN = {np.isnan(d).sum()}"
    )


if __name__ == "__main__":
    main()
