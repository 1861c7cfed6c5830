"""``jdelta sample``, ``score`` and ``eval`` as one program over 2 processes x 4 CPU devices equal the
one-process run over 8 devices: the same samples (token ids, texts), the same Δ per prompt, the same
predictions, every record accounted for once, and only process 0 writes. (score runs in the default
suite; sample and eval, the same batch and sampler path, are marked slow.)"""

import json

import numpy as np
import pytest
from multihost_harness import cli, run_ok

from jdelta.cli import main
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

N_RECORDS = 8
MESH = "fsdp=4,tensor=2"  # the batch axis spans both processes' devices


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    seeds = make_seeds(root / "seeds", N_RECORDS - 1, seed=5, width=96, height=64)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(root / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    lines = seeds.read_text().splitlines()
    prompts = root / "prompts.jsonl"  # one bad record: skipped in both runs, at the same place
    prompts.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    return root, prompts, teacher, student


def sample_args(model, prompts, out):
    return ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--n", "2",
            "--max-new-tokens", "6", "--batch-size", "4", "--max-pixels", str(64 * 64), "--no-progress",
            "--mesh", MESH]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # the score test below runs the same sampler path (both models) in the default suite
def test_sample_two_processes_equal_one(setup):
    root, prompts, _, student = setup
    assert main(sample_args(student, prompts, root / "one")) == 0
    done = run_ok(cli(*sample_args(student, prompts, root / "two")))
    one, two = rows(root / "one" / "samples.jsonl"), rows(root / "two" / "samples.jsonl")
    assert len(one) == 2 * (N_RECORDS - 1)
    assert [(r["record_index"], r["sample_index"], r["token_ids"], r["text"]) for r in two] == \
        [(r["record_index"], r["sample_index"], r["token_ids"], r["text"]) for r in one]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    m1 = json.loads((root / "one" / "manifest.json").read_text())
    m2 = json.loads((root / "two" / "manifest.json").read_text())
    assert m2["counts"] == m1["counts"] and m2["skipped"] == m1["skipped"] and m2["complete"]
    assert m1["counts"]["skipped"] == 1
    assert not list((root / "two").glob(".jdelta-shared-check*")), "the shared-directory probe is cleaned up"
    assert "sample:" in done[0].stderr


def test_score_two_processes_equal_one(setup):
    root, prompts, teacher, student = setup
    args = ["score", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
            "--n", "2", "--max-new-tokens", "6", "--batch-size", "4", "--max-pixels", str(64 * 64),
            "--num-permutations", "99", "--num-posterior-draws", "100", "--no-progress", "--mesh", MESH,
            "--shard-size", "4"]
    assert main([*args, "--out", str(root / "score1")]) == 0
    run_ok(cli(*args, "--out", str(root / "score2")))
    one, two = rows(root / "score1" / "scores.jsonl"), rows(root / "score2" / "scores.jsonl")
    assert [r["index"] for r in two] == list(range(N_RECORDS))
    assert two == one  # Δ, p-values, classes, completions: identical
    assert sum(r["status"] == "skipped" for r in two) == 1
    assert (root / "score2" / "report.md").read_text() == (root / "score1" / "report.md").read_text()


@pytest.mark.slow
def test_eval_two_processes_equal_one(setup):
    root, prompts, _, student = setup
    args = ["eval", "--model", str(student), "--data", f"charts={prompts}", "--max-new-tokens", "6",
            "--batch-size", "4", "--max-pixels", str(64 * 64), "--no-progress", "--mesh", MESH]
    assert main([*args, "--out", str(root / "eval1")]) == 0
    run_ok(cli(*args, "--out", str(root / "eval2")))
    assert rows(root / "eval2" / "predictions-charts.jsonl") == rows(root / "eval1" / "predictions-charts.jsonl")
    assert json.loads((root / "eval2" / "results.json").read_text()) == \
        json.loads((root / "eval1" / "results.json").read_text())
