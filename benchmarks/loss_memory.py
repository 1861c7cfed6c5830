"""Peak temporary memory of the chunked distillation loss + gradient vs the naive one.

Compiles (does not run) ``value_and_grad`` of a per-token divergence, reduced to a token
mean, with respect to the student's hidden states and LM head, in two forms:

* naive: ``token_divergence(student_hidden @ W_s, teacher_hidden @ W_t)`` on full ``[B, T, V]``
  float32 logits;
* chunked: :func:`jdelta.losses.chunked_token_divergence` over ``chunk_size`` positions, with
  ``backward="tiled"`` (custom VJP, vocabulary tiles x sequence chunks) or ``"remat"``
  (``jax.checkpoint`` per chunk under ``lax.map``).

On CPU, XLA upcasts bf16 matmul operands to f32 and hoists the converted [H, V] LM heads out of
the loops, which inflates every bf16 figure; ``--dtype float32`` measures the algorithms.

and prints XLA's ``memory_analysis()``: temp bytes (activations and intermediates) and the total
(arguments + outputs + temp). The ratio is naive temp / chunked temp.

    python benchmarks/loss_memory.py                       # B=2 T=1024 H=2048 V=151936, CPU
    python benchmarks/loss_memory.py --seq 4096 --chunks 256 512
    # Gemma 3's vocabulary (LM head 262,208 rows, 262,144 real ids), 4B student / 12B teacher widths:
    python benchmarks/loss_memory.py --dtype float32 --vocab 262208 --vocab-size 262144 --hidden 2560 --teacher-hidden 3840

The losses form logits as ``hidden @ head`` uncapped: a model with ``final_logit_softcapping``
set is refused by the distiller (no released Gemma 3 sets it).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jdelta.losses import chunked_token_divergence, token_divergence


def _analyse(fn, shapes, run: int = 0):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*shapes).compile()
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    temp = m.temp_size_in_bytes
    total = m.argument_size_in_bytes + m.output_size_in_bytes + temp - m.alias_size_in_bytes
    ms = float("nan")
    if run:
        keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
        args = [
            (jax.random.normal(k, s.shape, jnp.float32) * 0.05).astype(s.dtype) if s.ndim > 1 else jnp.ones(s.shape, s.dtype)
            for k, s in zip(keys, shapes, strict=True)
        ]
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(run):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t)
        ms = 1e3 * sorted(times)[len(times) // 2]
    return temp, total, secs, ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048, help="student hidden size")
    p.add_argument("--teacher-hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--vocab-size", type=int, default=None, help="real vocabulary (< --vocab if padded)")
    p.add_argument("--dtype", default="bfloat16", help="hidden states and LM heads; logits are float32")
    p.add_argument("--kind", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--backward", nargs="+", default=["tiled", "remat"], choices=["tiled", "remat"])
    p.add_argument("--run", type=int, default=0, help="also execute N times and report the median ms")
    args = p.parse_args(argv)

    dt = jnp.dtype(args.dtype)
    b, t, h, ht, v = args.batch, args.seq, args.hidden, args.teacher_hidden, args.vocab
    shapes = [
        jax.ShapeDtypeStruct((b, t, h), dt),
        jax.ShapeDtypeStruct((h, v), dt),
        jax.ShapeDtypeStruct((b, t, ht), dt),
        jax.ShapeDtypeStruct((ht, v), dt),
        jax.ShapeDtypeStruct((b, t), jnp.float32),
    ]
    kw = dict(kind=args.kind, vocab_size=args.vocab_size)

    def naive_loss(sh, sw, th, tw, mask):
        s_logits = jnp.einsum("bth,hv->btv", sh, sw, preferred_element_type=jnp.float32)
        t_logits = jnp.einsum("bth,hv->btv", th, tw, preferred_element_type=jnp.float32)
        div = token_divergence(s_logits, t_logits, **kw)
        return jnp.sum(div * mask) / jnp.sum(mask)

    def chunked_loss(chunk, backward):
        def f(sh, sw, th, tw, mask):
            div = chunked_token_divergence(sh, sw, th, tw, mask, chunk_size=chunk, backward=backward, **kw)
            return jnp.sum(div) / jnp.sum(mask)

        return f

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))
    gib = lambda x: x / 2**30
    print(
        f"# loss+grad memory, backend={jax.default_backend()} B={b} T={t} H_s={h} H_t={ht} V={v} "
        f"dtype={args.dtype} kind={args.kind} device={jax.devices()[0].device_kind}; "
        f"one [B,T,V] fp32 = {gib(b * t * v * 4):.2f} GiB"
    )
    print(f"{'variant':<16}{'temp GiB':>10}{'total GiB':>11}{'temp ratio':>12}{'compile s':>11}{'run ms':>9}")
    n_temp, n_total, n_s, n_ms = _analyse(grad(naive_loss), shapes, args.run)
    print(f"{'naive':<16}{gib(n_temp):>10.3f}{gib(n_total):>11.3f}{1.0:>12.1f}{n_s:>11.1f}{n_ms:>9.1f}")
    for backward in args.backward:
        for c in args.chunks:
            c_temp, c_total, c_s, c_ms = _analyse(grad(chunked_loss(c, backward)), shapes, args.run)
            name = f"{backward} c={c}"
            print(
                f"{name:<16}{gib(c_temp):>10.3f}{gib(c_total):>11.3f}{n_temp / c_temp:>12.1f}{c_s:>11.1f}{c_ms:>9.1f}"
            )


if __name__ == "__main__":
    main()
