"""``jdelta.distributed.GlobalPromptBatches`` in one process: exactly the Grain pipeline's batches
(shuffle, epochs, skips, whole batches), a state that resumes exactly, and the record slices each
of P processes would read (together every position once)."""

import dataclasses

import numpy as np
import pytest

from jdelta.data.pipeline import PipelineConfig, make_prompt_batches
from jdelta.data.records import open_records
from jdelta.distributed import DistributedError, GlobalPromptBatches, check_divides, local_rows
from jdelta.testing import make_seeds, make_tokenizer

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "record_index")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("global_batches")
    seeds = make_seeds(root / "seeds", 6, seed=2, width=64, height=64)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    lines = seeds.read_text().splitlines()
    path = root / "prompts.jsonl"
    path.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    return open_records(path), tok


def cfg(**over) -> PipelineConfig:
    base = PipelineConfig(batch_size=2, seq_buckets=(256, 512))
    base = dataclasses.replace(base, image=dataclasses.replace(base.image, max_pixels=64 * 64, min_pixels=32 * 32))
    return dataclasses.replace(base, **over)


def same(a, b):
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("over", [{}, {"num_epochs": None, "drop_remainder": True}])
def test_one_process_equals_the_grain_pipeline_and_resumes(source, over):
    src, tok = source
    c = cfg(**over)
    ref = make_prompt_batches(src, tokenizer=tok, seed=3, config=c, process_index=0, process_count=1)
    glob = GlobalPromptBatches(src, tokenizer=tok, seed=3, config=c, keep_skipped=True)
    n = 4 if over else 10
    got = []
    for _ in range(n):
        try:
            a = next(ref)
        except StopIteration:
            with pytest.raises(StopIteration):
                next(glob)
            break
        b = next(glob)
        same(a, b)
        got.append(b)
    assert glob.skip_report.as_dict() == ref.skip_report.as_dict()
    assert [s["reason"] for s in glob.skipped] == ["invalid_json"]
    if over:  # endless: the state after 2 batches resumes to the same third and fourth batch
        again = GlobalPromptBatches(src, tokenizer=tok, seed=3, config=c)
        first = GlobalPromptBatches(src, tokenizer=tok, seed=3, config=c)
        next(first), next(first)
        again.set_state(first.get_state())
        same(next(again), got[2])
        same(next(again), got[3])


def test_record_slices_and_divisibility():
    assert [list(local_rows(8, i, 2)) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DistributedError, match="rows 6 does not divide across 4 processes"):
        local_rows(6, 0, 4)
    check_divides(8, 4, "batch", "processes")
    with pytest.raises(DistributedError, match="batch size 3 does not divide across 2 processes"):
        check_divides(3, 2, "batch size", "processes")
