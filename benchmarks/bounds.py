"""Hardware bounds the benchmarks report against: decode-step HBM bytes and train-step FLOPs.

Pure arithmetic on shapes (no JAX), shared by ``sampling.py``, ``gpu_decode.py`` and
``train_step.py`` and checked against the recorded figures in ``tests/benchmarks/test_benchmark_bounds.py``.

Decode step (one new token for each of ``B`` rows) must read from HBM at least::

    bytes = decoder layer weights (all projections and norms, + the final norm)
          + LM head [H, V] once (the embedding table again when tied: it is read by the head)
          + B rows of the embedding table (B x H; not the whole table)
          + live KV cache: 2 (K and V) x layers x B x live_len x kv_heads x head_dim x itemsize

and the memory bound is ``bytes / bandwidth``. Its FLOPs (matmuls only, one token per row)::

    2 x B x (decoder matmul params + LM head params)  +  4 x B x live_len x heads x head_dim x layers

and the compute bound is ``FLOPs / matmul FLOP/s``; the step's bound is the larger of the two
(on a GPU the memory bound; on a CPU either can be, with both peaks measured in the same run).

Train step FLOPs (MaxText's convention, text tokens only)::

    6 x (decoder matmul params x B x S  +  LM head params x B x T)  +  3 x 2 x B x S^2 x heads x head_dim x layers

The student's LM head runs only on the ``T`` completion positions (the chunked KL), not on all
``S``; the causal attention term is the non-causal ``4 B S^2 h d`` halved, x3 for forward + backward.
"""

from __future__ import annotations

HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "B200": 8000.0}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "TPU v5p": 459e12,
             "TPU v5 lite": 197e12, "TPU v4": 275e12}


def qwen3_text_params(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                      intermediate: int) -> dict[str, int]:
    """Parameter counts of a Qwen3 text decoder: ``layer_matmul`` (q, k, v, o, gate, up, down of
    all layers), ``layer_norms`` (2 RMSNorms of ``hidden`` + q/k norms of ``head_dim`` per layer, +
    the final norm) and ``embed`` (``vocab x hidden``, = the LM head's size)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate
    return {"layer_matmul": layers * per_layer, "layer_norms": layers * (2 * hidden + 2 * head_dim) + hidden,
            "embed": vocab * hidden}


def kv_bytes(*, layers: int, rows: int, length: float, kv_heads: int, head_dim: int, itemsize: int) -> float:
    """K and V of ``rows`` rows over ``length`` slots (may be an average), all layers."""
    return 2.0 * layers * rows * length * kv_heads * head_dim * itemsize


def decode_step_bytes(*, decoder_bytes: float, head_bytes: float, rows: int, hidden: int, embed_itemsize: int,
                      live_kv_bytes: float) -> float:
    """Least HBM bytes of one decode step: decoder weights (layers + norms) once, the LM head once,
    ``rows`` embedding rows, and the live KV cache (see the module docstring)."""
    return decoder_bytes + head_bytes + rows * hidden * embed_itemsize + live_kv_bytes


def decode_step_flops(*, decoder_matmul_params: int, head_params: int, rows: int, live_len: float, heads: int,
                      head_dim: int, layers: int) -> float:
    """Matmul FLOPs of one decode step: every weight matrix once per row (2 FLOPs per multiply-add)
    and attention's scores + values over ``live_len`` slots (``q.k`` and ``p.v``: 2 x 2 x d each)."""
    return 2.0 * rows * (decoder_matmul_params + head_params) + 4.0 * rows * live_len * heads * head_dim * layers


def step_bound(*, step_bytes: float, step_flops: float, bandwidth_gbps: float, flops_per_s: float | None = None
               ) -> dict[str, float]:
    """``memory_ms`` = bytes / bandwidth, ``compute_ms`` = FLOPs / FLOP/s (when given) and
    ``bound_ms`` = the larger (a step can be faster than neither)."""
    out = {"memory_ms": 1e3 * step_bytes / (bandwidth_gbps * 1e9)}
    if flops_per_s:
        out["compute_ms"] = 1e3 * step_flops / flops_per_s
    out["bound_ms"] = max(out.values())
    return out


def bandwidth_gbps(device_kind: str, override: float | None = None) -> float | None:
    """HBM bandwidth (GB/s) for a device name (``"NVIDIA H100 80GB HBM3"`` -> 3350), or ``override``."""
    if override:
        return override
    return next((v for k, v in HBM_GBPS.items() if k in device_kind), None)


def peak_flops(device_kind: str) -> float | None:
    """bf16 dense peak FLOP/s for a device name, or None when unknown."""
    return next((p for k, p in PEAK_BF16.items() if k.lower() in device_kind.lower()), None)


def train_step_flops(*, decoder_matmul_params: int, head_params: int, batch: int, seq: int, completion: int,
                     heads: int, head_dim: int, layers: int) -> float:
    """MaxText-convention FLOPs of one student train step: decoder matmuls over all ``seq``
    positions, the LM head over the ``completion`` positions only, causal attention fwd + bwd."""
    return (6.0 * (decoder_matmul_params * batch * seq + head_params * batch * completion)
            + 3.0 * 2 * batch * seq * seq * heads * head_dim * layers)
