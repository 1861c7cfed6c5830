"""``jdelta demo`` at tiny sizes: seeds -> tokenizer -> random pair -> score (-> VA-OPD -> re-score)."""

import json

import pytest

from jdelta.demo import RANDOM_NOTE, run_demo
from jdelta.models.qwen3_vl import Qwen3VLConfig

TINY = dict(n_prompts=6, n=2, max_new_tokens=6, shard_size=4, batch_size=4, max_pixels=64 * 64, vocab_size=320,
            teacher_layers=1, progress=False)


def test_demo_smoke_without_distillation(tmp_path, capsys):
    out = tmp_path / "demo"
    res = run_demo(out, distill_steps=0, **TINY)
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
    run_demo(out, distill_steps=0, **TINY)
    assert (out / "models" / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "score" / "manifest.json").read_text())["shards"]["resumed"] == 2


@pytest.mark.slow
def test_demo_with_distillation(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out, distill_steps=2, **TINY)
    d = res["distill"]
    assert d is not None and d["steps"] == 2 and d["checkpoint_steps"] == [2]
    export = out / "models" / "student-distilled"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert Qwen3VLConfig.from_pretrained(export) == Qwen3VLConfig.from_pretrained(out / "models" / "student")
    rescore = json.loads((out / "rescore" / "manifest.json").read_text())
    assert rescore["complete"] and rescore["counts"]["input"] == 6
    assert rescore["config"]["student"]["weights_fingerprint"] != json.loads(
        (out / "score" / "manifest.json").read_text())["config"]["student"]["weights_fingerprint"]
    assert [name for name, _, _ in res["rows"]] == ["before distillation", "after distillation"]
