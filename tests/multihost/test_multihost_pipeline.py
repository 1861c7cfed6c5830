"""A ``jdelta pipeline`` round with the real model scorer and the teacher as writer, as one program over
2 processes x 4 CPU devices: every result file equals the one-process run's over 8 devices; the other
process writes nothing into the run directory. Marked slow (two models, scoring, writing, screening)."""

import json

import pytest
import yaml
from multihost_harness import cli, run_ok

from jdelta.cli import main
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

SCORING = {"sampling": {"n": 2, "max_new_tokens": 4, "batch_size": 4}, "prompt": {"max_pixels": 64 * 64},
           "delta": {"num_permutations": 99, "num_posterior_draws": 100}, "mesh": {"fsdp": 4, "tensor": 2}}


def results(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}


@pytest.mark.slow
def test_pipeline_round_two_processes_equal_one(tmp_path):
    seeds = make_seeds(tmp_path / "seeds", 6, seed=2, width=96, height=72)
    tok = make_tokenizer(seeds, tmp_path / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(tmp_path / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    config = {
        "seed": 1, "rounds": 1, "unit_size": 4, "progress": False,
        "source": {"kind": "records", "path": str(seeds)},
        "scorer": {"kind": "models", "teacher": str(teacher), "student": str(student), **SCORING},
        "failure_modes": {"targets": ["student_wrong_teacher_right", "student_inconsistent", "both_wrong",
                                      "disagree", "divergent", "teacher_wrong_student_right"]},
        "synthesis": {"writer": {"kind": "teacher", "seeds": 3, "k": 2, "max_new_tokens": 12},
                      "steered": {"n": 2, "width": 96, "height": 72}},
        "screen": {"tau": -1.0, "min_teacher_accuracy": None},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path), "--out", str(tmp_path / "one")]) == 0
    run_ok(cli("pipeline", "--config", str(path), "--out", str(tmp_path / "two")))
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert set(two) == set(one) and any("score" in k for k in one)
    for name in one:
        assert two[name] == one[name], name
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m2["stages"] == m1["stages"] and m2["complete"]
