"""``jdelta distill`` through the CLI: run, resume, export; config errors; run-directory reuse; tokenizers."""

import json
from pathlib import Path

import pytest

from jdelta.cli import main
from jdelta.distill.metrics import read_metrics
from jdelta.testing import make_random_model_dir, make_seeds, make_tokenizer, tiny_config_for_tokenizer

DEMO = ["--config", "configs/distill_demo.yaml", "--no-progress"]
FAST = [*DEMO, "distill.mode=reverse_kl", "data.with_image=false", "checkpoint.save_every=2",
        "checkpoint.async_save=false"]


def _error_line(capsys) -> str:
    """The stderr of a refused command: exactly one line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jdelta distill: error: "), err
    return err


def test_distill_cli_runs_refuses_other_settings_resumes_and_exports(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", *FAST, f"run_dir={run}", "train.steps=2"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["steps"] == 2
    assert manifest["config"]["optimizer"]["learning_rate"] == 0.01
    capsys.readouterr()

    # the finished run with another learning rate and mode: refused, naming both keys; nothing changed
    assert main(["distill", *FAST, f"run_dir={run}", "train.steps=4", "optimizer.learning_rate=0.5",
                 "distill.mode=gkd"]) == 2
    err = _error_line(capsys)
    assert "config.distill.mode ('reverse_kl' -> 'gkd')" in err
    assert "config.optimizer.learning_rate (0.01 -> 0.5)" in err
    assert json.loads((run / "manifest.json").read_text()) == manifest
    # another model shape: one line naming the key, not Orbax's restore tracebacks
    assert main(["distill", *FAST, f"run_dir={run}", "train.steps=4", "student.random.hidden=48"]) == 2
    assert "config.student.random.hidden (32 -> 48)" in _error_line(capsys)

    # more steps (extending the run) and an export resume it
    assert main(["distill", *FAST, f"run_dir={run}", "train.steps=4", f"export.path={tmp_path / 'hf'}"]) == 0
    err = capsys.readouterr().err
    assert "step 4 (2 this run)" in err and "time split: rollout" in err
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "reverse_kl", "time/rollout", "time/teacher", "time/update", "tokens_per_s"} <= set(rows[-1])
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen3_vl"
    assert json.loads((run / "manifest.json").read_text())["config"]["train"]["steps"] == 4


BAD_YAML = "train:\n  steps: 3\n  log_every: [1\n"


@pytest.mark.parametrize(("args", "fragments"), [
    (["train.step=2"], ["unknown config key 'train.step'", "did you mean 'train.steps'?"]),
    (["train.stepz=2"], ["unknown config key 'train.stepz'", "did you mean 'train.steps'?"]),
    (["checkpoint.save_evry=3"], ["unknown config key 'checkpoint.save_evry'", "did you mean 'checkpoint.save_every'"]),
    (["bogus.x=1"], ["unknown config key 'bogus'"]),
    (["--stepz", "3"], ["unknown option --stepz", "did you mean --steps?"]),
    (["optimizer.learning_rate=-1e-3"], ["config key 'optimizer.learning_rate'", "must be > 0"]),
    (["train.steps=0"], ["config key 'train.steps'", "must be >= 1, got 0"]),
    # the YAML string "1e-3" is read as the float it means: the only error left is the zero steps
    (["optimizer.learning_rate=1e-3", "train.steps=0"], ["config key 'train.steps'"]),
    (["train.steps=three"], ["config key 'train.steps'", "valid integer", "'three'"]),
    (["distill.mode=forward"], ["config key 'distill.mode'", "'reverse_kl', 'gkd', 'va_opd' or 'vicur'"]),
    (["data.source=records"], ["config key 'data.path'", "needs data.path"]),
    (["method=sft"], ["config key 'method'", "sft_jsonl or sample_output"]),
])
def test_config_mistakes_exit_2_naming_the_key(args, fragments, tmp_path, capsys):
    assert main(["distill", *DEMO, f"run_dir={tmp_path / 'run'}", *args]) == 2
    err = _error_line(capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "run").exists()


def test_config_file_mistakes_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    assert main(["distill", "--config", str(bad)]) == 2
    err = _error_line(capsys)
    assert f"config file {bad} line" in err and "invalid YAML" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text(Path("configs/distill_demo.yaml").read_text().replace("  grad_accum_steps:", "  grad_acum_steps:"))
    assert main(["distill", "--config", str(typo)]) == 2
    err = _error_line(capsys)
    assert "unknown config key 'train.grad_acum_steps'" in err and str(typo) in err
    assert "did you mean 'train.grad_accum_steps'?" in err


def test_a_failed_start_leaves_the_run_directory_reusable(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["distill", *DEMO, f"run_dir={run}", f"student.path={tmp_path / 'nowhere'}", "student.random=null"]) == 2
    assert "no config.json" in _error_line(capsys)
    assert json.loads((run / "manifest.json").read_text())["committed"] is False
    # other settings on the same directory are not refused: the failed start bound nothing
    assert main(["distill", *DEMO, f"run_dir={run}", f"student.path={tmp_path / 'elsewhere'}",
                 "student.random=null", "optimizer.learning_rate=0.5"]) == 2
    err = _error_line(capsys)
    assert "elsewhere" in err and "other settings" not in err


def test_teacher_and_student_tokenizers_are_compared_by_content(tmp_path, capsys):
    """Same vocabulary size, different token -> id maps: refused before any model is loaded."""
    dirs = []
    for seed in (0, 1):
        records = make_seeds(tmp_path / f"seeds{seed}", 6, seed=seed, width=64, height=64)
        tok = make_tokenizer(records, tmp_path / f"tok{seed}", vocab_size=300)
        dirs.append(make_random_model_dir(tiny_config_for_tokenizer(tok, hidden=16, layers=1, vision_hidden=16),
                                          tok, tmp_path / f"model{seed}", seed))
    sizes = [len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]) for d in dirs]
    assert sizes[0] == sizes[1]
    args = ["distill", *DEMO, f"run_dir={tmp_path / 'run'}", f"student.path={dirs[0]}", "student.random=null",
            f"teacher.path={dirs[1]}", "teacher.random=null", "data.source=records",
            f"data.path={tmp_path / 'seeds0' / 'records.jsonl'}", f"data.tokenizer={dirs[0]}"]
    assert main(args) == 2
    err = _error_line(capsys)
    assert f"the student {dirs[0]} and teacher {dirs[1]} tokenizers differ" in err
    assert "token ids map to different tokens" in err
    assert not (tmp_path / "run").exists()
