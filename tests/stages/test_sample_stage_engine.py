"""``jdelta sample --engine continuous`` (continuous batching, jdelta.rollout_engine) writes the same
samples as the static sampler, batch keys and all, on a tiny random checkpoint; and refuses what it
cannot run with one line."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from qwen3_vl_tiny import save_tiny_hf_checkpoint

from jdelta.cli import main
from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.records import write_jsonl
from jdelta.data.tokenizer import build_demo_tokenizer

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N_RECORDS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_engine")
    records = generate_records(N_RECORDS, seed=1, width=64, height=64)
    model_dir = root / "model"
    tok = build_demo_tokenizer(model_dir, corpus_text(records), vocab_size=400)
    save_tiny_hf_checkpoint(tok, model_dir)
    # text prompts of different lengths (the engine pads them all to one length, the static
    # sampler each batch to its own)
    text = [dataclasses.replace(r, images=[], question=r.question * (1 + i % 3)) for i, r in enumerate(records)]
    prompts = root / "prompts.jsonl"
    write_jsonl(text, prompts)
    # image prompts: one without, one with two images of different sizes, the rest one each (64x64
    # or 96x64: 4 or 6 image tokens), so prompts of one engine prefill come from different static batches
    wide = generate_records(N_RECORDS, seed=2, width=96, height=64)
    mixed = [dataclasses.replace(records[0], images=[]),
             dataclasses.replace(records[1], images=[records[1].images[0], wide[1].images[0]]),
             records[2], wide[3], records[4]]
    with_images = root / "images.jsonl"
    write_jsonl(mixed, with_images)
    return root, model_dir, prompts, with_images


def sample(root, model_dir, prompts, name, *extra):
    out = root / name
    args = ["sample", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--batch-size", "3",
            "--no-progress", *extra]
    assert main(args) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()], out


@pytest.mark.parametrize("extra", [
    # n=3 with top-p through the stage: the default suite samples it on image prompts (below)
    pytest.param(("--n", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "12", "--seed", "5"),
                 marks=pytest.mark.slow),
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
    assert_same_samples(static, cont)
    if n > 1:  # the samples differ from each other, so the keys were not collapsed
        assert len({tuple(r["token_ids"]) for r in cont}) > N_RECORDS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["engine"] == "continuous"
    assert manifest["counts"]["samples"] == N_RECORDS * n


IMAGES = ("--min-pixels", str(32 * 32 * 4), "--max-pixels", str(96 * 64))


def assert_same_samples(static, cont):
    exact = ("prompt_id", "record_index", "sample_index", "token_ids", "text", "finish_reason")
    for s, c in zip(static, cont, strict=True):
        assert {k: c[k] for k in exact} == {k: s[k] for k in exact}
        np.testing.assert_allclose(c["logprobs"], s["logprobs"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(c["raw_logprobs"], s["raw_logprobs"], atol=1e-5, rtol=0)


def test_continuous_engine_samples_image_prompts_as_static(setup):
    """Each prompt takes its own images into the engine (jdelta.models.family.split_images): 6 slots
    hold two prompts, so engine prefills mix prompts of the two static batches (3 + 2 prompts)."""
    root, model_dir, _, with_images = setup
    extra = ("--n", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "10", "--seed", "7", *IMAGES)
    static, _ = sample(root, model_dir, with_images, "img_static", *extra)
    cont, _ = sample(root, model_dir, with_images, "img_cont", *extra, "--engine", "continuous",
                     "--engine-slots", "6")
    assert len(static) == len(cont) == N_RECORDS * 3
    assert_same_samples(static, cont)
    assert len({tuple(r["token_ids"]) for r in cont}) > N_RECORDS


def test_continuous_engine_refusals(setup, capsys):
    root, model_dir, prompts, with_images = setup
    base = ["sample", "--model", str(model_dir), "--no-progress", "--engine", "continuous"]
    assert main([*base, "--prompts", str(prompts), "--out", str(root / "slots"), "--n", "4",
                 "--engine-slots", "3"]) == 2
    assert "error: config key 'engine_slots': must be >= sampling.n (4), got 3" in capsys.readouterr().err


def test_continuous_engine_samples_gemma3_image_prompts_as_static(tmp_path):
    """Gemma 3 (whole-image pixel rows, one (1, 1, 1) grid row per image, local attention layers):
    the same samples through the engine as static, image prompts mixed with a text one."""
    from gemma3_tiny import make_random_gemma3_dir, tiny_config_for_tokenizer

    from jdelta.models.gemma3.tokenizer import build_gemma3_demo_tokenizer

    records = generate_records(4, seed=4, width=64, height=64)
    tok = build_gemma3_demo_tokenizer(tmp_path / "tok", corpus_text(records), 400)
    model_dir = make_random_gemma3_dir(tiny_config_for_tokenizer(tok, hidden=32), tok, tmp_path / "gemma", 1,
                                       logit_scale=4.0)
    mixed = [records[0], dataclasses.replace(records[1], images=[]),
             dataclasses.replace(records[2], images=[records[2].images[0], records[3].images[0]]), records[3]]
    prompts = tmp_path / "images.jsonl"
    write_jsonl(mixed, prompts)
    extra = ("--n", "2", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "8", "--seed", "3")
    static, _ = sample(tmp_path, model_dir, prompts, "static", *extra)
    cont, _ = sample(tmp_path, model_dir, prompts, "cont", *extra, "--engine", "continuous", "--engine-slots", "4")
    assert len(static) == len(cont) == 4 * 2
    assert_same_samples(static, cont)
    assert len({tuple(r["token_ids"]) for r in cont}) > 4
