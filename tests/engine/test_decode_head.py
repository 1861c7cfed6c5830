"""Decode-step LM head and greedy pick (jdelta.sampling): the copied ``[H, V]`` head
(``DecodeOptions(head_copy=True)``) gives the model's own logits, and ``first_argmax`` is
``jnp.argmax`` exactly (first maximum, NaN counted as the maximum)."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from sampling_tiny_lm import TinyCausalLM, TinyConfig, left_padded_batch, tiny_rope_index

from jdelta.sampling import DecodeOptions, Sampler, SamplingParams, first_argmax
from jdelta.testing import IMG, VEND, VIDEO, VSTART, make_batch, random_model_fast, tiny_qwen3_vl_config

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def test_first_argmax_equals_argmax_with_ties_nan_and_inf():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1000)).astype(np.float32)
    x[1, [10, 500, 999]] = 50.0  # ties: the first wins
    x[2, [7, 300]] = np.nan  # NaN counts as the maximum: the first NaN
    x[3] = -np.inf  # all -inf: index 0
    x[4, [0, 999]] = np.inf
    x[5, 999] = 100.0  # the maximum in the last slot
    got = np.asarray(first_argmax(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got.tolist()[:6] == [int(np.argmax(x[0])), 10, 7, 0, 0, 999]
    assert first_argmax(jnp.asarray(x)).dtype == jnp.int32
    x3 = rng.normal(size=(2, 3, 17)).astype(np.float32)
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x3)), np.argmax(x3, axis=-1))


class SpyLM(TinyCausalLM):
    """The tiny LM, recording ``return_logits`` of every traced decode step."""

    calls: list = []

    def __call__(self, input_ids, *, cache=None, return_logits=True, **kw):
        if cache is not None and input_ids.shape[1] == 1:
            SpyLM.calls.append(return_logits)
        return super().__call__(input_ids, cache=cache, return_logits=return_logits, **kw)


def _same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_new_tokens=12),
                                    SamplingParams(temperature=1.2, top_p=0.9, max_new_tokens=12, n=2,
                                                   stop_token_ids=(3,))])
def test_head_copy_equals_the_models_head_tiny_lm(params):
    from flax import nnx

    model = SpyLM(TinyConfig(), rngs=nnx.Rngs(0))
    batch = left_padded_batch([[5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8]])
    out = {}
    for copy in (False, True):
        SpyLM.calls.clear()
        sampler = Sampler(model, decode_options=DecodeOptions(head_copy=copy), rope_index_fn=tiny_rope_index,
                          seq_buckets=(16,))
        out[copy] = sampler.generate(batch, params, rng=4)
        assert SpyLM.calls == [not copy]  # the copy path skips the model's head
    _same(out[False], out[True])


def test_head_copy_equals_the_models_head_tied_qwen3_vl():
    """Tied embedding (the head is the table transposed), images, greedy and sampled."""
    cfg = tiny_qwen3_vl_config(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                               mrope_section=(2, 2, 4), vision_hidden=32, vision_depth=1, patch_size=16,
                               vision_positions=64, special_ids=(IMG, VIDEO, VSTART, VEND), tie_word_embeddings=True)
    model = random_model_fast(cfg, seed=3)
    ids, mask, pv, grid = make_batch([[4, (1, 4, 4), 2], [7]], seed=2)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_grid_thw": grid}
    kw = dict(seq_buckets=(32,), patch_buckets=(64,), image_buckets=(4,), batch_buckets=(2,))
    samplers = [Sampler(model, decode_options=DecodeOptions(head_copy=c), **kw) for c in (False, True)]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=10),
                   SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, n=2)):
        a, b = (s.generate(batch, params, rng=5) for s in samplers)
        _same(a, b)


def test_engine_head_copy_equals_the_models_head_tiny_lm():
    """The rollout engine forms its steps' logits with the copied head too (one copy per call)."""
    from flax import nnx

    from jdelta.rollout_engine import RolloutEngine

    model = SpyLM(TinyConfig(), rngs=nnx.Rngs(0))
    prompts = [{"input_ids": np.asarray(p, np.int32)} for p in ([5, 6, 7], [1, 2, 3, 4, 9, 10], [3, 8], [9, 9, 2])]
    params = SamplingParams(temperature=1.2, top_p=0.9, max_new_tokens=12, n=2, stop_token_ids=(3,))
    out = {}
    for copy in (False, True):
        SpyLM.calls.clear()
        engine = RolloutEngine(model, slots=4, prompt_len=8, chunk_steps=5, margin=3, rope_index_fn=tiny_rope_index,
                               decode_options=DecodeOptions(head_copy=copy))
        out[copy] = engine.generate(prompts, params, rng=4)
        assert SpyLM.calls == [not copy]  # traced once; the copy path skips the model's head
        assert out[copy].stats["prefills"] > 1  # slots were refilled mid-call
    _same(out[False], out[True])
