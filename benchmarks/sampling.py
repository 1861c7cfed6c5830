"""Sampler throughput: jdelta (JAX, one jitted decode loop) vs transformers' ``generate`` (PyTorch).

Both run on the same random Qwen3-VL weights (an HF model built from a config, saved with
``save_pretrained`` and loaded by jdelta) and the same inputs: ``--batch`` prompts of
``--prompt-len`` tokens, each with one image of ``--image-grid`` patches, ``--new-tokens``
generated per sample (no stop ids, so every row generates them all).

Prints a table: output tokens/s, prefill tokens/s, decode step time, compile count and time,
transformers' tokens/s and the ratio. ``--gpu-bound`` adds the decode step against the HBM
bound: (decoder weights + LM head once + B embedding rows + live KV) / bandwidth (``bounds.py``).

    python benchmarks/sampling.py                      # ~100M-param config, batch 16, 128+64 tokens
    python benchmarks/sampling.py --preset 2b --dtype bfloat16 --batch 64 --no-hf --gpu-bound
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bounds  # noqa: E402  (benchmarks/bounds.py)

PRESETS = {
    # ~100M parameters with the real vocabulary (the tied embedding is 78M of it).
    "100m": dict(vocab=151936, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1536,
                 vision_depth=4, vision_hidden=256, vision_heads=4, vision_intermediate=1024, deepstack=(1, 3)),
    # Qwen3-VL-2B shapes.
    "2b": dict(vocab=151936, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
               vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096, deepstack=(5, 11, 17)),
    "tiny": dict(vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                 vision_depth=2, vision_hidden=32, vision_heads=2, vision_intermediate=64, deepstack=(0, 1)),
}
IMG, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653


def hf_config(p: dict):
    from transformers import Qwen3VLConfig

    vocab = p["vocab"]
    ids = (IMG, VIDEO, VSTART, VEND) if vocab > IMG else (vocab - 4, vocab - 3, vocab - 2, vocab - 1)
    return Qwen3VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"], max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [p["head_dim"] // 8, 3 * p["head_dim"] // 16,
                                                            3 * p["head_dim"] // 16], "mrope_interleaved": True}),
        vision_config=dict(depth=p["vision_depth"], hidden_size=p["vision_hidden"],
                           intermediate_size=p["vision_intermediate"], num_heads=p["vision_heads"],
                           out_hidden_size=p["hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=list(p["deepstack"])),
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3],
        tie_word_embeddings=True), ids


def make_inputs(batch: int, prompt_len: int, grid: tuple[int, int, int], ids: tuple[int, ...], vocab: int, seed=0):
    """``batch`` prompts of exactly ``prompt_len`` tokens, each: some text, one image, more text."""
    rng = np.random.default_rng(seed)
    img_tokens = int(np.prod(grid)) // 4
    text = prompt_len - img_tokens - 2
    if text < 2:
        raise SystemExit(f"--prompt-len {prompt_len} too short for an image of {img_tokens} tokens")
    rows = []
    for _ in range(batch):
        t = rng.integers(1, min(vocab - 8, 150000), text)
        rows.append(list(t[: text // 4]) + [ids[2]] + [ids[0]] * img_tokens + [ids[3]] + list(t[text // 4:]))
    input_ids = np.asarray(rows, np.int64)
    grids = np.asarray([grid] * batch, np.int64)
    pixel_values = rng.normal(size=(int(grids.prod(-1).sum()), 1536)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "pixel_values": pixel_values,
            "image_grid_thw": grids}


def decode_bound(model, config, *, rows: int, live_len: float, dtype: str, device: str, hbm_gbps: float | None,
                 step_ms: float) -> dict:
    """The decode step's HBM bound (see ``bounds.py``): decoder weights + the LM head once + ``rows``
    embedding rows + the live KV cache of ``rows`` rows x ``live_len`` slots, over the bandwidth."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    t = config.text
    embed = model.language_model.embed_tokens.get_value()
    decoder_bytes = nbytes(nnx.state(model.language_model)) - embed.size * embed.dtype.itemsize
    head_bytes = embed.size * embed.dtype.itemsize if config.tie_word_embeddings else nbytes(nnx.state(model.lm_head))
    live_kv = bounds.kv_bytes(layers=t.num_hidden_layers, rows=rows, length=live_len, kv_heads=t.num_key_value_heads,
                              head_dim=t.head_dim, itemsize=jnp.dtype(dtype).itemsize)
    total = bounds.decode_step_bytes(decoder_bytes=decoder_bytes, head_bytes=head_bytes, rows=rows,
                                     hidden=t.hidden_size, embed_itemsize=embed.dtype.itemsize, live_kv_bytes=live_kv)
    out = {"weight_gb": (total - live_kv) / 1e9, "kv_gb": live_kv / 1e9}
    bw = bounds.bandwidth_gbps(device, hbm_gbps)
    if bw:
        bound_ms = 1e3 * total / (bw * 1e9)
        out["bound_ms"], out["bound_pct"] = bound_ms, 100 * bound_ms / step_ms
    return out


def run_jdelta(path, inputs, args, image_token):
    import jax

    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
    from jdelta.sampling import Sampler, SamplingParams

    model, config = load_hf_checkpoint(path, dtype=None if args.dtype == "float32" else args.dtype)
    mesh = None
    if args.mesh:
        from jdelta.sharding import make_mesh

        mesh = make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
    sampler = Sampler(model, mesh=mesh)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens, n=args.n)
    t0 = time.perf_counter()
    first = sampler.generate(inputs, params, rng=0)
    first_s = time.perf_counter() - t0
    runs = []
    for i in range(args.repeats):
        res = sampler.generate(inputs, params, rng=i + 1)
        runs.append(res.stats)
    best = min(runs, key=lambda s: s["prefill_s"] + s["decode_s"])
    total = best["prefill_s"] + best["decode_s"]
    out = {
        "device": str(jax.devices()[0].device_kind),
        "new_tokens": best["new_tokens"],
        "tokens_per_s": best["new_tokens"] / total,
        "prefill_tokens_per_s": best["prompt_tokens"] / best["prefill_s"],
        "prefill_s": best["prefill_s"],
        "decode_step_ms": 1e3 * best["decode_s"] / best["decode_steps"],
        "compiles": sampler.compile_count,
        "compile_s": first_s - total,
        "total_s": total,
        "tokens": first.tokens,
    }
    if args.gpu_bound:
        out.update(decode_bound(model, config, rows=inputs["input_ids"].shape[0] * args.n,
                                live_len=best["padded_prompt_len"] + args.new_tokens / 2, dtype=args.dtype,
                                device=out["device"], hbm_gbps=args.hbm_gbps, step_ms=out["decode_step_ms"]))
    return out


def run_hf(hf, inputs, args, image_token):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # same device kind as jdelta's
    hf = hf.to(device)
    kw = {k: torch.tensor(v, device=device) for k, v in inputs.items()}
    kw["mm_token_type_ids"] = (kw["input_ids"] == image_token).long()
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                   num_return_sequences=args.n)
    else:
        gen.update(do_sample=False)
    with torch.no_grad():
        hf.generate(**{k: v[:1] if k != "pixel_values" else v[: int(inputs["image_grid_thw"][0].prod())]
                       for k, v in kw.items()}, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2,
                                                   "num_return_sequences": 1})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(**kw, **gen)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    s = inputs["input_ids"].shape[1]
    new = out[:, s:]
    return {"tokens_per_s": new.numel() / dt, "total_s": dt, "tokens": new.cpu().numpy(), "device": device}


def greedy_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, str]:
    """Compare every generated token of two greedy runs ``[B, T]``: ``(identical, summary)``; the
    summary says how many rows match and where the first difference is."""
    if ours.shape != theirs.shape:
        return False, f"False (shapes {ours.shape} vs {theirs.shape})"
    diff = ours != theirs
    if not diff.any():
        return True, f"True (all {ours.shape[1]} tokens of {ours.shape[0]} rows)"
    rows = np.flatnonzero(diff.any(1))
    first = int(np.argmax(diff.any(0)))
    return False, (f"False ({ours.shape[0] - rows.size}/{ours.shape[0]} rows identical; first difference at token "
                   f"{first} of {ours.shape[1]}, row {int(rows[0])})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="100m")
    for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"override the preset's {k}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (needs --temperature > 0 for n > 1)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--image-grid", default="1,8,8", help="t,h,w patches of the one image per prompt")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default, for parity)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mesh", default="", help="e.g. fsdp=4,tensor=2 (default: one device)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. the 2B shape on GPU)")
    ap.add_argument("--gpu-bound", action="store_true", help="report the decode step against the HBM bound")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (default: from the device name)")
    args = ap.parse_args(argv)
    if args.n > 1 and args.temperature == 0:
        ap.error("--n > 1 needs --temperature > 0 (greedy samples would be identical)")

    p = dict(PRESETS[args.preset])
    for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    grid = tuple(int(x) for x in args.image_grid.split(","))

    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, ids = hf_config(p)
    if args.dtype == "float32":
        hf = Qwen3VLForConditionalGeneration(cfg).eval()
    else:  # only jdelta runs in reduced precision; save the random weights in that dtype
        hf = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=getattr(torch, args.dtype)).eval()
    n_params = sum(x.numel() for x in hf.parameters())
    inputs = make_inputs(args.batch, args.prompt_len, grid, ids, p["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        jd = run_jdelta(tmp, inputs, args, ids[0])
    if args.dtype != "float32" or args.no_hf:
        del hf
        ref = None
    else:
        ref = run_hf(hf, inputs, args, ids[0])

    print(f"\nQwen3-VL {args.preset} ({n_params / 1e6:.1f}M params, {args.dtype}) on {jd['device']}: "
          f"batch {args.batch} x n {args.n}, prompt {args.prompt_len} tokens + 1 image {grid}, "
          f"{args.new_tokens} new tokens, {'greedy' if args.temperature == 0 else f'T={args.temperature}'}")
    rows = [
        ("jdelta output tokens/s", f"{jd['tokens_per_s']:.1f}"),
        ("jdelta prefill tokens/s", f"{jd['prefill_tokens_per_s']:.1f}"),
        ("jdelta decode step (ms)", f"{jd['decode_step_ms']:.2f}"),
        ("jdelta compiles / compile s", f"{jd['compiles']} / {jd['compile_s']:.1f}"),
        ("jdelta wall (s)", f"{jd['total_s']:.2f}"),
    ]
    if "bound_ms" in jd:
        rows += [("HBM bound step (ms)", f"{jd['bound_ms']:.3f} ({jd['weight_gb']:.2f} GB weights + "
                                         f"{jd['kv_gb']:.2f} GB KV)"),
                 ("decode step vs bound", f"{jd['decode_step_ms'] / jd['bound_ms']:.2f}x "
                                          f"({jd['bound_pct']:.0f}% of bound)")]
    if ref is not None:
        rows += [(f"transformers ({ref['device']}) output tokens/s", f"{ref['tokens_per_s']:.1f}"),
                 ("transformers wall (s)", f"{ref['total_s']:.2f}"),
                 ("ratio jdelta / transformers", f"{jd['tokens_per_s'] / ref['tokens_per_s']:.2f}x")]
        if args.temperature == 0:
            rows.append(("greedy tokens identical", greedy_agreement(jd["tokens"], ref["tokens"])[1]))
    w = max(len(r[0]) for r in rows)
    print("| metric" + " " * (w - 6) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")


if __name__ == "__main__":
    main()
