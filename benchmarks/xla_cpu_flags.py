"""XLA:CPU flags: the toy teacher's training step and forward with XNNPACK/YNNPACK fusions on vs off.

Each setting runs in its own subprocess (XLA reads its flags when jax creates the CPU client), the
settings alternating ``--rounds`` times; the table gives per-setting medians and the ratio of
medians. The model is the shipped toy teacher's architecture (random init), batch ``--batch`` rows
of ``--length`` tokens with one 128 x 96 image each, the step ``jdelta.toy.train`` runs.

    python benchmarks/xla_cpu_flags.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jdelta.toy.world import WorldConfig, world_records
from jdelta.toy.train import (ModelSize, encode_records, init_model, model_config, model_inputs, training_config,
                              _loss, _train_step)
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.data.tokenizer import build_demo_tokenizer, load_tokenizer
from jdelta.toy.world import answer_corpus
import tempfile
batch, length, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
w = WorldConfig()
with tempfile.TemporaryDirectory() as d:
    build_demo_tokenizer(d, answer_corpus(w, n=50), vocab_size=512)
    tok = load_tokenizer(d)
enc = encode_records(world_records(w, "train", batch), tok, width=w.width, height=w.height, length=length)
cfg = training_config(model_config(tok, ModelSize(hidden=64, layers=2, intermediate=128, vision_hidden=32)), enc)
state = TrainState.create(init_model(cfg, 0), make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10)))
inputs = {k: jnp.asarray(v) for k, v in model_inputs(enc, np.arange(batch), cfg).items()}
tm = jnp.asarray(enc.target_mask)
fwd = jax.jit(lambda p, i, t: _loss(p, state.graphdef, state.rest, i, t))
def timed(f):
    out = f(); jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f()); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1000
st = [state]
def step():
    st[0], loss = _train_step(st[0], inputs, tm)
    return loss
print(json.dumps({"step_ms": timed(step), "forward_ms": timed(lambda: fwd(state.params, inputs, tm))}))
"""


FUSIONS_OFF = ("--xla_cpu_experimental_xnn_fusion_type= --xla_cpu_experimental_ynn_fusion_type= "
               "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_DISABLED")


def run_child(fusions_off: bool, args) -> dict:
    """One timing in a fresh process, with the fusions off (the flags above) or XLA's defaults."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if fusions_off:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FUSIONS_OFF).strip()
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.length), str(args.reps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    load0 = os.getloadavg()
    res: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.rounds):
        for fusions_off in ((True, False) if r % 2 == 0 else (False, True)):
            res[fusions_off].append(run_child(fusions_off, args))
    import numpy as np

    def med(k, fusions_off):
        return float(np.median([x[k] for x in res[fusions_off]]))

    print(f"toy teacher (64 wide, 2 layers, vision 32), batch {args.batch} x {args.length} tokens, "
          f"{args.rounds} alternating rounds x {args.reps} timed calls; load average {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f} ({time.strftime('%Y-%m-%d %H:%M')})")
    print("| measure | XLA defaults (XNN/YNN fusions on) | fusions off | speed-up |")
    print("|---|---:|---:|---:|")
    for k, name in (("step_ms", "train step (ms)"), ("forward_ms", "forward (ms)")):
        on, off = med(k, False), med(k, True)
        spread_on = [round(x[k], 1) for x in res[False]]
        spread_off = [round(x[k], 1) for x in res[True]]
        print(f"| {name} | {on:.1f} {spread_on} | {off:.1f} {spread_off} | {on / off:.2f}x |")


if __name__ == "__main__":
    main()
