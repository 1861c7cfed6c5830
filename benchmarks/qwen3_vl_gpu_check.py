"""Qwen3-VL on an accelerator: attention implementations / dtypes against fp32 XLA, and
prefill + decode timings of the 2B shape with random weights.

    PYTHONPATH=. python benchmarks/qwen3_vl_gpu_check.py [--size 2b] [--seq 2048] [--batch 4]

Prints one line per check. Needs no checkpoint (random weights), no network.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdelta.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, get_rope_index
from jdelta.models.qwen3_vl.info import resolve_config

TINY = {
    "model_type": "qwen3_vl", "image_token_id": 250, "video_token_id": 251, "vision_start_token_id": 252,
    "vision_end_token_id": 253, "tie_word_embeddings": True,
    "text_config": {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2,
                      "out_hidden_size": 256, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
}


def batch(config, rows, seq, seed=0):
    """Left-padded ids with images; rows: list of lists of text counts / (t,h,w) grids."""
    rng = np.random.default_rng(seed)
    v = config.vision
    seqs, grids = [], []
    for row in rows:
        s = []
        for seg in row:
            if isinstance(seg, tuple):
                s += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(seg)) // 4) + [
                    config.vision_end_token_id]
                grids.append(seg)
            else:
                s += list(rng.integers(1, 200, seg))
        seqs.append(s)
    ids = np.zeros((len(rows), seq), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, seq - len(s):], mask[i, seq - len(s):] = s, 1
    grid = np.array(grids, np.int32)
    pv = rng.normal(size=(int(grid.prod(-1).sum()), v.patch_dim)).astype(np.float32)
    pos, _ = get_rope_index(ids, grid, mask, config)
    return [jnp.asarray(x) for x in (ids, mask, pos, pv, grid)]


def forward_fn(graphdef):
    @jax.jit
    def f(state, ids, mask, pos, pv, grid):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, position_ids=pos, pixel_values=pv,
                                          image_grid_thw=grid).logits
    return f


def check_impls():
    base = Qwen3VLConfig.from_hf_dict(TINY)
    ref_model = Qwen3VLForConditionalGeneration(base, rngs=nnx.Rngs(0))
    nnx.update(ref_model, jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, nnx.state(ref_model, nnx.Param)))
    params = nnx.state(ref_model, nnx.Param)
    inputs = batch(base, [[5, (1, 8, 12), 7, (1, 4, 4), 3], [11, (1, 16, 8), 9]], 128)
    valid = np.asarray(inputs[1]).astype(bool)
    ref = np.asarray(forward_fn(nnx.graphdef(ref_model))(params, *inputs))[valid]
    print(f"reference fp32/xla logits: max|x|={np.abs(ref).max():.2f} std={ref.std():.2f}")
    for impl, dtype in [("xla", "bfloat16"), ("cudnn", "bfloat16"), ("cudnn", "float16")]:
        cfg = base.replace(attention_impl=impl, dtype=dtype)
        m = Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        try:
            got = np.asarray(forward_fn(nnx.graphdef(m))(params, *inputs)).astype(np.float32)[valid]
            print(f"{impl:5s} {dtype:8s}: max|diff| vs fp32 = {np.abs(got - ref).max():.3e}, "
                  f"top-1 agreement {np.mean(got.argmax(-1) == ref.argmax(-1)):.3f}")
        except Exception as e:  # report, keep going
            print(f"{impl:5s} {dtype:8s}: FAILED {type(e).__name__}: {str(e)[:300]}")


def timing(size, seq, b, impl):
    cfg = Qwen3VLConfig.from_pretrained(resolve_config(size), dtype="bfloat16", param_dtype="bfloat16",
                                        attention_impl=impl)
    model = nnx.jit(lambda: Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    rows = [[40, (1, 32, 32), 60, (1, 24, 40), 50]] * b
    ids, mask, pos, pv, grid = batch(cfg, rows, seq)
    new = 64

    @jax.jit
    def prefill(state, ids, mask, pos, pv, grid):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(b, seq + new)
        out = m(ids, attention_mask=mask, position_ids=pos, pixel_values=pv, image_grid_thw=grid, cache=cache,
                return_logits=False)
        last = out.hidden_states[:, -1] @ m.lm_head_weight()
        return jnp.argmax(last, -1).astype(jnp.int32), out.cache, out.rope_deltas

    @jax.jit
    def decode(state, tok, cache, deltas):
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            tok, cache = carry
            p = jnp.broadcast_to((cache.index + deltas)[None, :, None], (3, b, 1))
            o = m(tok[:, None], attention_mask=jnp.ones((b, 1), bool), position_ids=p, cache=cache)
            return jnp.argmax(o.logits[:, -1], -1).astype(jnp.int32), o.cache

        return jax.lax.fori_loop(0, new, body, (tok, cache))

    tok, cache, deltas = prefill(state, ids, mask, pos, pv, grid)
    jax.block_until_ready(tok)
    t = time.perf_counter()
    for _ in range(3):
        tok, cache, deltas = prefill(state, ids, mask, pos, pv, grid)
    jax.block_until_ready(tok)
    tp = (time.perf_counter() - t) / 3
    out = decode(state, tok, cache, deltas)
    jax.block_until_ready(out)
    t = time.perf_counter()
    out = decode(state, tok, cache, deltas)
    jax.block_until_ready(out)
    td = time.perf_counter() - t
    print(f"{size} bf16 {impl}: prefill B={b} S={seq} ({pv.shape[0]} patches) {tp * 1e3:.1f} ms "
          f"({b * seq / tp:.0f} tok/s); decode {new} steps {td * 1e3:.1f} ms ({td / new * 1e3:.2f} ms/step, "
          f"{b * new / td:.0f} tok/s)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    print(jax.devices())
    check_impls()
    for impl in ("xla", "cudnn"):
        try:
            timing(args.size, args.seq, args.batch, impl)
        except Exception as e:
            print(f"timing {impl} FAILED {type(e).__name__}: {str(e)[:300]}")
