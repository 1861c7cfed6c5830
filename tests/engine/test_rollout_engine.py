"""Continuous batching (jdelta.rollout_engine) == the static sampler, row for row, for the same keys.

Fewer slots than rows, small chunks and a small margin, so one generate() call refills slots,
compacts the cache and runs rows that started at different steps side by side.
"""

import warnings

import numpy as np
import pytest
from sampling_tiny_lm import left_padded_batch, make_model, tiny_rope_index

from jdelta.rollout_engine import RolloutEngine, stack_prompts
from jdelta.sampling import Sampler, SamplingParams
from jdelta.testing import IMG, VEND, VIDEO, VSTART, make_batch, random_model_fast, tiny_qwen3_vl_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8], [11, 12, 13, 14], [2], [7, 7, 7, 7, 7, 7, 7], [9, 1]]


@pytest.fixture(scope="module")
def model():
    return make_model(0)


def _assert_same(got, ref):
    np.testing.assert_array_equal(got.prompt_index, ref.prompt_index)
    np.testing.assert_array_equal(got.sample_index, ref.sample_index)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    assert got.finish_reason == ref.finish_reason
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.raw_logprobs, ref.raw_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, n=2, stop_token_ids=(3, 7, 11)),
    SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(54,)),
], ids=["sampled_n2", "greedy"])
def test_engine_equals_static_sampler_tiny_lm(model, params):
    ref = Sampler(model, rope_index_fn=tiny_rope_index, seq_buckets=(8,)).generate(
        left_padded_batch(PROMPTS), params, rng=3)
    engine = RolloutEngine(model, slots=4, prompt_len=8, chunk_steps=5, margin=3, rope_index_fn=tiny_rope_index)
    got = engine.generate([{"input_ids": p} for p in PROMPTS], params, rng=3)
    _assert_same(got, ref)
    assert len(set(ref.lengths.tolist())) > 1 and "stop" in ref.finish_reason
    s = got.stats
    assert s["prefills"] > 1 and s["compactions"] >= 1  # slots were refilled, the cache compacted
    assert s["new_tokens"] == ref.lengths.sum()


def test_engine_keeps_slots_busier_than_static_batching(model):
    """Per-prompt caps with a heavy tail: continuous refill needs fewer steps for the same tokens."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    caps = [24, 2, 3, 2, 20, 2, 3]
    prompts = [{"input_ids": p} for p in PROMPTS]
    kw = dict(slots=2, prompt_len=8, chunk_steps=4, rope_index_fn=tiny_rope_index)
    cont = RolloutEngine(model, **kw).generate(prompts, params, rng=1, max_new_per_prompt=caps)
    static = RolloutEngine(model, refill="static", **kw).generate(prompts, params, rng=1, max_new_per_prompt=caps)
    np.testing.assert_array_equal(cont.lengths, caps)
    np.testing.assert_array_equal(cont.tokens, static.tokens)  # same rows, same keys
    assert static.stats["steps"] == 24 + 3 + 20 + 3  # each pair runs to its longer row
    assert cont.stats["steps"] < static.stats["steps"] and cont.stats["utilization"] > static.stats["utilization"]


def test_engine_checks():
    model = make_model(0)
    engine = RolloutEngine(model, slots=2, prompt_len=4, rope_index_fn=tiny_rope_index)
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens > prompt_len 4"):
        engine.generate([{"input_ids": [1]}, {"input_ids": [1, 2, 3, 4, 5]}], SamplingParams(), rng=0)
    with pytest.raises(ValueError, match="n=3 samples per prompt do not fit 2 slots"):
        engine.generate([{"input_ids": [1]}], SamplingParams(n=3), rng=0)
    with pytest.raises(ValueError, match=r"max_new_per_prompt must hold 1 values in \[1, 64\]"):
        engine.generate([{"input_ids": [1]}], SamplingParams(), rng=0, max_new_per_prompt=[65])
    with pytest.raises(ValueError, match="refill must be"):
        RolloutEngine(model, slots=2, prompt_len=4, refill="dynamic")


def test_engine_equals_static_sampler_qwen3_vl():
    cfg = tiny_qwen3_vl_config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                               mrope_section=(2, 2, 4), vision_hidden=32, vision_depth=1, patch_size=16,
                               vision_positions=64, special_ids=(IMG, VIDEO, VSTART, VEND))
    model = random_model_fast(cfg, seed=3)
    rows = [[4, (1, 4, 4), 2], [2, (1, 2, 2), 3, (1, 6, 4), 9], [7], [3, (1, 2, 2), 1]]
    prompts = []
    for i, row in enumerate(rows):
        ids, _, pv, grid = make_batch([row], seed=i)
        prompts.append({"input_ids": ids[0], "pixel_values": pv, "image_grid_thw": grid})
    batch = stack_prompts(prompts)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, stop_token_ids=(17, 40, 99))
    kw = dict(patch_buckets=(64,), image_buckets=(4,))
    ref = Sampler(model, seq_buckets=(32,), **kw).generate(batch, params, rng=2)
    got = RolloutEngine(model, slots=4, prompt_len=32, chunk_steps=3, margin=2, **kw).generate(prompts, params, rng=2)
    _assert_same(got, ref)
    assert got.stats["prefills"] > 1


def test_benchmark_lengths_are_heavy_tailed():
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_rollout", bench_dir / "rollout.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(bench_dir))
    x = mod.heavy_tailed_lengths(200_000, 256, 4096, cap=8192)
    assert abs(np.median(x) - 256) <= 2 and abs(np.percentile(x, 99) / 4096 - 1) < 0.03
    assert x.min() >= 1 and mod.heavy_tailed_lengths(1000, 256, 4096, cap=4096).max() == 4096
