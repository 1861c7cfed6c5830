"""The pipeline with the real scorer and the real teacher-as-writer on a tiny random Qwen3-VL pair:
same stages as the oracle tests, models through ``jdelta.delta_scoring.score_prompts`` and the sampler.
Random models write gibberish, so the parser must reject it with counted reasons."""

import pytest

from jdelta.runs import read_json, read_jsonl
from jdelta.synth.pipeline import run_pipeline
from jdelta.synth.unit_runner import check_balance
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

SCORING = {"sampling": {"n": 2, "max_new_tokens": 4, "batch_size": 4}, "prompt": {"max_pixels": 64 * 64},
           "delta": {"num_permutations": 99, "num_posterior_draws": 100}}


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_models")
    seeds = make_seeds(root / "seeds", 6, seed=2, width=96, height=72)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(root / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    return root, seeds, teacher, student


def _config(seeds, teacher, student):
    return {
        "seed": 1,
        "rounds": 1,
        "unit_size": 4,
        "source": {"kind": "records", "path": str(seeds)},
        "scorer": {"kind": "models", "teacher": str(teacher), "student": str(student), **SCORING},
        "failure_modes": {"targets": ["student_wrong_teacher_right", "student_inconsistent", "both_wrong", "disagree",
                                      "divergent", "teacher_wrong_student_right"]},
        "synthesis": {"writer": {"kind": "teacher", "seeds": 3, "k": 2, "max_new_tokens": 12},
                      "steered": {"n": 2, "width": 96, "height": 72}},
        "screen": {"tau": -1.0, "min_teacher_accuracy": None},
    }


def test_model_pair_pipeline_counts_identities_and_resume(pair, tmp_path):
    import shutil

    from jdelta.errors import UserError

    root, seeds, teacher_good, student = pair
    teacher = shutil.copytree(teacher_good, tmp_path / "teacher")
    cfg = _config(seeds, teacher, student)
    # A failed start (the teacher's weights are half-written) binds nothing: once the file is
    # fixed, the identical run proceeds instead of being refused as "another teacher".
    weights = sorted(teacher.glob("*.safetensors"))[0]
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="teacher"):
        run_pipeline(tmp_path / "a", cfg)
    assert read_json(tmp_path / "a" / "manifest.json")["committed"] is False
    assert not (tmp_path / "a" / "round-00").exists()
    weights.write_bytes(good)

    def kill_after_synth(stage, unit):
        if stage == "synth":
            raise Killed

    with pytest.raises(Killed):
        run_pipeline(tmp_path / "a", cfg, after_unit=kill_after_synth)
    m = run_pipeline(tmp_path / "a", cfg)
    st = m["stages"]
    for name, c in st.items():
        check_balance(c, name)
    assert st["round-00/score"]["in"] == 6 and st["round-00/score"]["scored"] == 6
    gens = st["round-00/synth"]["writer_generations"]
    assert gens == st["round-00/modes"]["writer_jobs"] > 0
    # Every writer generation ends as accepted questions or counted rejections.
    assert st["round-00/synth"]["in"] >= gens
    assert st["round-00/synth"]["steered_records"] == 2
    assert st["round-00/screen_score"]["in"] == st["round-00/synth"]["out"]
    # Model identities travel to the manifests.
    out_m = read_json(tmp_path / "a" / "output" / "manifest.json")
    assert out_m["scorer"]["teacher"]["weights_fingerprint"] and out_m["scorer"]["student"]["config_sha256"]
    assert out_m["writer"]["kind"] == "teacher"
    assert m["inputs"]["teacher"] == out_m["scorer"]["teacher"] and m["committed"] and m["complete"]
    entries = read_jsonl(tmp_path / "a" / "round-00" / "score" / "out.jsonl")
    assert {"delta", "classes", "zero_delta", "teacher_accuracy"} <= set(entries[0])
    # tau = -1 keeps every scored candidate: the output holds seeds + all screened candidates.
    assert st["round-00/screen"]["out"] == st["round-00/screen"]["in"] - sum(st["round-00/screen"]["dropped"].values())
    recs = read_jsonl(tmp_path / "a" / "output" / "records.jsonl")
    assert len(recs) == st["output"]["out"] and all("screening" in r["provenance"] for r in recs)


def test_synthesize_from_a_score_run_with_the_teacher_writer(pair, tmp_path):
    from jdelta.config import build
    from jdelta.stages.score import Config as ScoreConfig
    from jdelta.stages.score import run_score
    from jdelta.synth.synthesize import SynthesizeFromScores

    root, seeds, teacher, student = pair
    cfg = _config(seeds, teacher, student)
    run_score(build(ScoreConfig, {"teacher": str(teacher), "student": str(student), "prompts": str(seeds),
                                  "out": str(tmp_path / "score"), "shard_size": 4, "progress": False, **SCORING}))
    synth_cfg = {k: cfg[k] for k in ("seed", "unit_size", "scorer", "failure_modes", "synthesis")}
    m = SynthesizeFromScores(tmp_path / "syn", synth_cfg, scores=tmp_path / "score").run()
    st = m["stages"]
    assert st["seeds"]["out"] == 6 and st["score"]["out"] == 6
    assert st["synth"]["writer_generations"] == st["modes"]["writer_jobs"] > 0
    cands = read_jsonl(tmp_path / "syn" / "candidates.jsonl")
    assert len(cands) == st["synth"]["out"]
    for name, c in st.items():
        check_balance(c, name)
