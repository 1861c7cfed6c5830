"""``jdelta eval``: per-benchmark metrics, majority vote, counts; a real run on a tiny random model."""

import json

import jdelta.evaluate as ev
import pytest

from jdelta.cli import main
from jdelta.data.records import PromptRecord, read_jsonl, write_jsonl
from jdelta.testing import make_random_model_dir, make_seeds, make_tokenizer
from jdelta.testing import tiny_config_for_tokenizer as tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    seeds = make_seeds(root / "seeds", 4, seed=5, width=128, height=96)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    model = make_random_model_dir(tiny_config(tok, hidden=32, layers=1, vision_hidden=16), tok, root / "model", 7)
    charts = list(read_jsonl(seeds))
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
        "docs": [["Answer: Acme Corporatio"] * 3,  # ANLS 1 - 1/16
                 ["Answer: 12 May 2020", "Answer: 13 June 2021", "Answer: 12 May 2020"]],
    }
    calls = []

    def fake_sample_texts(sampler, tokenizer, batch, params, rng):
        b = batch["input_ids"].shape[0]
        assert params.n == 3 and params.temperature == 0.5
        name = "charts" if len(calls) == 0 else "docs"
        calls.append(name)
        return planned[name][:b], [["stop"] * 3] * b

    monkeypatch.setattr(ev, "sample_texts", fake_sample_texts)
    res = ev.run_eval(root / "model", f"{seeds},docs={root / 'docs.jsonl'}", tmp_path, n=3, temperature=0.5,
                      batch_size=4, max_pixels=64 * 64, progress=False)
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    chart_metrics = [ev.answer_metric_for(c) for c in charts]
    assert rows["seeds"]["scored"] == 4 and rows["seeds"]["skipped"] == 0
    assert rows["seeds"]["score"] == pytest.approx(2 / 4)
    assert rows["docs"]["metric"] == "anls" and rows["docs"]["scored"] == 2
    assert rows["docs"]["skipped_by_reason"] == {"no_reference": 1}
    assert rows["docs"]["score"] == pytest.approx((1 - 1 / 16 + 1.0) / 2)
    assert res["average"] == pytest.approx((rows["seeds"]["score"] + rows["docs"]["score"]) / 2)
    preds = [json.loads(x) for x in (tmp_path / "predictions-seeds.jsonl").read_text().splitlines()]
    assert [p["score"] for p in preds] == [1.0, 0.0, 1.0, 0.0]
    assert [p["metric"] for p in preds] == chart_metrics
    assert preds[0]["votes"] == 2 and preds[3]["label"] == "<invalid>"
    md = (tmp_path / "results.md").read_text()
    assert "| docs | anls | 3 | 2 | 1 | 96.9 |" in md and "**average**" in md

    # A forced metric applies to every benchmark.
    calls.clear()
    res = ev.run_eval(root / "model", f"{seeds},docs={root / 'docs.jsonl'}", tmp_path / "exact", n=3,
                      temperature=0.5, metric="exact", batch_size=4, max_pixels=64 * 64, progress=False)
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    assert rows["docs"]["metric"] == "exact_match" and rows["docs"]["score"] == pytest.approx(0.5)


def test_eval_cli_on_tiny_random_model(setup, tmp_path, capsys):
    root, seeds, model, _ = setup
    rc = main(["eval", "--model", str(model), "--data", f"{seeds},docs={root / 'docs.jsonl'}", "--out",
               str(tmp_path), "--max-new-tokens", "4", "--batch-size", "4", "--max-pixels", str(64 * 64),
               "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["decoding"] == "greedy"
    rows = {r["benchmark"]: r for r in res["benchmarks"]}
    assert rows["seeds"]["prompts"] == 4 and rows["seeds"]["scored"] + rows["seeds"]["skipped"] == 4
    assert rows["docs"]["scored"] == 2 and rows["docs"]["skipped"] == 1
    for r in rows.values():
        assert 0.0 <= r["score"] <= 1.0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["model"]["config_sha256"]
    assert "| **average** |" in capsys.readouterr().out


def test_bad_data_spec_is_a_clear_error(setup, tmp_path, capsys):
    root, seeds, model, _ = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.run_eval(root / "model", str(tmp_path / "missing.jsonl"), tmp_path / "o", progress=False)
    rc = main(["eval", "--model", str(model), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert rc == 2 and "missing.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="repeat"):
        ev.parse_data_spec(f"{seeds},{seeds}")
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(model), "--data", str(seeds), "--out", str(tmp_path), "--metric", "bleu"])
