"""CPU decode step: time it, trace it and aggregate XLA:CPU's op times per step.

The jitted decode loop (``jdelta.sampling.decode``, as the Sampler runs it) on a random Qwen3-VL
text decoder of the preset's shape (``gpu_decode.build_model``), its KV cache set up with
``--prompt`` filled slots, ``--steps`` greedy steps per call, median of ``--repeats`` calls after a
warm-up. ``--profile DIR`` traces one more call (``jax.profiler``) and prints the host-side XLA
op events of that call summed per name, per step (XLA:CPU runs its thunks on the host threads).

XLA flags come from the environment; compare settings in two processes, e.g. XNN/YNN fusions off::

    python benchmarks/cpu_decode.py --profile /tmp/cpu_prof
    XLA_FLAGS="--xla_cpu_experimental_xnn_fusion_type= --xla_cpu_experimental_ynn_fusion_type=" \
        python benchmarks/cpu_decode.py --profile /tmp/cpu_prof_off
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from gpu_decode import build_model, load_trace_events, make_cache, synthetic_logits  # noqa: E402
from sampling import PRESETS  # noqa: E402


def summarize_host_trace(log_dir: str, steps: int, top: int = 20) -> str:
    """Sum the trace's complete events per name (all threads), per decode step, largest first."""
    from collections import defaultdict

    found = load_trace_events(log_dir)
    if found is None:
        return f"profile: no perfetto_trace.json.gz under {log_dir}"
    path, events = found
    thread = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
              for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_name, per_thread = defaultdict(float), defaultdict(float)
    count = defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            per_name[e["name"]] += e["dur"]
            count[e["name"]] += 1
            per_thread[thread.get((e["pid"], e.get("tid")), "?")] += e["dur"]
    lines = [f"profile ({path}, {steps} steps); event time per thread (ms/step): " + ", ".join(
        f"{t}: {d / steps / 1e3:.1f}" for t, d in sorted(per_thread.items(), key=lambda kv: -kv[1])[:6])]
    for name, dur in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {dur / steps / 1e3:9.3f} ms/step  x{count[name] / steps:6.1f}/step  {name[:120]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="100m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128, help="filled cache slots when decoding starts")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--head-copy", choices=("auto", "on", "off"), default="auto",
                    help="DecodeOptions.head_copy (auto: on the CPU backend)")
    ap.add_argument("--profile", default=None, help="trace one more call into this directory")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdelta.sampling import DecodeOptions, SamplingParams, decode

    print(f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    model, cfg = build_model(PRESETS[args.preset], args.dtype, 6.0)
    graphdef, state = nnx.split(model)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.steps)
    options = DecodeOptions(head_copy={"auto": None, "on": True, "off": False}[args.head_copy])
    cap, b = args.prompt + args.steps, args.batch

    def run(state, cache, logits, deltas, rng, temperature, top_p, stops, live):
        return decode(graphdef, state, cache, logits, deltas, rng, temperature, top_p, stops, live,
                      params=params, options=options, first_slot=args.prompt)

    fn = jax.jit(run, donate_argnums=(1,))
    cache = make_cache(model, b, cap, args.prompt)
    logits = synthetic_logits(b, cfg.text.vocab_size, 6.0)
    rest = (jnp.zeros((b,), jnp.int32), jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0),
            jnp.full((4,), -1, jnp.int32), jnp.ones((b,), bool))
    t = time.perf_counter()
    compiled = fn.lower(state, cache, logits, *rest).compile()
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        out = compiled(state, cache, logits, *rest)
        steps = int(out.steps)
        dt = time.perf_counter() - t
        cache = out.cache.replace(index=jnp.int32(args.prompt))
        if i:
            times.append(1e3 * dt / steps)
    print(f"head_copy {args.head_copy}; decode step {args.preset} {args.dtype} batch {b}, {args.prompt}+{args.steps} slots: median "
          f"{np.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}; {args.repeats} calls of "
          f"{args.steps} steps); compile {compile_s:.1f} s", flush=True)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            out = compiled(state, cache, logits, *rest)
            steps = int(out.steps)
        print(summarize_host_trace(args.profile, steps), flush=True)


if __name__ == "__main__":
    main()
