"""How the DeltaPrompts pipeline's cost grows with the number of seeds.

Runs ``jdelta pipeline`` (library call, same code as the CLI) on the *oracle pair* (a
deterministic toy teacher/student whose student fails the ``trend`` family; answers go through
the real answer classing, Δ metrics and zero-delta tests of ``jdelta.delta_scoring.delta_records``) and
the oracle writer, with the procedural seed source. Synthesis budgets scale with the seeds
(writer seeds and steered records = ``--budget`` x seeds), so linear scaling means a constant
time per seed. One warm-up run (JAX compile of the Δ programs) is excluded.

    python benchmarks/pipeline_scaling.py --sizes 1000 4000 16000 --out /tmp/pipeline_scaling

Prints a markdown table (seconds, ms per seed, per-stage seconds) and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from jdelta.synth.pipeline import Pipeline


def config(n: int, budget: float, rounds: int, width: int, height: int, unit: int, perms: int = 19) -> dict:
    k = max(1, int(n * budget))
    return {
        "seed": 0,
        "rounds": rounds,
        "unit_size": unit,
        "source": {"kind": "procedural", "n": n, "width": width, "height": height},
        "scorer": {"kind": "oracle", "failing_families": ["trend"], "sampling": {"n": 8},
                   "delta": {"num_permutations": perms, "num_posterior_draws": perms + 1}},
        "synthesis": {"writer": {"kind": "oracle", "seeds": k, "k": 3}, "steered": {"n": k, "width": width, "height": height},
                      "next_round_seeds": k},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--budget", type=float, default=0.1, help="writer seeds and steered records per seed")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--permutations", type=int, default=19, help="zero-delta permutation test size per prompt")
    ap.add_argument("--unit", type=int, default=256, help="records per unit (resume/shard granularity)")
    ap.add_argument("--out", default="/tmp/pipeline_scaling")
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    # Warm-up: compile the Δ programs for this unit size.
    Pipeline(root / "warmup", config(64, args.budget, 1, args.width, args.height, args.unit, args.permutations)).run()
    rows = []
    for n in args.sizes:
        p = Pipeline(root / f"n{n}", config(n, args.budget, args.rounds, args.width, args.height, args.unit, args.permutations))
        t0 = time.perf_counter()
        m = p.run()
        sec = time.perf_counter() - t0
        st = m["stages"]
        rows.append({"seeds": n, "seconds": round(sec, 2), "ms_per_seed": round(1000 * sec / n, 3),
                     "candidates": sum(v["out"] for k, v in st.items() if k.endswith("/synth")),
                     "output_records": st["output"]["out"], "stage_seconds": m["seconds_by_stage"]})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ms_per_seed"]
    print(f"\nDevice: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); oracle pair, "
          f"images {args.width}x{args.height}, budget {args.budget}, rounds {args.rounds}, unit {args.unit}, "
          f"{args.permutations} permutations\n")
    stages = sorted({k.split("/")[-1] for r in rows for k in r["stage_seconds"]})
    print("| seeds | candidates | output | seconds | ms / seed | x 1st | " + " | ".join(stages) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(stages))
    for r in rows:
        per = {s: sum(v for k, v in r["stage_seconds"].items() if k.split("/")[-1] == s) for s in stages}
        print(f"| {r['seeds']} | {r['candidates']} | {r['output_records']} | {r['seconds']} | {r['ms_per_seed']} | "
              f"{r['ms_per_seed'] / base:.2f} | " + " | ".join(f"{per[s]:.1f}" for s in stages) + " |")
    (root / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
