"""``jdelta demo`` on the shipped trained toy pair: accuracies, score, Δ by family (-> distillation arms)."""

import dataclasses
import json

import pytest

from jdelta.cli import main
from jdelta.stages.demo import Config, run_demo

TINY = dict(n_prompts=8, heldout_per_family=4, n=2, max_new_tokens=6, shard_size=4, batch_size=4, progress=False)


def demo(out, **kw) -> dict:
    return run_demo(Config(out=str(out), **{**TINY, **kw}))


def test_demo_smoke_without_distillation(tmp_path, capsys):
    out = tmp_path / "demo"
    res = demo(out, distill_steps=0)
    printed = capsys.readouterr().out
    assert "trained toy teacher and student" in printed and "| **all** |" in printed
    families = [f["family"] for f in res["world"]["families"]]
    assert len(families) >= 4
    for role in ("teacher", "student"):  # held-out accuracy per family with intervals
        acc = res["accuracy"][role]
        assert set(acc) == {*families, "all"} and acc["all"]["n"] == 4 * len(families)
        assert 0 <= acc["all"]["ci_low"] <= acc["all"]["accuracy"] <= acc["all"]["ci_high"] <= 1
    # the trained teacher knows something: it beats the student overall on its own held-out set
    assert res["accuracy"]["teacher"]["all"]["accuracy"] > res["accuracy"]["student"]["all"]["accuracy"]
    d = res["delta_by_family"]
    assert sum(d[f]["prompts"] for f in families) == d["all"]["prompts"] == 8
    assert 0 <= d["all"]["ci_low"] <= d["all"]["zero_share"] <= d["all"]["ci_high"] <= 1
    manifest = json.loads((out / "score" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["input"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distill"] is None and "Zero-Δ share of the 8 seeds" in (out / "summary.md").read_text()

    # Rerunning reuses the score run: nothing is rescored.
    demo(out, distill_steps=0)
    assert json.loads((out / "score" / "manifest.json").read_text())["shards"]["resumed"] == 2
    assert json.loads((out / "manifest.json").read_text())["complete"]

    # ... and other settings in the same directory are refused naming the key (exit 2, one line)
    capsys.readouterr()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "distill_steps": 0, "n": 3}.items() if k != "progress"]
    assert main(["demo", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds a demo run with other settings: config.n (2 -> 3)" in err[0]


def test_demo_config_errors(tmp_path):
    with pytest.raises(ValueError, match="distill_steps: must be >= 0"):
        Config(out="x", distill_steps=-1)
    assert dataclasses.replace(Config(out="x"), n=2).n == 2
    with pytest.raises(Exception, match="not a trained toy model"):
        demo(tmp_path / "d", pair=str(tmp_path))


@pytest.mark.slow
def test_demo_with_distillation(tmp_path):
    out = tmp_path / "demo"
    res = demo(out, distill_steps=2, n=8, n_prompts=16)
    d = res["distill"]
    assert d is not None and d["steps"] == 2 and d["prompts"]["delta"] == d["prompts"]["random"] >= 1
    for arm in ("delta", "random"):
        export = out / "models" / f"student-{arm}"
        assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
        assert res["accuracy"][f"student-{arm}"]["all"]["n"] == res["accuracy"]["student"]["all"]["n"]
    assert (out / "accuracy.png").stat().st_size > 0
    assert "after Δ > 0 prompts" in (out / "summary.md").read_text()
