"""``jdelta distill`` end to end on the demo config: run, resume from the checkpoint, export."""

import json

from jdelta.cli import main
from jdelta.distill.metrics import read_metrics


def test_distill_cli_runs_resumes_and_exports(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--config", "configs/distill_demo.yaml", "--no-progress", f"run_dir={run}", "distill.mode=reverse_kl",
              "data.with_image=false", "checkpoint.save_every=2", "checkpoint.async=false"]
    assert main(["distill", *common, "train.steps=2"]) == 0
    assert main(["distill", *common, "train.steps=4", f"export.path={tmp_path / 'hf'}"]) == 0
    err = capsys.readouterr().err
    assert "step 4 (2 this run)" in err and "time split: rollout" in err
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "reverse_kl", "time/rollout", "time/teacher", "time/update", "tokens_per_s"} <= set(rows[-1])
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_distill_cli_rejects_bad_config(tmp_path, capsys):
    import pytest

    with pytest.raises(ValueError, match="unknown config sections"):
        main(["distill", "--config", "configs/distill_demo.yaml", f"run_dir={tmp_path}", "bogus.x=1"])
