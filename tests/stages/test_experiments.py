"""``jdelta experiment NAME``: the runner (aggregation, intervals, resume), settings validation, and smoke
runs of the zero_delta and va_opd experiments on the shipped trained toy pair."""

import dataclasses
import json
import math
import sys
import types

import pytest

from jdelta.cli import main
from jdelta.config import ConfigError, read_yaml
from jdelta.experiments import EXPERIMENTS, runner
from jdelta.experiments.common import SeedResult

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


# ----------------------------------------------------------------------------- a fake experiment


@dataclasses.dataclass(frozen=True)
class FakeSettings:
    scale: float = 1.0
    steps: int = 2


FAKE_VALUES = {0: 1.0, 1: 2.0, 2: 4.0}


def make_fake(calls: list):
    mod = types.ModuleType("fake_experiment")
    mod.Settings = FakeSettings
    mod.SMOKE = {"steps": 1}
    mod.CONDITIONS = ("a", "b")

    def describe(s):
        return f"A fake experiment (scale {s.scale}, steps {s.steps})."

    def run_seed(s, seed, workdir, log):
        calls.append(seed)
        v = FAKE_VALUES[seed] * s.scale
        return SeedResult(metrics={"a": {"acc": v, "only_a": 1.0}, "b": {"acc": 10 * v}},
                          curves={"acc": {"a": [(0, 0.0), (s.steps, v)], "b": [(0, 0.0), (s.steps, 2 * v)]}},
                          notes={"seed": seed})

    mod.describe, mod.run_seed = describe, run_seed
    return mod


@pytest.fixture
def fake(monkeypatch):
    calls: list[int] = []
    monkeypatch.setitem(sys.modules, "fake_experiment", make_fake(calls))
    monkeypatch.setitem(EXPERIMENTS, "fake", "fake_experiment")
    return calls


def test_t_interval_by_hand():
    mean, lo, hi, n = runner.t_interval([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = T_975_2 * sd / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(7 / 3)
    assert (lo, hi) == (pytest.approx(7 / 3 - half), pytest.approx(7 / 3 + half))
    # NaN seeds are left out; one value has no interval; none has no mean
    assert runner.t_interval([2.0, float("nan"), 4.0])[3] == 2
    m1 = runner.t_interval([5.0])
    assert m1[0] == 5.0 and math.isnan(m1[1]) and math.isnan(m1[2]) and m1[3] == 1
    assert math.isnan(runner.t_interval([])[0])


def test_runner_aggregates_writes_and_resumes(tmp_path, fake):
    out = tmp_path / "run"
    summary = runner.run_experiment("fake", out, seeds=3, settings=FakeSettings(), log=lambda m: None)
    assert fake == [0, 1, 2]
    for s in range(3):
        saved = json.loads((out / f"seed-{s}" / "result.json").read_text())
        assert saved["seed"] == s and saved["wall_s"] >= 0 and saved["cpu_s"] >= 0 and len(saved["loadavg_start"]) == 3
    sd = math.sqrt(7 / 3)
    half = T_975_2 * sd / math.sqrt(3)
    acc_a = summary["metrics"]["a"]["acc"]
    assert acc_a["values"] == [1.0, 2.0, 4.0] and acc_a["n"] == 3
    assert (acc_a["mean"], acc_a["lo"], acc_a["hi"]) == (pytest.approx(7 / 3), pytest.approx(7 / 3 - half),
                                                          pytest.approx(7 / 3 + half))
    acc_b = summary["metrics"]["b"]["acc"]
    assert acc_b["mean"] == pytest.approx(70 / 3) and acc_b["hi"] == pytest.approx(10 * (7 / 3 + half))
    assert summary["metrics"]["a"]["only_a"]["lo"] == pytest.approx(1.0)  # zero spread: a zero-width interval
    curve = summary["curves"]["acc"]["b"]
    assert curve["steps"] == [0, 2] and curve["mean"] == [pytest.approx(0.0), pytest.approx(14 / 3)]
    # paired differences: b - a per seed = 9 v
    d = runner.paired_difference(summary, "acc", "b", "a")
    assert d[0] == pytest.approx(9 * 7 / 3) and d[2] == pytest.approx(9 * (7 / 3 + half))

    md = (out / "results.md").read_text()
    assert "A fake experiment (scale 1.0, steps 2)." in md
    assert f"| acc | {runner.fmt_interval(7 / 3, 7 / 3 - half, 7 / 3 + half)} |" in md
    assert "| only_a | 1.00 [1.00, 1.00] | — |" in md
    assert "| acc | b | 10.0 | 20.0 | 40.0 |" in md and "![acc](acc.png)" in md
    assert (out / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"]["b"]["acc"]["values"] == [10.0, 20.0, 40.0]
    assert json.loads((out / "manifest.json").read_text())["complete"]

    # A rerun skips finished seeds; more seeds adds only the new one; a lost seed is redone.
    runner.run_experiment("fake", out, seeds=3, settings=FakeSettings(), log=lambda m: None)
    assert fake == [0, 1, 2]
    (out / "seed-1" / "result.json").unlink()
    FAKE_VALUES[3] = 8.0
    try:
        summary = runner.run_experiment("fake", out, seeds=4, settings=FakeSettings(), log=lambda m: None)
    finally:
        del FAKE_VALUES[3]
    assert fake == [0, 1, 2, 1, 3] and summary["metrics"]["a"]["acc"]["values"] == [1.0, 2.0, 4.0, 8.0]
    # ... and other settings in the same directory are refused, naming the key
    with pytest.raises(Exception, match="settings.scale"):
        runner.run_experiment("fake", out, seeds=1, settings=FakeSettings(scale=2.0), log=lambda m: None)


def test_settings_resolution(fake):
    assert runner.resolve_settings("fake") == FakeSettings()
    assert runner.resolve_settings("fake", smoke=True) == FakeSettings(steps=1)
    assert runner.resolve_settings("fake", {"steps": 5}, smoke=True) == FakeSettings(steps=5)
    with pytest.raises(ConfigError, match="experiment fake settings: .*stepz.*steps"):
        runner.resolve_settings("fake", {"stepz": 5})
    with pytest.raises(Exception, match="unknown experiment 'nope'; known: .*zero_delta"):
        runner.experiment_module("nope")


@pytest.mark.parametrize("name", ["zero_delta", "va_opd"])
def test_shipped_configs_are_the_default_size(name):
    """configs/experiments/NAME.yaml states the default size: the Settings defaults, every key."""
    module = runner.experiment_module(name)
    cfg = read_yaml(runner.default_settings_file(name))
    assert cfg["name"] == name
    defaults = dataclasses.asdict(module.Settings())
    assert cfg["settings"] == {k: v for k, v in defaults.items() if k in cfg["settings"]}
    assert set(defaults) - set(cfg["settings"]) <= {"pair"}
    assert set(module.SMOKE) <= set(defaults) and module.CONDITIONS


def test_cli_refuses_bad_settings_and_names(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["experiment", "zero_delta", "--out", out, "settings.poool=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdelta experiment: error: experiment zero_delta settings:")
    assert "poool" in err[0] and "pool" in err[0]
    assert main(["experiment", "zero_delta", "--out", out, "settings.steps=0"]) == 2
    assert "config key 'steps': must be >= 1, got 0" in capsys.readouterr().err
    assert main(["experiment", "nope", "--out", out]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["experiment", "zero_delta", "--out", out, "--seeds", "0"]) == 2
    assert "'seeds': must be >= 1" in capsys.readouterr().err


def _smoke(tmp_path, capsys, name: str) -> dict:
    out = tmp_path / name
    assert main(["experiment", name, "--seeds", "2", "--out", str(out), "--smoke"]) == 0
    assert f"{out}/results.md (2 seeds)" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["settings"]["steps"] == runner.experiment_module(name).SMOKE["steps"]
    md = (out / "results.md").read_text()
    assert f"# Experiment `{name}`" in md and "## Every seed" in md and "## Time" in md
    return summary


def test_zero_delta_smoke(tmp_path, capsys):
    s = _smoke(tmp_path, capsys, "zero_delta")
    m = s["metrics"]
    pool = m["pool"]
    assert all(0 <= v <= 100 for v in pool["zero_share/all"]["values"])
    # the per-family shares average (families in turn, equal counts) to the overall share
    for i in range(2):
        fam = [pool[f"zero_share/{f}"]["values"][i] for f in ("trend", "counting", "argmax", "argmin")]
        assert sum(fam) / 4 == pytest.approx(pool["zero_share/all"]["values"][i])
    for c in ("student_before", "teacher"):
        assert 0 <= m[c]["accuracy/all"]["mean"] <= 100
    ran = [c for c in ("delta_pos", "delta_zero", "random") if m.get(c, {}).get("accuracy/all", {}).get("n") == 2]
    assert ran, "no distillation condition ran on both seeds"
    for c in ran:  # the curves start at step 0 with the student before distillation
        cur = s["curves"]["accuracy/all"][c]
        assert cur["steps"] == [0, 1, 2]
        assert cur["mean"][0] == pytest.approx(m["student_before"]["accuracy/all"]["mean"])
    sizes = [n["set_sizes"] for n in s["notes"].values()]  # Δ > 0 and Δ = 0 split the pool; random as Δ > 0
    assert all(z["delta_pos"] + z["delta_zero"] == 8 and z["random"] == z["delta_pos"] for z in sizes)
    assert "delta_pos − random" in (tmp_path / "zero_delta" / "results.md").read_text()


def test_va_opd_smoke(tmp_path, capsys):
    s = _smoke(tmp_path, capsys, "va_opd")
    m = s["metrics"]
    for c in ("opd", "va_opd"):
        assert 0 <= m[c]["accuracy/fine"]["mean"] <= 100 and math.isfinite(m[c]["reliance/fine"]["mean"])
        cur = s["curves"]["reliance/fine"][c]
        assert cur["steps"] == [0, 1, 2]
        assert cur["mean"][0] == pytest.approx(m["student_before"]["reliance/fine"]["mean"], abs=1e-5)
    # OPD reaches its own final fine accuracy by its last step at the latest
    assert all(v <= 2 for v in m["opd"]["steps_to_opd_final"]["values"])
    assert (tmp_path / "va_opd" / "reliance_fine.png").is_file()


def test_paired_table_rows_columns_and_missing_cells():
    from jdelta.experiments.runner import paired_table

    agg = {"metrics": {"a": {"accuracy/all": {"values": [3.0, 5.0]}}, "b": {"accuracy/all": {"values": [1.0, 1.0]}}}}
    md = paired_table(agg, (("a", "b"), ("b", "a")), ("accuracy/all", "accuracy/trend"), title="T")
    lines = md.splitlines()
    assert lines[0] == "### T (per seed, then mean [95% t-interval])"
    assert lines[2] == "| metric | a − b | b − a |" and lines[3] == "|---|---|---|"
    # per-seed differences a - b = (2, 4): mean 3, t(0.975, 1) = 12.706, se = 1
    assert lines[4] == "| accuracy/all | 3.00 [-9.71, 15.7] | -3.00 [-15.7, 9.71] |"
    assert lines[5] == "| accuracy/trend | n/a | n/a |"
