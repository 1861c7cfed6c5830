"""The pipeline's typed config and run directory: config errors from the CLI (exit 2, one line
naming the key), choices that match the library's tables, and the locks (one process alone, or
several sharing the directory by process index)."""

import dataclasses
import json
import subprocess
import sys
import time
import typing

import pytest

from jdelta.cli import main as cli_main
from jdelta.config import build, load
from jdelta.errors import RunDirError
from jdelta.runs import RunDir
from jdelta.synth.pipeline_config import PipelineConfig, ScorerConfig, SourceConfig, SynthesisRunConfig
from jdelta.synth.unit_runner import open_run_dir

SYNTH_ARGS = ["--scores", "nowhere/scores.jsonl"]


def _error_line(capsys, argv):
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("stage", ["pipeline", "synthesize"])
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("scorer.temprature=0.5", ["unknown config key 'scorer.temprature'", "did you mean 'scorer.sampling.temperature'?"]),
        ("scorer.sampling.temprature=0.5", ["did you mean 'scorer.sampling.temperature'?"]),
        ("failure_modes.grop_by=family", ["unknown config key 'failure_modes.grop_by'", "did you mean 'failure_modes.group_by'?"]),
        ("synthesis.bogus=1", ["unknown config key 'synthesis.bogus'", "known keys of synthesis: writer, steered"]),
        ("scorer.sampling.n=many", ["config key 'scorer.sampling.n'", "valid integer", "'many'"]),
        ("unit_size=[1]", ["config key 'unit_size'", "valid integer"]),
        ("synthesis.writer.kind=poet", ["config key 'synthesis.writer.kind'", "'oracle' or 'teacher'"]),
        ("scorer.delta.metric=l2", ["config key 'scorer.delta.metric'", "'tv'"]),
        ("unit_size=0", ["config key 'unit_size': must be >= 1, got 0"]),
        ("scorer.fail_rate=1.5", ["config key 'scorer.fail_rate': must be in [0, 1], got 1.5"]),
        ("scorer.kind=models", ["config key 'scorer.teacher': needs a checkpoint directory"]),
        ("synthesis.writer.kind=teacher", ["config key 'synthesis': writer.kind=teacher needs scorer.kind=models"]),
    ],
)
def test_config_errors_exit_2_with_one_line_naming_the_key(stage, override, fragments, capsys, tmp_path):
    out = tmp_path / "run"
    line = _error_line(capsys, [stage, "--out", str(out), *(SYNTH_ARGS if stage == "synthesize" else []), override])
    assert line.startswith(f"jdelta {stage}: error: "), line
    for f in fragments:
        assert f in line, (f, line)
    assert not out.exists()  # nothing is created before the config is valid


def test_pipeline_only_sections_are_unknown_to_synthesize(capsys, tmp_path):
    line = _error_line(capsys, ["synthesize", "--out", str(tmp_path / "o"), *SYNTH_ARGS, "screen.tau=0.1"])
    assert "unknown config key 'screen'" in line


def test_config_file_errors_name_the_file_and_key(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("seed: 1\nsource:\n  kind: procedural\n  n: 10\n  widht: 64\n")
    line = _error_line(capsys, ["pipeline", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert "'source.widht'" in line and str(cfg) in line and "did you mean 'source.width'?" in line
    line = _error_line(capsys, ["pipeline", "--out", str(tmp_path / "o"), "source.families=[trend,pies]"])
    assert "config key 'source.families': unknown ['pies']" in line
    line = _error_line(capsys, ["pipeline", "--out", str(tmp_path / "o"), "source.kind=records"])
    assert "config key 'source.path': is required for kind=records" in line
    line = _error_line(capsys, ["pipeline", "--out", str(tmp_path / "o"), "source.kind=records",
                                f"source.path={tmp_path / 'missing.jsonl'}"])
    assert "source.path" in line and "missing.jsonl does not exist" in line
    line = _error_line(capsys, ["pipeline", "--out", str(tmp_path / "o"), "--num-processes", "2", "--overwrite"])
    assert "config key 'overwrite': needs num_processes=1" in line
    line = _error_line(capsys, ["pipeline", "--out", str(tmp_path / "o"), "--num-processes", "2", "--process-index", "2"])
    assert "config key 'process_index': must be in [0, 2), got 2" in line


def test_demo_config_and_defaults_load():
    from jdelta.stages.pipeline import Config

    cfg = load(Config, "configs/pipeline_demo.yaml", ["out=x"])
    assert cfg.rounds == 2 and cfg.scorer.sampling.n == 8 and cfg.scorer.delta.num_permutations == 99
    assert cfg.synthesis.writer.seeds == 64 and cfg.output.format == "jsonl"
    # Every default lives on the dataclass fields: an empty mapping is the default config.
    assert build(PipelineConfig, {}) == PipelineConfig()
    # A path string for a model sets its path (ModelSpec shorthand); the scorer's delta tests are
    # screening-sized unless set, also when the section is given in part.
    sc = build(ScorerConfig, {"kind": "models", "teacher": "/t", "student": "/s", "delta": {"level": 0.1}})
    assert sc.teacher.path == "/t" and sc.delta.num_permutations == 99 and sc.delta.level == 0.1
    # The pipeline config is the synthesis run config plus its own sections.
    extra = {f.name for f in dataclasses.fields(PipelineConfig)} - {f.name for f in dataclasses.fields(SynthesisRunConfig)}
    assert extra == {"rounds", "source", "screen", "output"}


def test_choices_match_the_library_tables():
    from jdelta.data.records import LAYOUTS
    from jdelta.synth.failure_modes import OUTCOMES
    from jdelta.synth.pipeline_config import GroupBy, Layout, Outcome, ZeroDeltaTest

    assert set(typing.get_args(Layout)) == set(LAYOUTS)
    assert set(typing.get_args(Outcome)) == set(OUTCOMES)
    assert set(typing.get_args(ZeroDeltaTest)) == {"exact", "permutation", "posterior"}
    assert set(typing.get_args(GroupBy)) == {"family", "category", "answer_type"}
    assert SourceConfig().kind == "procedural"


# ----------------------------------------------------------------------------- locks


def test_second_process_on_a_live_pipeline_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = {"seed": 1, "unit_size": 8, "source": {"n": 16, "width": 64, "height": 48},
           "synthesis": {"writer": {"seeds": 4}, "steered": {"n": 2, "width": 64, "height": 48}}}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg))
    # A real pipeline process that stops (alive, lock held) after its first unit.
    code = ("import sys, time\nfrom jdelta.config import load\nfrom jdelta.synth.pipeline import Pipeline, PipelineConfig\n"
            "Pipeline(sys.argv[2], load(PipelineConfig, sys.argv[1]), after_unit=lambda s, u: time.sleep(600)).run()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_file), str(run)], stderr=subprocess.PIPE)
    try:
        marker = run / "round-00" / "seeds" / "units" / "unit-00000.counts.json"
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        base = ["pipeline", "--config", str(cfg_file), "--out", str(run), "--no-progress"]
        line = _error_line(capsys, base)
        assert f"{run} is in use by another jdelta process (pid {proc.pid})" in line, line
        # A sharded process is refused too (it would share the directory with a lone writer).
        line = _error_line(capsys, [*base, "--num-processes", "2", "--process-index", "1"])
        assert "in use by a single-process jdelta run" in line, line
        assert not (run / "round-00" / "seeds" / "units" / "unit-00001.counts.json").exists()
    finally:
        proc.kill()
        proc.wait()
    # The holder died: the lock went with it, and the same command resumes to the end.
    assert cli_main(["pipeline", "--config", str(cfg_file), "--out", str(run), "--no-progress"]) == 0


def test_sharded_processes_lock_by_index(tmp_path):
    config = {"seed": 1}
    a = RunDir(tmp_path, "pipeline", config=config, process_index=0, num_processes=2)
    with a:
        with pytest.raises(RunDirError, match="in use by another jdelta process with process_index=0"):
            RunDir(tmp_path, "pipeline", config=config, process_index=0, num_processes=2).open()
        with RunDir(tmp_path, "pipeline", config=config, process_index=1, num_processes=2) as b:
            b.commit()
        assert not a.manifest["committed"]
        a.update(stages={})
        assert a.manifest["committed"]  # a sibling committed: never unbound again
        with pytest.raises(RunDirError, match="in use by a single-process|in use by another jdelta process"):
            RunDir(tmp_path, "pipeline", config=config).open()
        with pytest.raises(RunDirError, match=r"config\.seed \(1 -> 2\)"):
            RunDir(tmp_path, "pipeline", config={"seed": 2}, process_index=1, num_processes=2).open()
    with pytest.raises(RunDirError, match="overwrite needs num_processes=1"):
        open_run_dir(tmp_path, "pipeline", config=config, inputs={}, overwrite=True, num_processes=2)
    # Alone again: a single process resumes the committed run.
    with RunDir(tmp_path, "pipeline", config=config) as run:
        assert run.resumed
