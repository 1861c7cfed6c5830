"""The pipeline's model scorer with ``scorer.engine=continuous`` (continuous batching, one
:class:`jdelta.delta_scoring.Scorer` kept across units): the score stage writes the static
engine's entries, and a rerun may switch the engine (it is not part of the run's identity)."""

import warnings

import pytest

from jdelta.runs import read_jsonl
from jdelta.synth.pipeline import run_pipeline
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class Killed(Exception):
    pass


def stop_at_modes(stage, unit):
    if stage == "modes":  # the score stage is merged and done
        raise Killed


def test_continuous_engine_score_stage_equals_static(tmp_path, monkeypatch):
    from jdelta.completions import ContinuousSampler

    calls, results = [], ContinuousSampler.results

    def counted(self, *args, **kwargs):
        calls.append(id(self))
        return results(self, *args, **kwargs)

    monkeypatch.setattr(ContinuousSampler, "results", counted)
    seeds = make_seeds(tmp_path / "seeds", 5, seed=2, width=96, height=72)
    tok = make_tokenizer(seeds, tmp_path / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(tmp_path / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)

    def config(**engine):
        return {"seed": 1, "rounds": 1, "unit_size": 3, "source": {"kind": "records", "path": str(seeds)},
                "scorer": {"kind": "models", "teacher": str(teacher), "student": str(student),
                           "sampling": {"n": 3, "max_new_tokens": 6, "batch_size": 2, "temperature": 1.0},
                           "prompt": {"max_pixels": 64 * 64},
                           "delta": {"num_permutations": 99, "num_posterior_draws": 100}, **engine}}

    outs, engine_calls = {}, {}
    for name, engine in (("static", {}), ("cont", {"engine": "continuous", "engine_slots": 4})):
        with pytest.raises(Killed):
            run_pipeline(tmp_path / name, config(**engine), after_unit=stop_at_modes)
        outs[name] = read_jsonl(tmp_path / name / "round-00" / "score" / "out.jsonl")
        engine_calls[name], calls[:] = list(calls), []
    # continuous: 2 units x (teacher, student), through the same two engines (kept across units)
    assert not engine_calls["static"] and len(engine_calls["cont"]) == 4 and len(set(engine_calls["cont"])) == 2
    assert len(outs["static"]) == 5 and all(e["status"] == "scored" for e in outs["static"])
    assert outs["cont"] == outs["static"]  # 2 units of 3 + 2 prompts, 2 batches each: entry for entry
    # back to the static engine: the same run, not refused; resumed past the done score and modes stages
    seen = []

    def stop_at_first(stage, unit):
        seen.append(stage)
        raise Killed

    with pytest.raises(Killed):
        run_pipeline(tmp_path / "cont", config(), after_unit=stop_at_first)
    assert seen == ["synth"]


def test_engine_config_checks():
    from jdelta.config import ConfigError, build
    from jdelta.synth.pipeline_config import ScorerConfig

    with pytest.raises(ConfigError, match=r"config key 'engine': continuous runs on one device in one process; "
                                          r"use engine=static with a mesh"):
        build(ScorerConfig, {"engine": "continuous", "mesh": {"data": 2}})
    with pytest.raises(ConfigError, match=r"config key 'engine_slots': must be >= sampling.n \(4\), got 3"):
        build(ScorerConfig, {"engine": "continuous", "engine_slots": 3, "sampling": {"n": 4}})
