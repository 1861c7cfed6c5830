"""Off-policy SFT on ``jdelta sample`` output with images: the sampled responses joined to their
prompt records, prompts rebuilt by the data pipeline, trained through the ``jdelta distill`` stage."""

import json
import warnings

import numpy as np
import pytest
from qwen3_vl_tiny import save_tiny_hf_checkpoint

from jdelta.cli import main
from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.image_processor import ImageConfig
from jdelta.data.pipeline import PipelineConfig, make_prompt_batches
from jdelta.data.records import open_records, write_jsonl
from jdelta.data.tokenizer import SpecialTokens, build_demo_tokenizer
from jdelta.distill.sft import SFTConfig, SFTProducer, make_sft_loss, read_sample_output, sample_sft_batches

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N_RECORDS, N_SAMPLES = 4, 2
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 64 * 64
IMAGE = ImageConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_sample")
    records = generate_records(N_RECORDS, seed=0, width=64, height=64)
    teacher_dir, student_dir = root / "teacher", root / "student"
    tok = build_demo_tokenizer(teacher_dir, corpus_text(records), vocab_size=400)
    sp = SpecialTokens.from_tokenizer(tok)
    save_tiny_hf_checkpoint(tok, teacher_dir, hidden=32, layers=2, seed=0)
    save_tiny_hf_checkpoint(tok, student_dir, hidden=32, layers=1, seed=1)
    prompts = root / "prompts.jsonl"
    write_jsonl(records, prompts)
    out = root / "sample" / "samples.jsonl"  # `jdelta sample --out` is a run directory
    assert main(["sample", "--model", str(teacher_dir), "--prompts", str(prompts), "--out", str(out.parent),
                 "--n", str(N_SAMPLES), "--batch-size", "2", "--max-new-tokens", "8", "--temperature", "1.0",
                 "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS)]) == 0
    n_real = len(out.read_text().splitlines())
    # a planted row whose prompt record does not exist: counted as skipped, never silently dropped
    with out.open("a") as f:
        f.write(json.dumps({"prompt_id": "no-such-record", "record_index": 99, "sample_index": 0, "text": "x",
                            "token_ids": [5, 6], "finish_reason": "stop"}) + "\n")
    return root, teacher_dir, student_dir, prompts, out, tok, sp, n_real


def _pixel_rows(batch, row):
    """This row's pixel_values (one image per chart record, images in row order)."""
    grid = np.asarray(batch["image_grid_thw"])
    sizes = grid.prod(-1)
    start = int(sizes[:row].sum())
    return np.asarray(batch["pixel_values"])[start: start + int(sizes[row])], grid[row]


def test_rebuilt_prompts_equal_the_samplers(sampled):
    root, _, _, prompts, out, tok, sp, n_real = sampled
    # the same filter sample_sft_batches applies: a random teacher may emit vision placeholder ids,
    # and such responses are skipped (counted), never trained on
    vision = (sp.image_pad, sp.video_pad, sp.vision_start, sp.vision_end)
    rows, skips = read_sample_output(out, open_records(prompts), vision_ids=vision)
    assert skips.counts["missing_prompt"] == 1 and "samples.jsonl:" in skips.examples["missing_prompt"][0]
    assert len(rows) + skips.total == n_real + 1
    # what the sampler saw: the pipeline's batch of the records, unshuffled, same settings
    seen = next(make_prompt_batches(open_records(prompts), tokenizer=tok, shuffle=False,
                                    config=PipelineConfig(batch_size=N_RECORDS, image=IMAGE)))
    it = sample_sft_batches(out, prompts, tokenizer=tok, shuffle=False,
                            config=PipelineConfig(batch_size=len(rows), image=IMAGE))
    b = next(it)
    assert it.skip_report.counts["missing_prompt"] == 1
    for i, r in enumerate(rows):
        j = r.record_index
        assert b["ids"][i] == seen["ids"][j] == r.prompt_id
        got = b["input_ids"][i][b["attention_mask"][i] > 0]
        want = seen["input_ids"][j][seen["attention_mask"][j] > 0]
        np.testing.assert_array_equal(got, want)
        assert (got == sp.image_pad).sum() > 0  # the prompt carries its image
        pv, g = _pixel_rows(b, i)
        pv0, g0 = _pixel_rows(seen, j)
        np.testing.assert_array_equal(g, g0)
        np.testing.assert_array_equal(pv, pv0)
        assert list(b["completion"][i, : b["completion_length"][i]]) == list(r.token_ids)
    # checkpointable: a restored iterator continues with the same batches
    it = sample_sft_batches(out, prompts, tokenizer=tok, seed=3, config=PipelineConfig(
        batch_size=2, image=IMAGE, num_epochs=None, drop_remainder=True))
    next(it)
    state = it.get_state()
    want = [next(it)["sample_row"] for _ in range(3)]
    it.set_state(state)
    assert all((next(it)["sample_row"] == w).all() for w in want)


def _eval_nll(model_dir, out, prompts, tok, n_rows):
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    model, _ = load_hf_checkpoint(model_dir)
    it = sample_sft_batches(out, prompts, tokenizer=tok, shuffle=False,
                            config=PipelineConfig(batch_size=n_rows, image=IMAGE))
    cfg = SFTConfig(chunk_size=8, completion_bucket=8, prompt_bucket=16, pad_id=SpecialTokens.from_tokenizer(tok).pad)
    batch = SFTProducer(model, it, cfg).produce(None, 0).batch
    assert batch["pixel_values"].size and np.asarray(batch["image_grid_thw"]).any()
    _, aux = make_sft_loss(cfg)(model, batch, None, None)
    return float(aux["nll"])


def test_sft_on_sample_output_through_distill_stage(sampled, tmp_path):
    from jdelta.config import build
    from jdelta.stages.distill import Config, train

    root, _, student_dir, prompts, out, tok, sp, _ = sampled
    rows, skips = read_sample_output(out, open_records(prompts),
                                     vision_ids=(sp.image_pad, sp.video_pad, sp.vision_start, sp.vision_end))
    before = _eval_nll(student_dir, out, prompts, tok, len(rows))
    cfg = {
        "run_dir": str(tmp_path / "run"), "method": "sft", "student": {"path": str(student_dir)},
        "data": {"source": "sample_output", "path": str(out), "prompts": str(prompts),
                 "tokenizer": str(student_dir), "batch_size": 4,
                 "pipeline": {"image": {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}}},
        "train": {"steps": 40, "log_every": 10},
        "optimizer": {"learning_rate": 1e-2, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"save_every": 1000, "async_save": False},
        "sft": {"chunk_size": 8, "completion_bucket": 8, "prompt_bucket": 16},
        "export": {"path": str(tmp_path / "hf")}, "progress": False,
    }
    s = train(build(Config, cfg)).summary
    assert s["steps"] == 40 and s["nan_steps"] == 0
    assert s["data_skipped"]["counts"].get("missing_prompt") == 1, s["data_skipped"]
    assert sum(s["data_skipped"]["counts"].values()) == skips.total
    after = _eval_nll(tmp_path / "hf", out, prompts, tok, len(rows))
    print(f"student NLL of the teacher's responses: {before:.3f} -> {after:.3f}")
    assert after < 0.3 * before, (before, after)


def test_sample_output_errors_name_the_line(sampled, tmp_path):
    _, _, _, prompts, out, *_ = sampled
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_sample_output(bad, open_records(prompts))
    bad.write_text('{"prompt_id": "a", "token_ids": [], "finish_reason": "stop"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs non-empty 'token_ids'"):
        read_sample_output(bad, open_records(prompts))
    # drop_truncated: a row that hit max_new_tokens is counted, not kept
    real = [json.loads(line) for line in out.read_text().splitlines()][:2]
    real[0]["finish_reason"], real[1]["finish_reason"] = "stop", "length"
    bad.write_text("".join(json.dumps(r) + "\n" for r in real))
    kept, skips = read_sample_output(bad, open_records(prompts), drop_truncated=True)
    assert [r.line for r in kept] == [1] and skips.counts["truncated"] == 1
    assert len(read_sample_output(bad, open_records(prompts))[0]) == 2
