"""Throughput, MFU and memory of the student distillation train step (Qwen3-VL, random weights).

The step measured is the one ``jdelta distill`` runs: student forward + backward over
``prompt ++ completion`` (``--seq`` tokens per row), per-token reverse KL to the teacher on
the last ``--completion`` positions from both models' hidden states and LM heads, AdamW
update with global-norm clipping. The teacher's hidden states are random (its forward is
the scoring phase, not the step); its LM head is ``[--teacher-hidden, V]``.

FLOPs follow MaxText's convention (``bounds.train_step_flops``): ``6 * (decoder matmul params
* B * S + LM head params * B * T)`` (decoder projections over all ``S`` positions; the student's
LM head only over the ``T`` completion positions, where the chunked KL runs it; embeddings and
norms excluded; text tokens only) plus the causal attention term
``3 * 2 * B * S^2 * heads * head_dim * layers`` (non-causal 4 B S^2 h d, halved for causal,
x3 for forward + backward). The KL's extra teacher-head matmul is not counted (as MaxText
counts only the trained model), so MFU is slightly understated. MFU = FLOPs / time / peak,
with the peak of the device's bf16 dense tensor throughput (H100/H200 SXM: 989 TFLOP/s).

``--loss both`` also compiles the step with a naive loss (full ``[B, T, V]`` logits of both
models) and prints XLA's temp-memory figure of each and the ratio.

    PYTHONPATH=. python benchmarks/train_step.py --size 2b --batch 8 --seq 1024 --completion 512
    python benchmarks/train_step.py --size tiny --steps 3          # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.distill.on_policy import DistillConfig, make_distill_loss
from jdelta.distill.step import make_train_step
from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer
from jdelta.losses import opd_loss, token_divergence
from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bounds  # noqa: E402  (benchmarks/bounds.py)

TINY = {"model_type": "qwen3_vl", "tie_word_embeddings": True,
        "text_config": {"vocab_size": 151936, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 6, 6],
                                            "mrope_interleaved": True}},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 128, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}}


def load_config(size: str, dtype: str, remat: str, attention: str) -> Qwen3VLConfig:
    if size == "tiny":
        d = TINY
    else:
        with open(f"configs/models/qwen3-vl-{size}.json") as f:
            d = json.load(f)
    return Qwen3VLConfig.from_hf_dict(d, dtype=dtype, param_dtype="float32", remat_policy=remat,
                                      attention_impl=attention)


def matmul_params(model: nnx.Module) -> tuple[int, int]:
    """``(decoder projection kernels, LM head [H, V] (tied or not))``: the N of 6ND, split because
    the head runs on the completion positions only."""
    n = 0
    for path, v in nnx.to_flat_state(nnx.state(model.language_model, nnx.Param)):
        name = "/".join(str(p) for p in path)
        if v.get_value().ndim >= 2 and "embed" not in name:
            n += int(v.get_value().size)
    return n, int(np.prod(model.lm_head_weight().shape))


def naive_loss_fn(student, batch, rng, teacher_head):
    """Full [B, T, V] logits of both models: the baseline the chunked loss avoids."""
    t = batch["completion"].shape[1]
    out = student(batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=jnp.swapaxes(batch["position_ids"], 0, 1), return_logits=False)
    h = out.hidden_states[:, -t - 1:-1]
    s_logits = jnp.einsum("bth,hv->btv", h, student.lm_head_weight().astype(h.dtype),
                          preferred_element_type=jnp.float32)
    t_logits = jnp.einsum("bth,hv->btv", batch["teacher_hidden"], teacher_head.astype(batch["teacher_hidden"].dtype),
                          preferred_element_type=jnp.float32)
    kl = token_divergence(s_logits, jax.lax.stop_gradient(t_logits), kind="reverse_kl")
    return opd_loss(kl, batch["completion_mask"]), {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", help="tiny | 2b | 4b | 8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="prompt + completion tokens per row")
    ap.add_argument("--completion", type=int, default=128, help="completion tokens (the KL positions)")
    ap.add_argument("--teacher-hidden", type=int, default=4096, help="teacher hidden size (8B: 4096)")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (masters stay float32)")
    ap.add_argument("--remat", default="none", help="decoder remat policy: none | full | dots | ...")
    ap.add_argument("--attention", default="xla", help="xla | cudnn | auto")
    ap.add_argument("--chunk", type=int, default=256, help="KL chunk (positions)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--loss", default="chunked", choices=("chunked", "naive", "both"))
    args = ap.parse_args()

    dev = jax.devices()[0]
    cfg = load_config(args.size, args.dtype, args.remat, args.attention)
    model = Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    n_dec, n_head = matmul_params(model)
    v = cfg.text.vocab_size
    b, s, t = args.batch, args.seq, args.completion
    rng = np.random.default_rng(0)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, 3, s)).copy()
    cdt = jnp.dtype(args.dtype)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 150000, (b, s)), jnp.int32),
        "attention_mask": jnp.ones((b, s), jnp.int32),
        "position_ids": jnp.asarray(pos),
        "completion": jnp.asarray(rng.integers(0, 150000, (b, t)), jnp.int32),
        "completion_mask": jnp.ones((b, t), jnp.int32),
        "teacher_hidden": jnp.asarray(rng.normal(size=(b, t, args.teacher_hidden)), cdt),
    }
    teacher_head = jnp.asarray(rng.normal(size=(args.teacher_hidden, v)) * 0.02, cdt)
    ocfg = OptimizerConfig(learning_rate=1e-6, total_steps=1000)
    tx = make_optimizer(ocfg)
    dcfg = DistillConfig(mode="reverse_kl", chunk_size=args.chunk)
    layers, h, d = cfg.text.num_hidden_layers, cfg.text.num_attention_heads, cfg.text.head_dim
    flops = bounds.train_step_flops(decoder_matmul_params=n_dec, head_params=n_head, batch=b, seq=s, completion=t,
                                    heads=h, head_dim=d, layers=layers)
    peak = bounds.peak_flops(dev.device_kind)
    print(f"device {dev.device_kind} ({dev.platform}); Qwen3-VL {args.size}: {n_dec / 1e9:.3f} B decoder + "
          f"{n_head / 1e9:.3f} B LM-head matmul params, "
          f"B={b} S={s} T={t} V={v} dtype={args.dtype} remat={args.remat} attention={args.attention}; "
          f"{flops / 1e12:.2f} TFLOP per step (MaxText convention)", flush=True)

    losses = {"chunked": make_distill_loss(dcfg), "naive": naive_loss_fn}
    kinds = ["chunked", "naive"] if args.loss == "both" else [args.loss]
    temp = {}
    for kind in kinds:
        state = TrainState.create(model, tx)
        step = jax.jit(make_train_step(losses[kind], compute_dtype=cdt if args.dtype != "float32" else None),
                       donate_argnums=0)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, teacher_head).compile()
        mem = compiled.memory_analysis()
        temp[kind] = getattr(mem, "temp_size_in_bytes", None)
        print(f"[{kind}] compile {time.perf_counter() - t0:.1f} s; XLA temp memory "
              f"{temp[kind] / 2**30 if temp[kind] else float('nan'):.3f} GiB, arguments "
              f"{getattr(mem, 'argument_size_in_bytes', 0) / 2**30:.3f} GiB", flush=True)
        if kind == "naive" and len(kinds) == 2:
            continue  # memory only: the naive step may not fit
        state, m = compiled(state, batch, teacher_head)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch, teacher_head)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        line = (f"[{kind}] step {med * 1e3:.1f} ms (median of {args.steps}), {b * s / med:,.0f} tokens/s, "
                f"{flops / med / 1e12:.1f} TFLOP/s")
        if peak:
            line += f", MFU {100 * flops / med / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s"
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            line += f", peak device memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
        print(line + f"; loss {float(m['loss']):.4f}", flush=True)
        del state
    if len(temp) == 2 and temp["chunked"]:
        print(f"naive / chunked XLA temp memory: {temp['naive'] / temp['chunked']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
