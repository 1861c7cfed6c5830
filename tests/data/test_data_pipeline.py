"""Grain prompt pipeline over 1,000 generated records: determinism, exact resume, skip reports."""

import base64
import json

import grain
import numpy as np
import pytest
from etils import epath

from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.image_processor import ImageConfig
from jdelta.data.pipeline import PipelineConfig, config_from_dict, make_prompt_batches, prompt_dataset
from jdelta.data.records import JsonlSource, ListSource, RecordError, write_jsonl
from jdelta.data.tokenizer import SpecialTokens, build_demo_tokenizer

N_GOOD = 1000
PLANTED = {"bad_image": 3, "missing_field": 2, "empty_question": 1, "invalid_json": 1, "question_too_long": 1}
CFG = PipelineConfig(
    batch_size=16,
    seq_buckets=(96, 128, 256),
    patch_buckets=(64, 128, 256, 512),
    image_buckets=(16, 32),
    image=ImageConfig(min_pixels=32 * 32 * 4, max_pixels=64 * 64),
    max_question_chars=400,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    records = generate_records(N_GOOD, seed=0, width=64, height=64)
    tok = build_demo_tokenizer(root / "tok", corpus_text(records), vocab_size=600)
    path = root / "records.jsonl"
    write_jsonl(records, path)
    lines = path.read_text().splitlines()
    bad = []
    for i in range(PLANTED["bad_image"]):
        d = json.loads(lines[i])
        d["id"], d["images"] = (
            f"bad-image-{i}",
            [{"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()}],
        )
        bad.append(json.dumps(d))
    for i in range(PLANTED["missing_field"]):
        d = json.loads(lines[i])
        d["id"] = f"no-question-{i}"
        del d["question"]
        bad.append(json.dumps(d))
    d = json.loads(lines[0])
    d["id"], d["question"] = "empty-question", "   "
    bad.append(json.dumps(d))
    bad.append('{"id": "truncated", "question": ')
    d = json.loads(lines[0])
    d["id"], d["question"] = "long-question", "why? " * 200
    bad.append(json.dumps(d))
    # Interleave the planted records among the good ones.
    mixed = []
    for i, line in enumerate(lines):
        mixed.append(line)
        if i % 120 == 5 and bad:
            mixed.append(bad.pop())
    assert not bad
    path.write_text("\n".join(mixed) + "\n")
    return {"source": JsonlSource(path), "tok": tok, "records": records}


def _batches(it, states=None):
    out = []
    for b in it:
        out.append(b)
        if states is not None:
            states.append(it.get_state())
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pipeline_deterministic_resumable_and_reports_skips(data, tmp_path, caplog):
    src, tok = data["source"], data["tok"]
    it = make_prompt_batches(src, tokenizer=tok, seed=1, config=CFG, process_index=0, process_count=1)
    states = []
    with caplog.at_level("WARNING", logger="jdelta.data.pipeline"):
        first = _batches(it, states)
    assert "8 records skipped" in caplog.text and "missing_field: 2" in caplog.text
    # Every good record exactly once; the planted ones counted by reason and named.
    idx = np.concatenate([b["record_index"] for b in first])
    idx = idx[idx >= 0]
    assert len(idx) == N_GOOD and len(set(idx.tolist())) == N_GOOD
    assert dict(it.skip_report.counts) == PLANTED
    msgs = " ".join(m for ms in it.skip_report.examples.values() for m in ms)
    for name in ("bad-image-0", "no-question-1", "empty-question", "long-question", "records.jsonl:"):
        assert name in msgs
    assert "bad_image: 3" in it.skip_report.summary()
    ids = {i for b in first for i in b["ids"] if i}
    assert ids == {r.id for r in data["records"]}

    # Same seed: identical batches. Another seed: another order.
    again = _batches(
        make_prompt_batches(src, tokenizer=tok, seed=1, config=CFG, process_index=0, process_count=1)
    )
    _assert_same(first, again)
    other = make_prompt_batches(src, tokenizer=tok, seed=2, config=CFG, process_index=0, process_count=1)
    assert not np.array_equal(next(other)["record_index"], first[0]["record_index"])

    # Resume from a state saved by grain's Orbax checkpoint handler to the identical next batch.
    k = len(first) - 4
    resumed = make_prompt_batches(src, tokenizer=tok, seed=1, config=CFG, process_index=0, process_count=1)
    saved = make_prompt_batches(src, tokenizer=tok, seed=1, config=CFG, process_index=0, process_count=1)
    saved.set_state(states[k])
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(saved))
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(resumed))
    _assert_same(first[k + 1 :], _batches(resumed))
    assert resumed.skip_report.counts == it.skip_report.counts


def test_batch_layout(data):
    src, tok = data["source"], data["tok"]
    sp = SpecialTokens.from_tokenizer(tok)
    it = make_prompt_batches(src, tokenizer=tok, seed=0, config=CFG, process_index=0, process_count=1)
    for _ in range(3):
        b = next(it)
        B, S = b["input_ids"].shape
        assert B == 16 and S in CFG.seq_buckets and b["pixel_values"].shape[0] in CFG.patch_buckets
        assert b["pixel_values"].shape[1] == 1536 and b["image_grid_thw"].shape[0] in CFG.image_buckets
        mask = b["attention_mask"].astype(bool)
        assert (b["input_ids"][~mask] == sp.pad).all()
        assert mask[:, -1].all() and (np.diff(mask.astype(int), axis=1) >= 0).all()  # left padding
        n_img = int((b["image_grid_thw"].sum(1) > 0).sum())
        assert n_img == B and not b["image_grid_thw"][n_img:].any()
        patches = int(b["image_grid_thw"].prod(1).sum())
        assert not b["pixel_values"][patches:].any() and b["pixel_values"][:patches].std() > 0
        np.testing.assert_array_equal(b["mm_token_type_ids"].sum(1), b["image_grid_thw"][:B].prod(1) // 4)
        assert ((b["input_ids"] == sp.image_pad) == (b["mm_token_type_ids"] == 1)).all()


def test_raise_switch_names_the_record(data):
    cfg = PipelineConfig(**{**CFG.__dict__, "on_error": "raise"})
    it = make_prompt_batches(
        data["source"],
        tokenizer=data["tok"],
        seed=0,
        shuffle=False,
        config=cfg,
        process_index=0,
        process_count=1,
    )
    with pytest.raises(RecordError, match=r"record 'long-question': question has 1000 chars"):
        for _ in it:
            pass
    with pytest.raises(ValueError, match="on_error"):
        PipelineConfig(on_error="ignore")
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'; did you mean 'batch_size'\?"):
        config_from_dict({"batchsize": 4})
    cfg = config_from_dict({"batch_size": 4, "seq_buckets": [64, 128], "image": {"max_pixels": 4096}})
    assert cfg.seq_buckets == (64, 128) and cfg.image.max_pixels == 4096 and cfg.image.patch_dim == 1536


def test_sharding_hints_pixelation_and_short_final_batch(data):
    recs = ListSource(data["records"][:37])
    cfg = PipelineConfig(**{**CFG.__dict__, "with_hint": True, "with_pixelated": True})
    shards = []
    for p in range(2):
        it = make_prompt_batches(
            recs, tokenizer=data["tok"], seed=3, config=cfg, process_index=p, process_count=2
        )
        shards.append(_batches(it))
    got = [np.concatenate([b["record_index"] for b in s]) for s in shards]
    assert (got[0] >= 0).sum() == 19 and (got[1] >= 0).sum() == 18  # the short final batch is padded
    assert set(got[0][got[0] >= 0]) | set(got[1][got[1] >= 0]) == set(range(37))
    assert not set(got[0][got[0] >= 0]) & set(got[1][got[1] >= 0])
    b = shards[0][0]
    assert b["pixel_values_pixelated"].shape == b["pixel_values"].shape
    assert not np.array_equal(b["pixel_values_pixelated"], b["pixel_values"])
    teacher = data["tok"].decode(b["teacher_input_ids"][0][b["teacher_attention_mask"][0] == 1])
    student = data["tok"].decode(b["input_ids"][0][b["attention_mask"][0] == 1])
    assert "[Hint]:" in teacher and "[Hint]:" not in student
    last = shards[0][-1]
    pad_rows = last["record_index"] < 0
    assert (
        pad_rows.any() and not last["attention_mask"][pad_rows].any() and (last["ids"][pad_rows] == "").all()
    )


def test_worker_processes_give_the_same_batches(data):
    recs = ListSource(data["records"][:48])
    base = _batches(
        make_prompt_batches(recs, tokenizer=data["tok"], seed=4, config=CFG, process_index=0, process_count=1)
    )
    cfg = PipelineConfig(**{**CFG.__dict__, "worker_count": 1})
    it = make_prompt_batches(
        recs, tokenizer=data["tok"], seed=4, config=cfg, process_index=0, process_count=1
    )
    _assert_same(base, _batches(it))


def test_epochs_reshuffle_and_shards_partition_each_epoch(data):
    recs = ListSource(data["records"][:10])
    cfg = PipelineConfig(**{**CFG.__dict__, "num_epochs": 2})
    shards = [
        prompt_dataset(recs, tokenizer=data["tok"], seed=5, config=cfg, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert [len(s) for s in shards] == [10, 10]
    order = [[s[i]["record_index"] for i in range(10)] for s in shards]
    for epoch in range(2):
        seen = order[0][5 * epoch : 5 * epoch + 5] + order[1][5 * epoch : 5 * epoch + 5]
        assert sorted(seen) == list(range(10))
    assert order[0][:5] + order[1][:5] != order[0][5:] + order[1][5:]
