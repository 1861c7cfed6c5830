"""Curriculum probe: the shipped v1 teacher (reads, short answers) continued on world-v2 completions + evidence hints."""
import json
import sys
import time

import jax.numpy as jnp
import numpy as np

from jdelta.data.tokenizer import load_tokenizer
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
from jdelta.toy import trained_pair
from jdelta.toy.build import evaluate_pair, hinted_rows
from jdelta.toy.train import BalancedRows, _train_step, encode_records, model_inputs
from jdelta.toy.world import WorldConfig, world_records

steps, lr = int(sys.argv[1]), float(sys.argv[2])
t_dir, _ = trained_pair()
tok = load_tokenizer(t_dir)
w = WorldConfig(answer_style="reasoned", hints="evidence")
recs = world_records(w, "train", 6000)
hint = hinted_rows(6000, 0.3, 0)
enc = encode_records(recs, tok, width=128, height=96, length=96, with_pixelated=True, hinted=hint)
print("max len", int(enc.attention_mask.sum(1).max()), flush=True)
held_r = world_records(w, "heldout", 400)
held = encode_records(held_r, tok, width=128, height=96, length=96, with_pixelated=True)
held_h = encode_records(held_r, tok, width=128, height=96, length=96, hinted=True)
model, _ = load_hf_checkpoint(t_dir, vision_max_frame_patches=int(np.prod(enc.grid)))
cfg = model.config
def ev(m, tag):
    r = evaluate_pair(m, m, held, w, held_h)["teacher"]
    print(tag, json.dumps({k: {f: round(100 * v["accuracy"], 1) for f, v in r[k].items()} for k in ("accuracy", "pixelated_accuracy", "hint_accuracy")}), flush=True)
opt = make_optimizer(OptimizerConfig(learning_rate=lr, b1=0.9, b2=0.98, weight_decay=0.01, schedule="cosine",
                     warmup_steps=30, end_lr_fraction=0.05, clip_norm=1.0, total_steps=steps))
state = TrainState.create(model, opt, seed=0)
rng = np.random.default_rng(0)
sampler = BalancedRows(enc.families, enc.answers, rng, {"trend": 2, "counting": 1, "argmax": 3, "argmin": 3})
t0 = time.time()
losses = []
for step in range(steps):
    rows = sampler.take(32)
    pix = rng.random(len(rows)) < 0.2
    inputs = {k: jnp.asarray(v) for k, v in model_inputs(enc, rows, cfg, pixelated=pix).items()}
    state, loss = _train_step(state, inputs, jnp.asarray(enc.target_mask[rows]))
    losses.append(float(loss))
    if (step + 1) % 250 == 0:
        print(step + 1, f"loss {np.mean(losses[-250:]):.3f} {time.time()-t0:.0f}s", flush=True)
ev(state.model(), f"after {steps}")
