"""benchmarks/bounds.py: the decode HBM bound and the train-step FLOPs, against the recorded figures."""

import importlib.util
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", _DIR / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(_DIR))
    return mod


bounds = _load("bounds")
QWEN3_VL_2B = dict(vocab=151936, hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144)


def _2b_decode_bytes(rows, live_len):
    p = bounds.qwen3_text_params(**QWEN3_VL_2B)
    kv = bounds.kv_bytes(layers=28, rows=rows, length=live_len, kv_heads=8, head_dim=128, itemsize=2)
    return bounds.decode_step_bytes(decoder_bytes=2 * (p["layer_matmul"] + p["layer_norms"]),
                                    head_bytes=2 * p["embed"], rows=rows, hidden=2048, embed_itemsize=2,
                                    live_kv_bytes=kv), kv


def test_2b_decode_bound_reads_b_embedding_rows_not_the_table():
    # RESULTS.md: batch 64, prompt 128 (bucketed) + 64 new tokens -> mean live length 160.
    total, kv = _2b_decode_bytes(64, 128 + 64 / 2)
    assert kv / 1e9 == pytest.approx(1.1744, abs=1e-4)
    bound_ms = 1e3 * total / (bounds.bandwidth_gbps("NVIDIA H100 80GB HBM3") * 1e9)
    assert bound_ms == pytest.approx(1.3779, abs=1e-3)
    assert 3.88 / bound_ms == pytest.approx(2.82, abs=0.005)  # the recorded step, was "2.48x"
    # The superseded bound counted the whole table plus the tied head again: 1.564 ms.
    p = bounds.qwen3_text_params(**QWEN3_VL_2B)
    old = 2 * (sum(p.values()) + p["embed"]) + kv
    assert 1e3 * old / 3350e9 == pytest.approx(1.564, abs=1e-3)
    total8, _ = _2b_decode_bytes(8, 160)
    assert 1e3 * total8 / 3350e9 == pytest.approx(1.071, abs=1e-3)


def test_2b_train_step_mfu_charges_the_head_on_completion_positions_only():
    p = bounds.qwen3_text_params(**QWEN3_VL_2B)
    kw = dict(decoder_matmul_params=p["layer_matmul"], head_params=p["embed"], batch=16, seq=1024, heads=16,
              head_dim=128, layers=28)
    new = bounds.train_step_flops(completion=512, **kw)
    old = bounds.train_step_flops(completion=1024, **kw)  # head on all S positions: the old figure
    step_s = 0.5143  # RESULTS.md, B=16 S=1024 T=512, dots remat, cuDNN
    assert 100 * old / step_s / 989e12 == pytest.approx(34.4, abs=0.05)
    assert 100 * new / step_s / 989e12 == pytest.approx(31.4, abs=0.05)
    assert bounds.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bounds.bandwidth_gbps("NVIDIA H200", 1234.0) == 1234.0
    assert bounds.bandwidth_gbps("cpu") is None


def test_sampling_benchmark_bound_matches_the_formula_on_a_model():
    """decode_bound() counts the model's own state: decoder + norms, the tied head once, B rows."""
    import jax.numpy as jnp

    from jdelta.testing import random_model_fast, tiny_config

    sampling = _load("sampling")
    cfg = tiny_config(hidden=32, layers=2, vocab=64)
    import dataclasses

    cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    model = random_model_fast(cfg)
    out = sampling.decode_bound(model, cfg, rows=3, live_len=10.0, dtype="float32", device="H100",
                                hbm_gbps=None, step_ms=1.0)
    t = cfg.text
    p = bounds.qwen3_text_params(vocab=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers,
                                 heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
                                 intermediate=t.intermediate_size)
    expect_w = 4 * (p["layer_matmul"] + p["layer_norms"] + p["embed"] + 3 * t.hidden_size)
    assert out["weight_gb"] * 1e9 == pytest.approx(expect_w)
    kv = 2 * t.num_hidden_layers * 3 * 10 * t.num_key_value_heads * t.head_dim * jnp.dtype("float32").itemsize
    assert out["kv_gb"] * 1e9 == pytest.approx(kv)
    assert out["bound_ms"] == pytest.approx(1e3 * (expect_w + kv) / 3350e9)


def test_cpu_decode_bound_is_the_larger_of_memory_and_compute():
    """The 100M fp32 sampler benchmark (batch 16, live length 128 + 64/2): bytes and FLOPs by hand."""
    p = bounds.qwen3_text_params(vocab=151936, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64,
                                 intermediate=1536)
    assert p["layer_matmul"] == 8 * (512 * 512 + 2 * 512 * 256 + 512 * 512 + 3 * 512 * 1536) == 25_165_824
    kv = bounds.kv_bytes(layers=8, rows=16, length=160, kv_heads=4, head_dim=64, itemsize=4)
    step_bytes = bounds.decode_step_bytes(decoder_bytes=4 * (p["layer_matmul"] + p["layer_norms"]),
                                          head_bytes=4 * p["embed"], rows=16, hidden=512, embed_itemsize=4,
                                          live_kv_bytes=kv)
    assert step_bytes / 1e6 == pytest.approx(100.70 + 311.16 + 0.03 + 41.94, abs=0.02)
    flops = bounds.decode_step_flops(decoder_matmul_params=p["layer_matmul"], head_params=p["embed"], rows=16,
                                     live_len=160, heads=8, head_dim=64, layers=8)
    assert flops == 2 * 16 * (25_165_824 + 151936 * 512) + 4 * 16 * 160 * 8 * 64 * 8
    assert flops / 1e9 == pytest.approx(3.3366, abs=1e-4)
    b = bounds.step_bound(step_bytes=step_bytes, step_flops=flops, bandwidth_gbps=20.0, flops_per_s=100e9)
    assert b["memory_ms"] == pytest.approx(22.69, abs=0.01)
    assert b["compute_ms"] == pytest.approx(33.37, abs=0.01)
    assert b["bound_ms"] == b["compute_ms"]  # compute-bound at these rates
    fast = bounds.step_bound(step_bytes=step_bytes, step_flops=flops, bandwidth_gbps=20.0, flops_per_s=1e12)
    assert fast["bound_ms"] == fast["memory_ms"]
    assert bounds.step_bound(step_bytes=1e9, step_flops=1.0, bandwidth_gbps=1.0) == {"memory_ms": 1e3,
                                                                                   "bound_ms": 1e3}


def test_sampling_benchmark_cpu_bound_uses_measured_rates():
    import dataclasses

    from jdelta.testing import random_model_fast, tiny_config

    sampling = _load("sampling")
    cfg = dataclasses.replace(tiny_config(hidden=32, layers=2, vocab=64), tie_word_embeddings=True)
    model = random_model_fast(cfg)
    out = sampling.decode_bound(model, cfg, rows=3, live_len=10.0, dtype="float32", device="cpu", hbm_gbps=1e-3,
                                step_ms=1.0, flops_per_s=1e6)
    t = cfg.text
    expect_flops = 2 * 3 * (bounds.qwen3_text_params(
        vocab=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads, head_dim=t.head_dim, intermediate=t.intermediate_size)["layer_matmul"]
        + t.vocab_size * t.hidden_size) + 4 * 3 * 10 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    assert out["gflop"] * 1e9 == pytest.approx(expect_flops)
    assert out["compute_ms"] == pytest.approx(1e3 * expect_flops / 1e6)
    assert out["memory_ms"] == pytest.approx(1e3 * (out["weight_gb"] + out["kv_gb"]) * 1e9 / 1e6)
    assert out["bound_ms"] == max(out["memory_ms"], out["compute_ms"])
    assert sampling.spread([3.0, 1.0, 2.0]) == "2.0 (1.0-3.0)"
