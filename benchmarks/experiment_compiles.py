"""Where a smoke experiment's time goes: its XLA compilations (count, summed time, cache hits) per program.

Runs ``jdelta experiment NAME --seeds 2 --smoke`` for each NAME in one process with a fresh persistent
compilation cache (as the test suite sets it: every program cached), and prints, per experiment, the
wall time, the compilations, the cache hits (programs an earlier experiment of the same run compiled)
and the summed compile time of the misses, then a table of the misses by program name. XLA reads
``XLA_FLAGS`` when jax creates the CPU client, so compare flags with separate runs:

    python benchmarks/experiment_compiles.py vicur
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1" \\
        python benchmarks/experiment_compiles.py vicur --out /tmp/o1

``--out DIR``: keep each experiment's output under ``DIR/NAME`` (e.g. to compare ``results.json``
between flag settings); default: a temporary directory.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="experiment names (jdelta.experiments.EXPERIMENTS)")
    ap.add_argument("--out", default=None, help="keep each experiment's output under OUT/NAME")
    args = ap.parse_args(argv)

    import jax
    from jax import monitoring
    from jax._src.interpreters import pxla

    jax.config.update("jax_default_matmul_precision", "highest")  # as the test suite runs
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jdelta-compiles-"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    hits = [0]
    monitoring.register_event_listener(
        lambda event, **kw: hits.__setitem__(0, hits[0] + (event == "/jax/compilation_cache/cache_hits")))
    compiles: list[tuple[str, bool, float]] = []  # (program name, cache hit, seconds)
    from_hlo = pxla.UnloadedMeshExecutable.from_hlo

    def timed(*a, **kw):
        before, t0 = hits[0], time.perf_counter()
        out = from_hlo(*a, **kw)
        compiles.append((a[0] if a else kw["name"], hits[0] > before, time.perf_counter() - t0))
        return out

    pxla.UnloadedMeshExecutable.from_hlo = staticmethod(timed)
    from jdelta import __version__
    from jdelta.cli import main as cli

    print(f"jax {jax.__version__}, jdelta {__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="jdelta-experiments-"))
    rows = []
    for name in args.names:
        n0, t0 = len(compiles), time.perf_counter()
        assert cli(["experiment", name, "--seeds", "2", "--out", str(root / name), "--smoke", "--overwrite"]) == 0
        mine = compiles[n0:]
        misses = [c for c in mine if not c[1]]
        rows.append((name, time.perf_counter() - t0, len(mine), len(mine) - len(misses), sum(c[2] for c in misses)))
        by_program = collections.defaultdict(lambda: [0, 0.0])
        for prog, _, sec in misses:
            by_program[prog][0] += 1
            by_program[prog][1] += sec
        print(f"\n{name}: compiled programs (cache misses) by name\n\n| program | compilations | seconds |\n|---|---:|---:|")
        for prog, (n, sec) in sorted(by_program.items(), key=lambda kv: -kv[1][1]):
            if sec >= 0.1:
                print(f"| `{prog}` | {n} | {sec:.2f} |")
    print("\n| experiment | wall (s) | compilations | cache hits | compile time of the misses (s) |\n|---|---:|---:|---:|---:|")
    for name, wall, n, nh, sec in rows:
        print(f"| {name} | {wall:.1f} | {n} | {nh} | {sec:.1f} |")


if __name__ == "__main__":
    main()
