"""``jdelta score --engine continuous``: teacher and student sampled through continuous batching
(jdelta.completions.ContinuousSampler) give the static path's scores, entry for entry, on a tiny
random pair, with text prompts and with image prompts."""

import dataclasses
import json
import warnings

import pytest

from jdelta.cli import main
from jdelta.data.records import read_records_jsonl, write_jsonl
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N = 5


@pytest.mark.parametrize("images", [
    pytest.param(False, marks=pytest.mark.slow),  # the default suite's images case mixes in a text prompt
    True], ids=["text", "images"])
def test_continuous_engine_scores_equal_static(tmp_path, images):
    seeds = make_seeds(tmp_path / "seeds", N, seed=3, width=128, height=96)
    tok = make_tokenizer(seeds, tmp_path / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(tmp_path / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    records = [dataclasses.replace(r, images=r.images if images else [], question=r.question * (1 + i % 2))
               for i, r in enumerate(read_records_jsonl(seeds))]
    if images:  # one text prompt among the image ones
        records[1] = dataclasses.replace(records[1], images=[])
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(records, prompts)
    pixels = ("--min-pixels", str(32 * 32 * 4), "--max-pixels", str(96 * 64)) if images else ()

    def score(name, *extra):
        out = tmp_path / name
        assert main(["score", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
                     "--out", str(out), "--n", "3", "--max-new-tokens", "8", "--batch-size", "2",
                     "--shard-size", "4", "--num-permutations", "99", "--num-posterior-draws", "100",
                     "--no-progress", *pixels, *extra]) == 0
        return [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]

    static = score("static")
    # 4 slots per model: one prompt (3 rows) at a time, across the batches of a shard
    cont = score("cont", "--engine", "continuous", "--engine-slots", "4")
    assert len(static) == N and all(e["status"] == "scored" for e in static)
    assert cont == static
