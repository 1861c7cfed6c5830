"""The one batch path (jdelta.completions.prompt_batches over the Grain pipeline): records parsed once,
a slice selected, every record either batched or listed as skipped, real rows only, one bucket rule."""

import dataclasses

import numpy as np
import pytest

from jdelta.buckets import bucket
from jdelta.completions import make_sampler, prompt_batches
from jdelta.data.pipeline import PipelineConfig
from jdelta.data.records import PromptRecord, read_records_jsonl
from jdelta.testing import make_seeds, make_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("completions")
    seeds = make_seeds(root / "seeds", 7, seed=1, width=96, height=64)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    records = list(read_records_jsonl(seeds))
    records[2] = dataclasses.replace(records[2], id="no-image", images=[b"not an image"])
    records[4] = dataclasses.replace(records[4], id="multi", answer="7", meta={"answers": ["7", "seven"]})
    return records, tok


def test_bucket_rule():
    assert [bucket(n, (8, 16)) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 48]


def test_prompt_batches_account_for_every_selected_record(data):
    records, tok = data
    cfg = PipelineConfig(batch_size=2)
    batches = prompt_batches(records, tok, cfg, select=slice(1, 6))
    got = list(batches)
    seen = [i for b in got for i in b.indices]
    assert seen == [1, 3, 4, 5]  # in source order; index 2 is skipped, 0 and 6 not selected
    assert batches.skipped == [{"record_index": 2, "id": "no-image", "reason": "bad_image",
                                "message": batches.skipped[0]["message"]}]
    assert "record 'no-image' image 0" in batches.skipped[0]["message"]
    for b in got:
        k = len(b.indices)
        assert b.inputs["input_ids"].shape[0] == k and b.inputs["attention_mask"].shape[0] == k
        assert (b.inputs["attention_mask"].sum(1) > 0).all()  # no padding rows are handed on
        assert b.inputs["input_ids"].shape[1] in cfg.seq_buckets  # padded once, to the pipeline's bucket
        assert b.inputs["pixel_values"].shape[0] in cfg.patch_buckets
        assert [r.id for r in b.records] == [records[i].id for i in b.indices]
        assert all(isinstance(r, PromptRecord) and r.images == [] for r in b.records)  # parsed once, no pixels
    multi = next(r for b in got for r, i in zip(b.records, b.indices, strict=True) if i == 4)
    assert multi.answers == ["7", "seven"]  # every accepted reference travels with the record


def test_sampler_uses_the_pipeline_buckets():
    cfg = PipelineConfig(batch_size=3, seq_buckets=(64, 128), patch_buckets=(100,), image_buckets=(4,))

    class Model:  # what Sampler's constructor reads
        config = None

        def get_rope_index(self, *a):
            raise AssertionError("not called")

    s = make_sampler(Model(), pipeline=cfg, pad_id=5)
    assert (s.seq_buckets, s.patch_buckets, s.image_buckets, s.batch_buckets, s.pad_id) == (
        (64, 128), (100,), (4,), (3,), 5)
    batch = {"input_ids": np.ones((2, 64), np.int32), "attention_mask": np.ones((2, 64), np.int32)}
    s.rope_index_fn = lambda ids, grid, mask: (np.zeros((3, *ids.shape), np.int32), np.zeros(ids.shape[0]))
    out = s.prepare(batch)
    assert out["input_ids"].shape == (3, 64)  # rows restored to the batch size, length unchanged
