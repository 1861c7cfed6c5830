"""``jdelta eval``: per-benchmark metrics, majority vote, counts, the run directory; a real run on a
tiny random model."""

import json

import pytest

from jdelta import completions
from jdelta.benchmark_metrics import answer_metric_for
from jdelta.cli import main
from jdelta.config import build
from jdelta.data.records import PromptRecord, read_records_jsonl, write_jsonl
from jdelta.errors import RunDirError
from jdelta.evaluation import parse_data_spec
from jdelta.runs import RunDir
from jdelta.stages.evaluate import Config, run_eval
from jdelta.testing import make_random_model_dir, make_seeds, make_tokenizer, tiny_config_for_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    seeds = make_seeds(root / "seeds", 4, seed=5, width=128, height=96)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    cfg = tiny_config_for_tokenizer(tok, hidden=32, layers=1, vision_hidden=16)
    model = make_random_model_dir(cfg, tok, root / "model", 7)
    charts = list(read_records_jsonl(seeds))
    image = charts[0].images[0]
    docs = [
        PromptRecord(id="doc-0", images=[image], question="Who issued it?", answer="Acme Corporation",
                     provenance={"dataset": "DocVQA"}, meta={"answers": ["Acme Corporation", "ACME Corp"]}),
        PromptRecord(id="doc-1", images=[image], question="What is the date?", answer="12 May 2020",
                     provenance={"dataset": "DocVQA"}),
        PromptRecord(id="doc-noref", images=[image], question="Anything?", answer=None),
    ]
    write_jsonl(docs, root / "docs.jsonl")
    return root, seeds, model, charts


def config(model, data, out, **over) -> Config:
    return build(Config, {"model": str(model), "data": data, "out": str(out), "sampling": {"batch_size": 4},
                          "prompt": {"max_pixels": 64 * 64}, "progress": False, **over})


def test_metrics_and_majority_vote(setup, tmp_path, monkeypatch):
    """Known completions in place of the random model's: exact per-benchmark scores."""
    root, seeds, model, charts = setup
    refs = [c.answer for c in charts]
    wrong = "Answer: 987654"
    planned = {  # per scored prompt, in order: n = 3 completions
        "charts": [[f"Answer: {refs[0]}", wrong, f"The answer is {refs[0]}"],  # majority right
                   [wrong, wrong, f"Answer: {refs[1]}"],  # majority wrong
                   [f"\\boxed{{{refs[2]}}}"] * 3,
                   ["<think>unfinished"] * 3],  # invalid -> 0
        "docs": [["Answer: ACME Corp"] * 3,  # the second accepted answer: ANLS 1
                 ["Answer: 12 May 2020", "Answer: 13 June 2021", "Answer: 12 May 2020"]],
    }
    calls = []

    def fake_sample_texts(sampler, tokenizer, batch, params, rng):
        b = batch["input_ids"].shape[0]
        assert params.n == 3 and params.temperature == 0.5
        name = "charts" if len(calls) == 0 else "docs"
        calls.append(name)
        return planned[name][:b], [["stop"] * 3] * b

    monkeypatch.setattr(completions, "sample_texts", fake_sample_texts)
    sampling = {"n": 3, "temperature": 0.5, "batch_size": 4}
    res = run_eval(config(model, f"{seeds},docs={root / 'docs.jsonl'}", tmp_path / "a", sampling=sampling))
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    chart_metrics = [answer_metric_for(c) for c in charts]
    assert rows["seeds"]["scored"] == 4 and rows["seeds"]["skipped"] == 0
    assert rows["seeds"]["score"] == pytest.approx(2 / 4)
    assert rows["docs"]["metric"] == "anls" and rows["docs"]["scored"] == 2
    assert rows["docs"]["skipped_by_reason"] == {"no_reference": 1}
    assert rows["docs"]["score"] == pytest.approx(1.0)
    assert res["average"] == pytest.approx((rows["seeds"]["score"] + rows["docs"]["score"]) / 2)
    preds = [json.loads(x) for x in (tmp_path / "a" / "predictions-seeds.jsonl").read_text().splitlines()]
    assert [p["score"] for p in preds] == [1.0, 0.0, 1.0, 0.0]
    assert [p["metric"] for p in preds] == chart_metrics
    assert preds[0]["votes"] == 2 and preds[3]["label"] == "<invalid>"
    docs = [json.loads(x) for x in (tmp_path / "a" / "predictions-docs.jsonl").read_text().splitlines()]
    assert docs[0]["reference"] == ["Acme Corporation", "ACME Corp"]  # every accepted answer, a list
    assert docs[2]["status"] == "skipped" and docs[2]["id"] == "doc-noref"
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| docs | anls | 3 | 2 | 1 | 100.0 |" in md and "**average**" in md

    # A forced metric applies to every benchmark.
    calls.clear()
    res = run_eval(config(model, f"{seeds},docs={root / 'docs.jsonl'}", tmp_path / "exact", sampling=sampling,
                          metric="exact"))
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    assert rows["docs"]["metric"] == "exact_match" and rows["docs"]["score"] == pytest.approx(1.0)


def test_list_references_score_every_accepted_answer(setup, tmp_path, monkeypatch):
    """issue 11.1: ``"answer": ["123", "124"]`` read from JSONL stays a list; "123" and "124" both score 1."""
    root, seeds, model, _ = setup
    rec = json.loads(seeds.read_text().splitlines()[0])
    lines = [json.dumps(dict(rec, id=f"several-{i}", answer=["123", "124"], answer_type="number",
                             provenance={}, family="", meta={})) for i in range(3)]
    path = tmp_path / "several.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def fake_sample_texts(sampler, tokenizer, batch, params, rng):
        b = batch["input_ids"].shape[0]
        return [["Answer: 123"], ["Answer: 124"], ["Answer: 125"]][:b], [["stop"]] * b

    monkeypatch.setattr(completions, "sample_texts", fake_sample_texts)
    res = run_eval(config(model, f"several={path}", tmp_path / "o", metric="exact"))
    preds = [json.loads(x) for x in (tmp_path / "o" / "predictions-several.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == [["123", "124"]] * 3
    assert [p["score"] for p in preds] == [1.0, 1.0, 0.0]
    assert res["benchmarks"][0]["score"] == pytest.approx(2 / 3)


def test_eval_cli_on_tiny_random_model(setup, tmp_path, capsys):
    root, seeds, model, _ = setup
    out = tmp_path / "cli"

    def cli(out, *extra):
        return ["eval", "--model", str(model), "--data", f"{seeds},docs={root / 'docs.jsonl'}", "--out", str(out),
                "--max-new-tokens", "4", "--batch-size", "4", "--max-pixels", str(64 * 64), "--no-progress", *extra]

    args = cli(out)
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["decoding"] == "greedy"
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    assert rows["seeds"]["prompts"] == 4 and rows["seeds"]["scored"] + rows["seeds"]["skipped"] == 4
    assert rows["docs"]["scored"] == 2 and rows["docs"]["skipped"] == 1
    for r in rows.values():
        assert 0.0 <= r["score"] <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"]["model"]["config_sha256"]
    assert set(manifest["inputs"]["data"]) == {"seeds", "docs"}
    assert "| **average** |" in capsys.readouterr().out

    # The same command again resumes: finished benchmarks are read back, not re-answered.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("predictions-*.jsonl")}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("predictions-*.jsonl")} == before
    assert json.loads((out / "results.json").read_text()) == res
    # Other settings are refused naming the key; a live directory is refused by its lock.
    capsys.readouterr()
    assert main([*args, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "config.sampling.max_new_tokens (4 -> 5)" in err[0]
    with RunDir(tmp_path / "locked", "eval", config={}):
        assert main(cli(tmp_path / "locked")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "in use by another jdelta process" in err[0] and "locked" in err[0]


def test_bad_data_spec_is_a_clear_error(setup, tmp_path, capsys):
    root, seeds, model, _ = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval(config(model, str(tmp_path / "missing.jsonl"), tmp_path / "o"))
    with pytest.raises(ValueError, match="repeat"):
        parse_data_spec(f"{seeds},{seeds}")
    with pytest.raises(RunDirError):  # a file where the run directory should be
        (tmp_path / "afile").write_text("x")
        run_eval(config(model, str(seeds), tmp_path / "afile"))
    base = ["eval", "--model", str(model), "--data", str(seeds), "--out", str(tmp_path / "o2")]
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--metric", "bleu"], "config key 'metric'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["--metrc", "anls"], "did you mean --metric?"),
        (["sampling.tempreature=0.1"], "did you mean 'sampling.temperature'?"),
        (["--n", "two"], "config key 'sampling.n'"),
        (["--limit", "0"], "config key 'limit': must be >= 1"),
    ]
    for extra, fragment in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("jdelta eval: error: ") and fragment in err[0], err
