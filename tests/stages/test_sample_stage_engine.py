"""``jdelta sample --engine continuous`` (continuous batching, jdelta.rollout_engine) writes the same
samples as the static sampler, batch keys and all, on a tiny random checkpoint; and refuses what it
cannot run with one line."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig as HFConfig
from transformers import Qwen3VLForConditionalGeneration as HFModel

from jdelta.cli import main
from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.records import write_jsonl
from jdelta.data.tokenizer import SpecialTokens, build_demo_tokenizer

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N_RECORDS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_engine")
    records = generate_records(N_RECORDS, seed=1, width=64, height=64)
    model_dir = root / "model"
    tok = build_demo_tokenizer(model_dir, corpus_text(records), vocab_size=400)
    sp = SpecialTokens.from_tokenizer(tok)
    cfg = HFConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=sp.image_pad, video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
        vision_end_token_id=sp.vision_end, tie_word_embeddings=True)
    torch.manual_seed(0)
    HFModel(cfg).save_pretrained(model_dir)
    # text prompts of different lengths (the engine pads them all to one length, the static
    # sampler each batch to its own)
    text = [dataclasses.replace(r, images=[], question=r.question * (1 + i % 3)) for i, r in enumerate(records)]
    prompts = root / "prompts.jsonl"
    write_jsonl(text, prompts)
    with_images = root / "images.jsonl"
    write_jsonl(records, with_images)
    return root, model_dir, prompts, with_images


def sample(root, model_dir, prompts, name, *extra):
    out = root / name
    args = ["sample", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--batch-size", "3",
            "--no-progress", *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()], out


@pytest.mark.parametrize("extra", [
    ("--n", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "12", "--seed", "5"),
    ("--n", "1", "--temperature", "0", "--max-new-tokens", "6"),
], ids=["sampled_n3", "greedy"])
def test_continuous_engine_writes_the_static_samples(setup, extra):
    root, model_dir, prompts, _ = setup
    name = "greedy" if extra[3] == "0" else "sampled"
    static, _ = sample(root, model_dir, prompts, f"{name}_static", *extra)
    # 6 slots: with n=3, prompts 2 and 3 (batches 0 and 1: two batch keys) decode side by side;
    # greedy: all 5 prompts at once; slots refill as rows finish
    cont, out = sample(root, model_dir, prompts, f"{name}_cont", *extra, "--engine", "continuous",
                       "--engine-slots", "6")
    n = int(extra[1])
    assert len(static) == len(cont) == N_RECORDS * n
    exact = ("prompt_id", "record_index", "sample_index", "token_ids", "text", "finish_reason")
    for s, c in zip(static, cont, strict=True):
        assert {k: c[k] for k in exact} == {k: s[k] for k in exact}
        np.testing.assert_allclose(c["logprobs"], s["logprobs"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(c["raw_logprobs"], s["raw_logprobs"], atol=1e-5, rtol=0)
    if n > 1:  # the samples differ from each other, so the keys were not collapsed
        assert len({tuple(r["token_ids"]) for r in cont}) > N_RECORDS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["engine"] == "continuous"
    assert manifest["counts"]["samples"] == N_RECORDS * n


def test_continuous_engine_refusals(setup, capsys):
    root, model_dir, prompts, with_images = setup
    base = ["sample", "--model", str(model_dir), "--no-progress", "--engine", "continuous"]
    assert main([*base, "--prompts", str(with_images), "--out", str(root / "img"), "--min-pixels", str(32 * 32 * 4),
                 "--max-pixels", str(64 * 64)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine=continuous takes text prompts only" in err[0]
    assert main([*base, "--prompts", str(prompts), "--out", str(root / "slots"), "--n", "4",
                 "--engine-slots", "3"]) == 2
    assert "error: config key 'engine_slots': must be >= sampling.n (4), got 3" in capsys.readouterr().err
