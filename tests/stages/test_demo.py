"""``jdelta demo`` at tiny sizes: seeds -> tokenizer -> random pair -> score (-> VA-OPD -> re-score)."""

import dataclasses
import json

import pytest

from jdelta.cli import main
from jdelta.models.qwen3_vl import Qwen3VLConfig
from jdelta.stages.demo import RANDOM_NOTE, Config, run_demo

TINY = dict(n_prompts=6, n=2, max_new_tokens=6, shard_size=4, batch_size=4, max_pixels=64 * 64, vocab_size=320,
            teacher_layers=1, progress=False)


def demo(out, **kw) -> dict:
    return run_demo(Config(out=str(out), **{**TINY, **kw}))


def test_demo_smoke_without_distillation(tmp_path, capsys):
    out = tmp_path / "demo"
    res = demo(out, distill_steps=0)
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in printed and "| before distillation" in printed
    t_cfg = Qwen3VLConfig.from_pretrained(out / "models" / "teacher")
    s_cfg = Qwen3VLConfig.from_pretrained(out / "models" / "student")
    assert t_cfg.text.hidden_size > s_cfg.text.hidden_size  # the teacher is the larger model
    assert Qwen3VLConfig.from_pretrained(out / "models" / "teacher").tie_word_embeddings is False
    assert t_cfg.text.vocab_size == s_cfg.text.vocab_size and t_cfg.image_token_id == s_cfg.image_token_id
    for role in ("teacher", "student"):
        assert (out / "models" / role / "tokenizer.json").is_file()
        assert (out / "models" / role / "RANDOM_WEIGHTS.txt").is_file()
    manifest = json.loads((out / "score" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["input"] == 6
    assert manifest["counts"]["scored"] + manifest["counts"]["skipped"] == 6
    assert RANDOM_NOTE in (out / "score" / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_models"] and summary["distill"] is None and list(summary["runs"]) == ["before distillation"]
    assert len(res["rows"]) == 1

    # Rerunning reuses every artefact: nothing is regenerated or rescored.
    mtime = (out / "models" / "teacher" / "model.safetensors").stat().st_mtime_ns
    demo(out, distill_steps=0)
    assert (out / "models" / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "score" / "manifest.json").read_text())["shards"]["resumed"] == 2
    assert json.loads((out / "manifest.json").read_text())["complete"]

    # ... and other settings in the same directory are refused naming the key (exit 2, one line)
    capsys.readouterr()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "distill_steps": 0, "n": 3}.items() if k != "progress"]
    assert main(["demo", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds a demo run with other settings: config.n (2 -> 3)" in err[0]


def test_demo_config_errors():
    with pytest.raises(ValueError, match="distill_steps: must be >= 0"):
        Config(out="x", distill_steps=-1)
    assert dataclasses.replace(Config(out="x"), n=2).n == 2


@pytest.mark.slow
def test_demo_with_distillation(tmp_path):
    out = tmp_path / "demo"
    res = demo(out, distill_steps=2)
    d = res["distill"]
    assert d is not None and d["steps"] == 2 and d["checkpoint_steps"] == [2]
    export = out / "models" / "student-distilled"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert Qwen3VLConfig.from_pretrained(export) == Qwen3VLConfig.from_pretrained(out / "models" / "student")
    rescore = json.loads((out / "rescore" / "manifest.json").read_text())
    assert rescore["complete"] and rescore["counts"]["input"] == 6
    assert rescore["inputs"]["student"]["weights_fingerprint"] != json.loads(
        (out / "score" / "manifest.json").read_text())["inputs"]["student"]["weights_fingerprint"]
    assert [name for name, _, _ in res["rows"]] == ["before distillation", "after distillation"]
