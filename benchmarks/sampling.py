"""Sampler throughput: jdelta (JAX, one jitted decode loop) vs transformers' ``generate`` (PyTorch).

Both run on the same random Qwen3-VL weights (an HF model built from a config, saved with
``save_pretrained`` and loaded by jdelta) and the same inputs: ``--batch`` prompts of
``--prompt-len`` tokens, each with one image of ``--image-grid`` patches, ``--new-tokens``
generated per sample (no stop ids, so every row generates them all).

After a compile/warm-up call of each side, ``--rounds`` rounds each time one jdelta ``generate``
and one transformers ``generate``, the order reversed every other round, so that a change of load
from other jobs favours neither side; the table gives each side's median and min-max of output
tokens/s (wall time of the call), the ratio of the medians and the spread of the per-round ratios,
and checks every round's greedy tokens against jdelta's. On CPU each round is followed by a
measurement of the machine's read bandwidth (sum of a 1 GiB buffer, numpy and XLA) and fp32
matmul rate (1024^3, XLA and torch); the decode step is reported against its bound, the larger of
(decoder weights + LM head once + B embedding rows + live KV) / bandwidth and the step's matmul
FLOPs / matmul rate (``bounds.py``). ``--gpu-bound`` gives the HBM bound on a GPU. XLA flags come
from the environment as given (``benchmarks/xla_cpu_flags.py`` compares XNN/YNN fusions on and
off; jdelta sets no XLA flags itself). ``--compare-head`` adds a jdelta side with
``DecodeOptions(head_copy=False)`` (the model's own LM head, the code before the copy).

    python benchmarks/sampling.py --rounds 4           # ~100M-param config, batch 16, 128+64 tokens
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
                 step_ms: float, flops_per_s: float | None = None) -> dict:
    """The decode step's bound (see ``bounds.py``): bytes = decoder weights + the LM head once +
    ``rows`` embedding rows + the live KV cache of ``rows`` rows x ``live_len`` slots, over the
    bandwidth (``hbm_gbps``, else from the device name); with ``flops_per_s`` also the compute
    bound (matmul FLOPs / FLOP/s), and ``bound_ms`` is the larger of the two."""
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
    p = bounds.qwen3_text_params(vocab=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers,
                                 heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                                 intermediate=t.intermediate_size)
    flops = bounds.decode_step_flops(decoder_matmul_params=p["layer_matmul"], head_params=p["embed"], rows=rows,
                                     live_len=live_len, heads=t.num_attention_heads, head_dim=t.head_dim,
                                     layers=t.num_hidden_layers)
    out = {"weight_gb": (total - live_kv) / 1e9, "kv_gb": live_kv / 1e9, "gflop": flops / 1e9}
    bw = bounds.bandwidth_gbps(device, hbm_gbps)
    if bw:
        out.update(bounds.step_bound(step_bytes=total, step_flops=flops, bandwidth_gbps=bw, flops_per_s=flops_per_s))
        out["bound_pct"] = 100 * out["bound_ms"] / step_ms
    return out


def measure_bandwidth(mb: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s) of this machine: the median time to sum a ``mb`` MB float32 buffer (far
    larger than the caches) with numpy (one thread) and with a jitted ``jnp.sum`` (XLA:CPU, may use
    all threads); ``gbps`` is the larger median."""
    import jax
    import jax.numpy as jnp

    n = mb * (1 << 20) // 4
    x = np.ones(n, np.float32)
    xj = jnp.ones(n, jnp.float32)
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(xj))
    out = {}
    for name, call in (("numpy", lambda: x.sum()), ("jax", lambda: jax.block_until_ready(f(xj)))):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        out[f"{name}_gbps"] = 4 * n / float(np.median(ts)) / 1e9
    out["gbps"] = max(out["numpy_gbps"], out["jax_gbps"])
    return out


def measure_matmul(n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """fp32 matmul FLOP/s: the median time of an ``n x n`` by ``n x n`` product with jax (XLA:CPU)
    and with torch; ``flops`` is the larger median (the machine's attainable matmul rate)."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, a))
    at = torch.randn(n, n)
    torch.mm(at, at)
    out = {}
    for name, call in (("jax", lambda: jax.block_until_ready(f(a, a))), ("torch", lambda: torch.mm(at, at))):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        out[f"{name}_gflops"] = 2 * n**3 / float(np.median(ts)) / 1e9
    out["flops"] = 1e9 * max(out["jax_gflops"], out["torch_gflops"])
    return out


class JdeltaSide:
    """jdelta's Sampler on the saved checkpoint; :meth:`timed` runs one generate call."""

    def __init__(self, path, inputs, args, options=None):
        import jax

        from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
        from jdelta.sampling import Sampler, SamplingParams

        self.model, self.config = load_hf_checkpoint(path, dtype=None if args.dtype == "float32" else args.dtype)
        mesh = None
        if args.mesh:
            from jdelta.sharding import make_mesh

            mesh = make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
        self.sampler = Sampler(self.model, mesh=mesh, decode_options=options)
        self.params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens,
                                     n=args.n)
        self.inputs, self.device = inputs, str(jax.devices()[0].device_kind)
        t0 = time.perf_counter()
        first = self.sampler.generate(inputs, self.params, rng=0)
        self.first_s, self.tokens = time.perf_counter() - t0, np.asarray(first.tokens)
        self.padded_prompt_len = first.stats["padded_prompt_len"]

    def timed(self, rng: int) -> dict:
        t0 = time.perf_counter()
        res = self.sampler.generate(self.inputs, self.params, rng=rng)
        wall = time.perf_counter() - t0
        s = res.stats
        return {"tokens_per_s": s["new_tokens"] / wall, "wall_s": wall, "new_tokens": s["new_tokens"],
                "prefill_tokens_per_s": s["prompt_tokens"] / s["prefill_s"], "prefill_s": s["prefill_s"],
                "decode_step_ms": 1e3 * s["decode_s"] / s["decode_steps"], "tokens": np.asarray(res.tokens)}


class HFSide:
    """transformers' ``generate`` on the same weights and inputs (greedy, or sampled like jdelta)."""

    def __init__(self, hf, inputs, args, image_token):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # same device kind as jdelta's
        self.hf = hf.to(self.device)
        kw = {k: torch.tensor(v, device=self.device) for k, v in inputs.items()}
        kw["mm_token_type_ids"] = (kw["input_ids"] == image_token).long()
        gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
        if args.temperature > 0:
            gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                       num_return_sequences=args.n)
        else:
            gen.update(do_sample=False)
        self.kw, self.gen, self.prompt_len = kw, gen, inputs["input_ids"].shape[1]
        first = int(inputs["image_grid_thw"][0].prod())
        with torch.no_grad():  # warm-up on one row
            hf.generate(**{k: v[:1] if k != "pixel_values" else v[:first] for k, v in kw.items()},
                        **{**gen, "max_new_tokens": 2, "min_new_tokens": 2, "num_return_sequences": 1})

    def timed(self, rng: int) -> dict:
        import torch

        torch.manual_seed(rng)
        with torch.no_grad():
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = self.hf.generate(**self.kw, **self.gen)
            if self.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        new = out[:, self.prompt_len:]
        return {"tokens_per_s": new.numel() / wall, "wall_s": wall, "tokens": new.cpu().numpy()}


def alternate(sides: dict, rounds: int, between=None) -> dict[str, list[dict]]:
    """``rounds`` rounds, each one timed call of every side; the order is reversed every other round
    (``jdelta, transformers`` then ``transformers, jdelta``, ...) so that a load change favours
    neither. ``between(r)`` (e.g. the bandwidth measurement) runs after each round. Returns each
    side's per-round results, in round order."""
    names = list(sides)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            res = sides[name].timed(r + 1)
            res["load1"] = os.getloadavg()[0]
            out[name].append(res)
            print(f"round {r + 1}/{rounds} {name}: {res['tokens_per_s']:.1f} output tokens/s "
                  f"({res['wall_s']:.2f} s, load {res['load1']:.2f})", flush=True)
        if between is not None:
            between(r)
    return out


def spread(values, spec: str = ".1f") -> str:
    """``median (min-max)`` of a list of numbers."""
    v = np.asarray(values, float)
    return f"{np.median(v):{spec}} ({v.min():{spec}}-{v.max():{spec}})"


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
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3,
                    help="timed rounds; each times one jdelta and one transformers generate, order alternating")
    ap.add_argument("--mesh", default="", help="e.g. fsdp=4,tensor=2 (default: one device)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. the 2B shape on GPU)")
    ap.add_argument("--gpu-bound", action="store_true", help="report the decode step against the HBM bound")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth (default: from the device name)")
    ap.add_argument("--compare-head", action="store_true",
                    help="also time jdelta with DecodeOptions(head_copy=False) (the model's own LM head) in the rounds")
    ap.add_argument("--hf-threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--no-cpu-bound", action="store_true",
                    help="on CPU, skip measuring bandwidth and matmul FLOP/s (and the bound)")
    args = ap.parse_args(argv)
    if args.n > 1 and args.temperature == 0:
        ap.error("--n > 1 needs --temperature > 0 (greedy samples would be identical)")

    p = dict(PRESETS[args.preset])
    for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    grid = tuple(int(x) for x in args.image_grid.split(","))
    load_before = os.getloadavg()

    import jax
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(args.hf_threads or os.cpu_count() or 1)
    cfg, ids = hf_config(p)
    if args.dtype == "float32":
        hf = Qwen3VLForConditionalGeneration(cfg).eval()
    else:  # only jdelta runs in reduced precision; save the random weights in that dtype
        hf = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=getattr(torch, args.dtype)).eval()
    n_params = sum(x.numel() for x in hf.parameters())
    inputs = make_inputs(args.batch, args.prompt_len, grid, ids, p["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        jd = JdeltaSide(tmp, inputs, args)
        sides = {"jdelta": jd}
        if args.compare_head:
            from jdelta.sampling import DecodeOptions

            sides["jdelta, model's head"] = JdeltaSide(tmp, inputs, args, DecodeOptions(head_copy=False))
    if args.dtype != "float32" or args.no_hf:
        del hf
    else:
        sides["transformers"] = HFSide(hf, inputs, args, ids[0])
    cpu = jax.default_backend() == "cpu"
    peaks: list[dict] = []

    def measure_peaks(r):
        if cpu and not args.no_cpu_bound:
            peaks.append({**measure_bandwidth(), **measure_matmul()})
            print(f"round {r + 1}: read {peaks[-1]['gbps']:.1f} GB/s (numpy {peaks[-1]['numpy_gbps']:.1f}, jax "
                  f"{peaks[-1]['jax_gbps']:.1f}), matmul {peaks[-1]['flops'] / 1e9:.1f} GFLOP/s", flush=True)

    res = alternate(sides, args.rounds, between=measure_peaks)
    load_after = os.getloadavg()
    J = res["jdelta"]
    step_ms = float(np.median([r["decode_step_ms"] for r in J]))
    bound = {}
    rows_ = args.batch * args.n
    live_len = jd.padded_prompt_len + args.new_tokens / 2
    if peaks:
        bw = float(np.median([q["gbps"] for q in peaks]))
        fl = float(np.median([q["flops"] for q in peaks]))
        bound = decode_bound(jd.model, jd.config, rows=rows_, live_len=live_len, dtype=args.dtype, device="cpu",
                             hbm_gbps=bw, step_ms=step_ms, flops_per_s=fl)
        bound.update(bw=bw, flops=fl)
    elif args.gpu_bound:
        bound = decode_bound(jd.model, jd.config, rows=rows_, live_len=live_len, dtype=args.dtype,
                             device=jd.device, hbm_gbps=args.hbm_gbps, step_ms=step_ms)

    flags = os.environ.get("XLA_FLAGS", "")
    print(f"\nQwen3-VL {args.preset} ({n_params / 1e6:.1f}M params, {args.dtype}) on {jd.device}: "
          f"batch {args.batch} x n {args.n}, prompt {args.prompt_len} tokens + 1 image {grid}, "
          f"{args.new_tokens} new tokens, {'greedy' if args.temperature == 0 else f'T={args.temperature}'}; "
          f"{args.rounds} alternating rounds; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}; "
          f"XLA_FLAGS={flags!r}")
    rows = [
        ("jdelta output tokens/s, median (min-max)", spread([r["tokens_per_s"] for r in J])),
        ("jdelta prefill tokens/s", spread([r["prefill_tokens_per_s"] for r in J])),
        ("jdelta decode step (ms)", spread([r["decode_step_ms"] for r in J], ".4g")),
        ("jdelta compiles / first call s", f"{jd.sampler.compile_count} / {jd.first_s:.1f}"),
        ("jdelta wall (s)", spread([r["wall_s"] for r in J])),
    ]
    if "bound_ms" in bound:
        label = "bound" if "compute_ms" in bound else "HBM bound"
        detail = (f"{bound['weight_gb']:.3f} GB weights + {bound['kv_gb']:.3f} GB KV")
        if "bw" in bound:
            detail += (f" at {bound['bw']:.1f} GB/s = {bound['memory_ms']:.1f} ms; {bound['gflop']:.2f} GFLOP at "
                       f"{bound['flops'] / 1e9:.1f} GFLOP/s = {bound['compute_ms']:.1f} ms")
        rows += [(f"{label} step (ms)", f"{bound['bound_ms']:.3f} ({detail})"),
                 ("decode step / bound", f"{step_ms / bound['bound_ms']:.2f}x ({bound['bound_pct']:.0f}% of bound)")]
    for name, side in sides.items():
        if name.startswith("jdelta, "):
            rows += [(f"{name}: output tokens/s", spread([r["tokens_per_s"] for r in res[name]])),
                     (f"{name}: decode step (ms)", spread([r["decode_step_ms"] for r in res[name]], ".4g")),
                     (f"{name}: greedy tokens = jdelta's", greedy_agreement(jd.tokens, side.tokens)[1])]
    if "transformers" in res:
        H = res["transformers"]
        jt = np.asarray([r["tokens_per_s"] for r in J])
        ht = np.asarray([r["tokens_per_s"] for r in H])
        ratios = jt / ht
        rows += [(f"transformers ({sides['transformers'].device}, {torch.get_num_threads()} threads) output tokens/s",
                  spread(ht)),
                 ("transformers wall (s)", spread([r["wall_s"] for r in H])),
                 ("ratio of medians jdelta / transformers", f"{np.median(jt) / np.median(ht):.2f}x"),
                 ("per-round ratios, median (min-max)", f"{np.median(ratios):.2f}x ({ratios.min():.2f}-"
                                                        f"{ratios.max():.2f}); " + ", ".join(f"{x:.2f}" for x in ratios))]
        if args.temperature == 0:
            checks = [greedy_agreement(jd.tokens, r["tokens"]) for r in H]
            checks += [greedy_agreement(jd.tokens, r["tokens"]) for r in J]
            same = all(c[0] for c in checks)
            rows.append(("greedy tokens identical (every round)",
                         checks[0][1] if same else next(c[1] for c in checks if not c[0])))
    w = max(len(r[0]) for r in rows)
    print("| metric" + " " * (w - 6) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")


if __name__ == "__main__":
    main()
