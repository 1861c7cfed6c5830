"""Sampler and scoring on the Qwen3-VL port vs transformers (CPU, fp32, tiny random checkpoint).

Every case goes through one Sampler with fixed buckets (batch 2, seq 48, 128 patches,
4 images), so the whole file compiles prefill + decode once (asserted).
"""

import warnings

import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from mesh_checks import assert_array_layout, assert_layout, watch_sampler
from qwen3_vl_tiny import IMG, PAD, PATCH_DIM, VEND, VSTART, tiny_checkpoint

from jdelta.logprobs import score_completions
from jdelta.sampling import Sampler, SamplingParams
from jdelta.sharding import make_mesh

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

STEPS = 6
CASES = {
    "text_only": [[9]],
    "one_image": [[3, (1, 4, 6), 5]],
    "two_images": [[2, (1, 4, 4), 3, (1, 2, 6), 4]],
    "left_padded_batch": [[4, (1, 4, 4), 2], [2, (1, 2, 2), 3, (1, 6, 4), 9]],
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # std-0.1 weights (HF's 0.02 gives near-uniform logits: greedy would be tie-breaking)
    hf, model, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("qwen3vl_sampling"))
    return hf, model


@pytest.fixture(scope="module")
def sampler(ckpt):
    return Sampler(ckpt[1], seq_buckets=(48,), patch_buckets=(128,), image_buckets=(4,), batch_buckets=(2,))


def make_batch(rows, seed=0):
    """rows: lists of segments (a count of random text tokens, or a (t, h, w) image grid)."""
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for row in rows:
        seq = []
        for seg in row:
            if isinstance(seg, tuple):
                seq += [VSTART] + [IMG] * (int(np.prod(seg)) // 4) + [VEND]
                grids.append(seg)
            else:
                seq += list(rng.integers(1, 240, seg))
        seqs.append(seq)
    s = max(len(q) for q in seqs)
    ids = np.full((len(seqs), s), PAD, np.int64)
    mask = np.zeros((len(seqs), s), np.int64)
    for i, q in enumerate(seqs):
        ids[i, s - len(q):], mask[i, s - len(q):] = q, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if grids:
        grid = np.array(grids, np.int64)
        batch["image_grid_thw"] = grid
        batch["pixel_values"] = rng.normal(size=(int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    return batch


def hf_kwargs(batch):
    kw = {"input_ids": torch.tensor(batch["input_ids"]), "attention_mask": torch.tensor(batch["attention_mask"])}
    if "pixel_values" in batch:
        kw.update(pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"]),
                  mm_token_type_ids=torch.tensor((batch["input_ids"] == IMG).astype(np.int64)))
    return kw


def hf_greedy(hf, batch, steps):
    with torch.no_grad():
        out = hf.generate(**hf_kwargs(batch), max_new_tokens=steps, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    s = batch["input_ids"].shape[1]
    tokens = out.sequences[:, s:].numpy()
    logp = torch.log_softmax(torch.stack(out.scores, 1), -1).numpy()
    return tokens, np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_generate(ckpt, sampler, case):
    hf, _ = ckpt
    batch = make_batch(CASES[case])
    ref_tok, ref_lp = hf_greedy(hf, batch, STEPS)
    res = sampler.generate(batch, SamplingParams(temperature=0, max_new_tokens=STEPS), rng=0)
    np.testing.assert_array_equal(res.tokens, ref_tok)
    np.testing.assert_allclose(res.raw_logprobs, ref_lp, atol=1e-4)
    assert len(set(ref_tok.reshape(-1).tolist())) >= 2  # not a degenerate repeat-one-token model
    # one decode program for every case; one prefill with images and one without
    assert sampler.compile_count <= 3


def test_scoring_matches_transformers_log_softmax(ckpt, sampler):
    hf, model = ckpt
    batch = make_batch(CASES["left_padded_batch"], seed=3)
    res = sampler.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=STEPS, stop_token_ids=(7, 11)),
                           rng=1)
    comp, cmask = res.tokens, (np.arange(STEPS)[None] < res.lengths[:, None]).astype(np.int32)
    ids = np.concatenate([batch["input_ids"], comp], 1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(comp)], 1)
    with torch.no_grad():
        logits = hf(**hf_kwargs({**batch, "input_ids": ids, "attention_mask": mask})).logits
    logp = torch.log_softmax(logits[:, -STEPS - 1:-1], -1).numpy()
    ref = np.take_along_axis(logp, comp[..., None].astype(np.int64), -1)[..., 0] * cmask
    for chunk in (STEPS, 4):
        out = score_completions(model, batch, comp, cmask, chunk_size=chunk, top_k=3, return_logsumexp=True)
        np.testing.assert_allclose(np.asarray(out.token_logprobs), ref, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.topk_logprobs), -np.sort(-logp, -1)[..., :3] * cmask[..., None],
                                   atol=1e-4)
    # the sampler's raw (T = 1) log-probs are the scorer's
    np.testing.assert_allclose(res.raw_logprobs, ref, atol=1e-4)


def test_mesh_matches_single_device(ckpt, sampler):
    """fsdp=4 x tensor=2 on the 8 CPU devices: the same samples as one device (the module's sampler,
    same buckets), and really sharded: weights, KV cache and outputs split over the 8 devices."""
    _, model = ckpt
    batch = make_batch(CASES["left_padded_batch"], seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=STEPS, n=2)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    on_mesh = Sampler(model, mesh=mesh, seq_buckets=(48,), patch_buckets=(128,), image_buckets=(4,),
                      batch_buckets=(2,))
    prefill_out, decode_out = watch_sampler(on_mesh)
    single = sampler.generate(batch, params, rng=2)
    sharded = on_mesh.generate(batch, params, rng=2)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)
    np.testing.assert_allclose(single.raw_logprobs, sharded.raw_logprobs, atol=1e-4)
    assert len(set(sharded.tokens.reshape(-1).tolist())) >= 3  # really sampling
    _, state = on_mesh._state()
    text = state["language_model"]
    assert_array_layout("q_proj", text["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value(), mesh,
                        P("fsdp", "tensor"))
    assert_array_layout("embed_tokens", text["embed_tokens"].get_value(), mesh, P("tensor", "fsdp"))
    # 2 prompts x n=2 = 4 rows over fsdp=4; the 2 KV heads over tensor=2; 48 + STEPS cache slots
    (cache, _, _), out = prefill_out.shardings[0], decode_out.shardings[0]
    kv_shape = (2, 4, 48 + STEPS, 2, 16)
    for name, sh in (("prefill k", cache.k), ("decode k", out.cache.k), ("decode v", out.cache.v)):
        assert_layout(name, sh, kv_shape, mesh, P(None, "fsdp", None, "tensor", None))
    for name in ("tokens", "logprobs", "raw_logprobs"):
        assert_layout(name, getattr(out, name), (4, STEPS), mesh, P("fsdp", None))
