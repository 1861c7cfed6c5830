"""Length-bounded decode (jdelta.decode_attention + Sampler(decode_options=...)) == the dense decode.

Same greedy and sampled tokens, log-probs within 1e-5 (fp32), lengths and finish reasons, on the
tiny text LM and the tiny Qwen3-VL (images, left padding), with small segment lengths so one
generate() call crosses several segments.
"""

import warnings

import numpy as np
import pytest
from sampling_tiny_lm import TinyCausalLM, TinyConfig, left_padded_batch, tiny_rope_index

from jdelta.decode_attention import kv_segments
from jdelta.sampling import DecodeOptions, Sampler, SamplingParams
from jdelta.testing import (
    IMG,
    PATCH_DIM,
    VEND,
    VIDEO,
    VSTART,
    make_batch,
    random_model_fast,
    tiny_qwen3_vl_config,
)

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

DENSE = DecodeOptions(attention="dense", top_p_candidates=0)
# min 3 / fraction 1: from first slot 16 in a 40-slot cache the segments are (24, 39, 40).
BOUNDED = DecodeOptions(attention="bounded", kv_segment_min=3, kv_segment_max_fraction=1.0, top_p_candidates=0)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10, 11, 2, 8], [3, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


def test_kv_segments():
    assert kv_segments(256, 4352) == (512, 1024, 2048, 4352)
    assert kv_segments(128, 192) == (192,)  # nothing shorter than the cache above the prompt: dense
    assert kv_segments(256, 4000) == (512, 1024, 1792, 4000)  # the largest allowed prefix, rounded to 256
    assert kv_segments(16, 40, min_len=3, max_fraction=1.0) == (24, 39, 40)
    assert kv_segments(0, 1024) == (256, 512, 1024)
    assert DENSE.segments(16, 40) == (40,)
    assert BOUNDED.segments(16, 40) == (24, 39, 40)
    with pytest.raises(ValueError, match="no free cache slot"):
        kv_segments(40, 40)
    with pytest.raises(ValueError, match="DecodeOptions.attention must be"):
        DecodeOptions(attention="paged")


class SpyLM(TinyCausalLM):
    """The tiny LM, recording the cache length every traced decode step attends over."""

    seen: list = []

    def __call__(self, input_ids, *, cache=None, **kw):
        if cache is not None and input_ids.shape[1] == 1:
            SpyLM.seen.append(int(cache.k.shape[2]))
        return super().__call__(input_ids, cache=cache, **kw)


@pytest.fixture(scope="module")
def spy_model():
    from flax import nnx

    return SpyLM(TinyConfig(), rngs=nnx.Rngs(0))


def _pair(model, batch, params, **kw):
    out = []
    for options in (DENSE, BOUNDED):
        sampler = Sampler(model, decode_options=options, **kw)
        out.append(sampler.generate(batch, params, rng=11))
    return out


def _assert_same(dense, bounded):
    np.testing.assert_array_equal(bounded.tokens, dense.tokens)
    np.testing.assert_array_equal(bounded.lengths, dense.lengths)
    assert bounded.finish_reason == dense.finish_reason
    np.testing.assert_allclose(bounded.raw_logprobs, dense.raw_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(bounded.logprobs, dense.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_new", [24, 5])
def test_bounded_greedy_equals_dense_tiny_lm(spy_model, max_new):
    SpyLM.seen.clear()
    batch = left_padded_batch(PROMPTS)
    dense, bounded = _pair(spy_model, batch, SamplingParams(temperature=0.0, max_new_tokens=max_new),
                           rope_index_fn=tiny_rope_index, seq_buckets=(16,))
    _assert_same(dense, bounded)
    assert dense.stats["decode_steps"] == bounded.stats["decode_steps"] == max_new
    max_len = 16 + max_new
    # The dense decode traced one step over the whole cache; the bounded one a step per segment.
    assert SpyLM.seen == [max_len, *BOUNDED.segments(16, max_len)]
    if max_new == 24:
        assert SpyLM.seen == [40, 24, 39, 40]


def test_bounded_sampled_with_stops_equals_dense_tiny_lm(spy_model):
    """Sampled (same keys), n > 1, top-k + top-p, stop ids: rows finish in different segments."""
    batch = left_padded_batch(PROMPTS[:3])
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=24, n=2, stop_token_ids=(3, 7))
    dense, bounded = _pair(spy_model, batch, params, rope_index_fn=tiny_rope_index, seq_buckets=(16,))
    _assert_same(dense, bounded)
    assert "stop" in dense.finish_reason
    assert len(set(dense.lengths.tolist())) > 2


def test_bounded_stops_early_when_every_row_finished(spy_model):
    """All rows stop in the first segment: the later segments run no step and the result is unchanged."""
    batch = left_padded_batch(PROMPTS[:2])
    params = SamplingParams(temperature=1.0, max_new_tokens=24, stop_token_ids=tuple(range(64)))
    dense, bounded = _pair(spy_model, batch, params, rope_index_fn=tiny_rope_index, seq_buckets=(16,))
    _assert_same(dense, bounded)
    assert bounded.stats["decode_steps"] == 1 and (bounded.lengths == 1).all()


@pytest.fixture(scope="module")
def vl_model():
    cfg = tiny_qwen3_vl_config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                               mrope_section=(2, 2, 4), vision_hidden=32, vision_depth=1, patch_size=16,
                               vision_positions=64, special_ids=(IMG, VIDEO, VSTART, VEND))
    return random_model_fast(cfg, seed=3)


def test_bounded_equals_dense_qwen3_vl(vl_model):
    """Images, left padding and a batch-padding row; greedy then sampled on the same Samplers."""
    ids, mask, pv, grid = make_batch([[4, (1, 4, 4), 2], [2, (1, 2, 2), 3, (1, 6, 4), 9], [7]], seed=2)
    assert pv.shape[1] == PATCH_DIM
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_grid_thw": grid}
    kw = dict(seq_buckets=(32,), patch_buckets=(64,), image_buckets=(4,), batch_buckets=(4,))
    samplers = [Sampler(vl_model, decode_options=o, **kw) for o in (DENSE, BOUNDED)]
    assert BOUNDED.segments(32, 32 + 20) == (48, 51, 52)
    for params in (SamplingParams(temperature=0.0, max_new_tokens=20),
                   SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=20, n=2)):
        dense, bounded = (s.generate(batch, params, rng=5) for s in samplers)
        _assert_same(dense, bounded)
        assert dense.tokens.shape == (3 * params.n, 20)
