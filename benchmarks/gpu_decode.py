"""Decode-step benchmark, side by side in one run: dense vs length-bounded attention, full-sort vs
preselected top-p, against the HBM bound.

No checkpoint and no torch: a random Qwen3-VL text decoder of the preset's shape (``2b``: Qwen3-VL-2B,
tied 151,936-entry vocabulary) is built on the device in ``--dtype``; its KV cache is set up directly
with ``fill`` filled slots (rows left-padded by 0-24 slots) and the Sampler's jitted decode loop
(``jdelta.sampling.decode``, cache donated) runs ``--steps`` steps from there, so only decode programs
are compiled. Cases, for each batch (``--batches``, the first is the most important):

* ``short``: the recorded shape (``--prompt`` filled slots + ``--steps`` new in a cache of exactly
  that size), greedy. Bounded = dense here (no shorter prefix exists), so it is run once.
* ``long``: the same fill in a cache of ``--long-cap`` slots (a long rollout's budget; capped so the
  KV cache stays under ``--kv-gb``), greedy: dense reads every slot, bounded reads a prefix.
* ``top-p``: the short shape sampled at T = 1, top-p ``--top-p``: full sort vs preselection of
  ``--candidates`` (plain ``lax.top_k``; and grouped: top-8 per group of 256 first).

Then a sampling-only table (``sample_step`` on ``[B, V]`` logits) for the same top-p variants.
Logits are peaked like an LM's (the tied embedding is scaled so logits have std ``--logit-std``);
the table reports the nucleus size and how often it fits the preselection (else the batch falls
back to the sort). The HBM bound (``bounds.py``): decoder weights + LM head once + B embedding rows
+ the live KV cache (fill + steps / 2 slots per row), over the device's bandwidth.

``--profile DIR`` traces one call of the first short case (``jax.profiler``) and prints, per decode
step, the device kernel count and time, the span they cover (busy fraction: low = launch/host bound)
and the kernels taking most time.

    PYTHONPATH=. python3 benchmarks/gpu_decode.py --preset 2b --profile /tmp/decode_profile   # H100/H200, ~5-6 min
    python benchmarks/gpu_decode.py --preset tiny                                            # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling import PRESETS, decode_bound  # noqa: E402  (benchmarks/sampling.py)


def versions() -> str:
    import flax
    import jax
    import jaxlib

    dev = jax.devices()[0]
    return (f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
            f"flax {flax.__version__}, numpy {np.__version__}; backend {jax.default_backend()}, "
            f"{len(jax.devices())} x {dev.device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def build_model(p: dict, dtype: str, logit_std: float):
    """A random Qwen3-VL (tiny vision tower: decode never runs it) with the preset's text shape."""
    import jax.numpy as jnp
    from flax import nnx

    from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from jdelta.models.qwen3_vl.config import Qwen3VLTextConfig, Qwen3VLVisionConfig

    hd = p["head_dim"]
    text = Qwen3VLTextConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                             num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                             num_key_value_heads=p["kv_heads"], head_dim=hd,
                             mrope_section=(hd // 8, 3 * hd // 16, 3 * hd // 16), max_position_embeddings=1 << 20)
    vision = Qwen3VLVisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                 out_hidden_size=p["hidden"], num_position_embeddings=64,
                                 deepstack_visual_indexes=(0,))
    cfg = Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=True, dtype=dtype, param_dtype=dtype)
    model = Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    # Logit std ~ sqrt(H) * embedding std (final RMSNorm output has unit RMS): make logits LM-like.
    emb = model.language_model.embed_tokens
    scale = logit_std / (float(jnp.std(emb.get_value()[:1024].astype(jnp.float32))) * p["hidden"] ** 0.5)
    emb.set_value((emb.get_value().astype(jnp.float32) * scale).astype(emb.get_value().dtype))
    return model, cfg


def make_cache(model, batch: int, cap: int, fill: int):
    """An all-zero cache of ``cap`` slots, rows valid over ``[pad_b, fill)`` with ``pad_b`` = 0, 8, 16, 24."""
    import jax.numpy as jnp

    cache = model.init_cache(batch, cap)
    pad = (np.arange(batch) % 4) * min(8, fill // 8)
    slots = np.arange(cap)
    valid = (slots[None] >= pad[:, None]) & (slots[None] < fill)
    return cache.replace(valid=jnp.asarray(valid), index=jnp.int32(fill))


def synthetic_logits(batch: int, vocab: int, std: float, seed: int = 0):
    import jax
    import jax.numpy as jnp

    return jax.random.normal(jax.random.key(seed), (batch, vocab), jnp.float32) * std


class Bench:
    def __init__(self, args, model, cfg):
        import jax
        from flax import nnx

        self.args, self.model, self.cfg = args, model, cfg
        self.graphdef, self.state = nnx.split(model)
        self.device = str(jax.devices()[0].device_kind)
        self.t0 = time.perf_counter()
        self.rows = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def decode_case(self, *, label: str, batch: int, fill: int, cap: int, sampled: bool, options, top_p_name: str,
                    profile_dir: str | None = None):
        import jax
        import jax.numpy as jnp

        from jdelta.sampling import SamplingParams, decode

        args = self.args
        row = {"batch": batch, "case": label, "slots": f"{fill}+{args.steps} / {cap}",
               "attention": options.attention, "top_p": top_p_name if sampled else "greedy"}
        segments = options.segments(fill, cap)
        row["segments"] = ",".join(str(s) for s in segments)
        if self.over_budget():
            row["note"] = "skipped (time budget)"
            self.rows.append(row)
            print(row, flush=True)
            return row
        try:
            params = SamplingParams(temperature=1.0 if sampled else 0.0, top_p=0.5 if sampled else 1.0,
                                    max_new_tokens=args.steps)
            graphdef = self.graphdef

            def run(state, cache, logits, deltas, rng, temperature, top_p, stops, live):
                return decode(graphdef, state, cache, logits, deltas, rng, temperature, top_p, stops, live,
                              params=params, options=options, first_slot=fill)

            fn = jax.jit(run, donate_argnums=(1,))
            cache = make_cache(self.model, batch, cap, fill)
            logits = synthetic_logits(batch, self.cfg.text.vocab_size, args.logit_std)
            rest = (jnp.zeros((batch,), jnp.int32), jax.random.key(0), jnp.float32(1.0),
                    jnp.float32(args.top_p if sampled else 1.0), jnp.full((4,), -1, jnp.int32),
                    jnp.ones((batch,), bool))
            t = time.perf_counter()
            compiled = fn.lower(self.state, cache, logits, *rest).compile()
            row["compile_s"] = time.perf_counter() - t
            times = []
            for i in range(args.repeats + 1):
                t = time.perf_counter()
                out = compiled(self.state, cache, logits, *rest)
                steps = int(out.steps)  # waits for the result
                dt = time.perf_counter() - t
                cache = out.cache.replace(index=jnp.int32(fill))
                if i:  # the first call warms up
                    times.append(dt / steps)
            if profile_dir:
                try:
                    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                        out = compiled(self.state, cache, logits, *rest)
                        steps = int(out.steps)
                    cache = out.cache
                    print(summarize_trace(profile_dir, steps), flush=True)
                except Exception as e:  # noqa: BLE001 -- the profile is an extra
                    print(f"profile failed: {type(e).__name__}: {e}", flush=True)
            del cache, out
            step_ms = 1e3 * float(np.median(times))
            row.update(step_ms=step_ms, tok_s=batch / step_ms * 1e3)
            row.update(decode_bound(self.model, self.cfg, rows=batch, live_len=fill + args.steps / 2,
                                    dtype=args.dtype, device=self.device, hbm_gbps=args.hbm_gbps, step_ms=step_ms))
        except Exception as e:  # noqa: BLE001 -- one failed case (e.g. out of memory) must not end the run
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        self.rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row


def load_trace_events(log_dir: str) -> tuple[str, list[dict]] | None:
    """``(path, Chrome trace events)`` of the newest ``perfetto_trace.json.gz`` under ``log_dir``
    (a ``jax.profiler`` trace directory), or None when there is none."""
    import glob
    import gzip
    import json

    files = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        return None
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return files[-1], data["traceEvents"] if isinstance(data, dict) else data


def summarize_trace(log_dir: str, steps: int, top: int = 15) -> str:
    """Per decode step: device kernel time, its span and the kernels taking most time, from the
    newest ``perfetto_trace.json.gz`` under ``log_dir`` (Chrome trace events)."""
    from collections import defaultdict

    found = load_trace_events(log_dir)
    if found is None:
        return f"profile: no perfetto_trace.json.gz under {log_dir}"
    path, events = found
    proc, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            proc[e["pid"]] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(proc.get(e["pid"], "?"), thread.get((e["pid"], e.get("tid")), "?"))].append(e)
    lines = [f"profile ({path}, {steps} steps): threads " + ", ".join(
        f"{p}/{t}: {len(v)}" for (p, t), v in sorted(by_thread.items(), key=lambda kv: -len(kv[1]))[:8])]
    device = {k: v for k, v in by_thread.items() if "device" in k[0].lower() or "gpu" in k[0].lower()}
    streams = {k: v for k, v in device.items() if "stream" in k[1].lower()} or device
    for (p, t), evs in sorted(streams.items(), key=lambda kv: -len(kv[1]))[:2]:
        busy = sum(e["dur"] for e in evs)
        span = max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs)
        per_name = defaultdict(float)
        for e in evs:
            per_name[e["name"]] += e["dur"]
        lines.append(f"  {p} / {t}: {len(evs) / steps:.0f} kernels per step, kernel time {busy / steps / 1e3:.3f} ms "
                     f"per step, span {span / steps / 1e3:.3f} ms per step (busy {100 * busy / max(span, 1):.0f}%)")
        for name, dur in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {dur / steps / 1e3:8.4f} ms/step  {100 * dur / busy:5.1f}%  {name[:110]}")
    return "\n".join(lines)


def sampling_table(args, vocab: int, variants, bench) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jdelta.sampling import SamplingParams, sample_step
    from jdelta.top_p import nucleus_fits, nucleus_threshold_sorted

    params = SamplingParams(temperature=1.0, top_p=0.5)
    out = []
    for b in args.batches:
        if bench.over_budget():
            print(f"sampling table: batch {b} skipped (time budget)", flush=True)
            continue
        logits = synthetic_logits(b, vocab, args.logit_std, seed=1)
        keys = jax.random.split(jax.random.key(0), b)
        thr = nucleus_threshold_sorted(logits, args.top_p)
        size = np.asarray(jnp.sum(logits >= thr, axis=-1))
        fits = np.asarray(nucleus_fits(logits, args.top_p, args.candidates))
        for name, options in variants:
            f = jax.jit(lambda k, x, p, o=options: sample_step(k, x, params, top_p=p, options=o))
            jax.block_until_ready(f(keys, logits, jnp.float32(args.top_p)))
            ts = []
            for _ in range(args.repeats * 3):
                t = time.perf_counter()
                jax.block_until_ready(f(keys, logits, jnp.float32(args.top_p)))
                ts.append(time.perf_counter() - t)
            out.append({"batch": b, "top_p": name, "ms": 1e3 * float(np.median(ts)),
                        "nucleus_median": int(np.median(size)), "nucleus_max": int(size.max()),
                        "fits": float(fits.mean())})
            print(out[-1], flush=True)
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="2b")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (2b), float32 otherwise")
    ap.add_argument("--batches", default=None, help="comma list; default 64,8,256 (tiny: 4,2)")
    ap.add_argument("--prompt", type=int, default=128, help="filled cache slots when decoding starts")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
    ap.add_argument("--long-cap", type=int, default=None, help="cache slots of the long case (default 2304; tiny 512)")
    ap.add_argument("--kv-gb", type=float, default=40.0, help="cap on the long case's KV cache size (GB)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--candidates", type=int, default=1024, help="top-p preselection width")
    ap.add_argument("--logit-std", type=float, default=6.0, help="std of the synthetic / model logits")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-gbps", type=float, default=None, help="bandwidth (default: from the device name)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="start no case after this many seconds (a 2B case takes up to ~1 min)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: short,long,topp,sampling")
    ap.add_argument("--profile", default=None, help="trace one call of the first short case into this directory "
                    "and print the device kernel time per step and the top kernels")
    args = ap.parse_args(argv)
    tiny = args.preset == "tiny"
    args.dtype = args.dtype or ("bfloat16" if args.preset == "2b" else "float32")
    args.batches = [int(b) for b in (args.batches or ("4,2" if tiny else "64,8,256")).split(",")]
    args.long_cap = args.long_cap or (512 if tiny else 2304)
    if tiny:
        args.prompt, args.steps = min(args.prompt, 40), min(args.steps, 16)
        args.candidates = min(args.candidates, 64)  # below the tiny vocabulary (1,024)
    skip = set(filter(None, args.skip.split(",")))

    print(versions(), flush=True)
    import jax

    from jdelta.sampling import DecodeOptions

    p = PRESETS[args.preset]
    t = time.perf_counter()
    model, cfg = build_model(p, args.dtype, args.logit_std)
    jax.block_until_ready(jax.tree.leaves(model))
    print(f"model {args.preset} ({args.dtype}) built in {time.perf_counter() - t:.1f} s", flush=True)
    bench = Bench(args, model, cfg)
    t_ = cfg.text
    slot_bytes = 2 * t_.num_hidden_layers * t_.num_key_value_heads * t_.head_dim * np.dtype(
        "float32" if args.dtype == "float32" else "float16").itemsize
    min_seg = 256 if not tiny else 32
    dense = DecodeOptions(attention="dense", top_p_candidates=0)
    bounded = DecodeOptions(attention="bounded", kv_segment_min=min_seg, top_p_candidates=0)
    sort = dense
    pre = DecodeOptions(attention="bounded", kv_segment_min=min_seg, top_p_candidates=args.candidates)
    grouped = DecodeOptions(attention="bounded", kv_segment_min=min_seg, top_p_candidates=args.candidates,
                            top_p_group=256)
    short_cap = args.prompt + args.steps
    for b in args.batches:
        if "short" not in skip:
            bench.decode_case(label="short", batch=b, fill=args.prompt, cap=short_cap, sampled=False, options=dense,
                              top_p_name="greedy", profile_dir=args.profile if b == args.batches[0] else None)
        if "long" not in skip:
            cap = min(args.long_cap, int(args.kv_gb * 1e9 / (b * slot_bytes)) // min_seg * min_seg)
            if cap > short_cap:
                for o in (dense, bounded):
                    bench.decode_case(label="long", batch=b, fill=args.prompt, cap=cap, sampled=False, options=o,
                                      top_p_name="greedy")
        if "topp" not in skip and b == args.batches[0]:
            for name, o in (("sort", sort), (f"preselect {args.candidates}", pre),
                            (f"grouped {args.candidates}", grouped)):
                bench.decode_case(label="top-p", batch=b, fill=args.prompt, cap=short_cap, sampled=True, options=o,
                                  top_p_name=name)
    samp = [] if "sampling" in skip else sampling_table(
        args, cfg.text.vocab_size, (("sort", sort), (f"preselect {args.candidates}", pre),
                                    (f"grouped {args.candidates}", grouped)), bench)

    print(f"\n## Decode step, Qwen3-VL {args.preset} shape, {args.dtype}, {bench.device}, "
          f"{args.steps} steps per call, median of {args.repeats}\n")
    print("| batch | case | KV slots (fill+steps / cache) | attention (prefixes) | sampling | step ms | tok/s "
          "| HBM bound ms | step / bound | compile s | vs the first row of its batch + case |")
    print("| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for r in bench.rows:
        key = (r["batch"], r["case"])
        ms = r.get("step_ms")
        if ms is not None and key not in base:
            base[key] = ms
        ratio = f"speed-up {base[key] / ms:.2f}x" if ms is not None and key in base and base[key] != ms else "-"
        bound = r.get("bound_ms")
        print(f"| {r['batch']} | {r['case']} | {r['slots']} | {r['attention']} ({r['segments']}) | {r['top_p']} "
              f"| {fmt(ms, '.3f')} | {fmt(r.get('tok_s'), ',.0f')} | {fmt(bound, '.3f')} "
              f"| {fmt(ms / bound if ms and bound else None, '.2f')} | {fmt(r.get('compile_s'), '.1f')} "
              f"| {r.get('note', ratio)} |")
    if samp:
        print(f"\n## Sampling step alone (temperature 1, top-p {args.top_p}, V = {cfg.text.vocab_size}, "
              f"logit std {args.logit_std})\n")
        print("| batch | top-p | ms | nucleus median / max (tokens) | rows whose nucleus fits |")
        print("| ---: | --- | ---: | --- | ---: |")
        for r in samp:
            print(f"| {r['batch']} | {r['top_p']} | {r['ms']:.3f} | {r['nucleus_median']} / {r['nucleus_max']} "
                  f"| {100 * r['fits']:.0f}% |")
    print(f"\ntotal {time.perf_counter() - bench.t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
