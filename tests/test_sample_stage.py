"""``jdelta sample`` end to end: records -> pipeline -> sampler -> JSONL, on a tiny checkpoint."""

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
N_RECORDS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_stage")
    records = generate_records(N_RECORDS, seed=0, width=64, height=64)
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
    prompts = root / "prompts.jsonl"
    write_jsonl(records, prompts)
    return root, model_dir, prompts, records, tok, sp


def run_stage(root, model_dir, prompts, name, *extra):
    out = root / name
    rc = main(["sample", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
               "--batch-size", "2", "--max-new-tokens", "5", "--min-pixels", str(32 * 32 * 4),
               "--max-pixels", str(64 * 64), *extra])
    assert rc == 0
    return [json.loads(line) for line in out.read_text().splitlines()], out


def test_sample_stage_writes_n_answers_per_prompt(setup, capsys):
    root, model_dir, prompts, records, tok, sp = setup
    rows, out = run_stage(root, model_dir, prompts, "a.jsonl", "--n", "3", "--temperature", "1.0", "--seed", "4")
    assert len(rows) == N_RECORDS * 3  # the short final batch (1 of 2 rows) is not lost or duplicated
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == sorted(
        (rec.id, j) for rec in records for j in range(3))
    for r in rows:
        n = len(r["token_ids"])
        assert 1 <= n <= 5 and len(r["logprobs"]) == n and len(r["raw_logprobs"]) == n
        assert r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "stop") == (r["token_ids"][-1] in sp.stop_ids)
        assert all(lp <= 0 for lp in r["logprobs"] + r["raw_logprobs"])
        text_ids = r["token_ids"][:-1] if r["finish_reason"] == "stop" else r["token_ids"]
        assert r["text"] == tok.decode(text_ids, skip_special_tokens=False)
    # the n samples of a prompt are different draws
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(tuple(r["token_ids"]))
    assert any(len(v) > 1 for v in by_prompt.values())
    manifest = json.loads((root / "a.jsonl.manifest.json").read_text())
    assert manifest["counts"]["prompts"] == N_RECORDS and manifest["counts"]["samples"] == 3 * N_RECORDS
    assert manifest["counts"]["new_tokens"] == sum(len(r["token_ids"]) for r in rows)
    err = capsys.readouterr().err
    assert f"{N_RECORDS} prompts x 3 = {3 * N_RECORDS} samples" in err and "tokens/s" in err
    # same seed -> same file
    again, _ = run_stage(root, model_dir, prompts, "b.jsonl", "--n", "3", "--temperature", "1.0", "--seed", "4")
    assert again == rows


def test_sample_stage_greedy_is_a_point_mass(setup):
    root, model_dir, prompts, *_ = setup
    rows, _ = run_stage(root, model_dir, prompts, "g.jsonl", "--n", "1", "--temperature", "0")
    assert len(rows) == N_RECORDS
    assert all(np.allclose(r["logprobs"], 0.0) for r in rows)  # greedy: a point mass


def test_sample_stage_bad_arguments(setup):
    root, model_dir, prompts, *_ = setup
    with pytest.raises(ValueError, match="n must be >= 1"):
        run_stage(root, model_dir, prompts, "x.jsonl", "--n", "0")
