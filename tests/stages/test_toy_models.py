"""The trained toy world: world definition, balanced batches, deterministic training, the shipped pair."""

import json
from collections import Counter

import numpy as np
import pytest

from jdelta.cli import main
from jdelta.config import build
from jdelta.toy.build import PairConfig, target_checks
from jdelta.toy.evaluate import by_family
from jdelta.toy.train import BalancedRows, ModelSize, TrainSettings
from jdelta.toy.world import FamilySpec, WorldConfig, split_seed, world_records

TINY_WORLD = WorldConfig(families=(FamilySpec("trend", "line", 1, "coarse"), FamilySpec("argmax", "bar", 1, "fine", 2)))


def tiny_pair(seed: int = 0, steps: int = 3) -> PairConfig:
    size = ModelSize(hidden=16, layers=1, intermediate=32, vision_hidden=8, vision_depth=1)
    train = TrainSettings(steps=steps, batch_size=4, warmup_steps=1, pixelated_fraction=0.5)
    return PairConfig(world=TINY_WORLD, teacher=size, student=size, teacher_train=train, student_train=train,
                      train_records=8, heldout_per_family=2, vocab_size=400, seed=seed)


def test_world_records_are_deterministic_disjoint_and_in_turn():
    a = world_records(TINY_WORLD, "train", 6)
    assert [r.family for r in a] == ["trend", "argmax"] * 3
    assert [r.category for r in a] == ["line", "bar"] * 3
    again = world_records(TINY_WORLD, "train", 2, start=4)
    assert [r.id for r in again] == [r.id for r in a[4:]] and again[0].images == a[4].images
    held = world_records(TINY_WORLD, "heldout", 6)
    assert not {r.id for r in a} & {r.id for r in held}
    assert len({split_seed(TINY_WORLD, s) for s in ("train", "heldout", "seeds", "distill")}) == 4
    with pytest.raises(ValueError, match="unknown split 'test'"):
        split_seed(TINY_WORLD, "test")


def test_world_config_errors_name_the_key():
    with pytest.raises(ValueError, match="kind: family 'trend' cannot be asked of 'bar'"):
        FamilySpec("trend", "bar")
    with pytest.raises(ValueError, match="width: must be a multiple of 32"):
        WorldConfig(width=100)
    with pytest.raises(ValueError, match="families: each family may appear once"):
        WorldConfig(families=(FamilySpec("trend", "line"), FamilySpec("trend", "line")))
    w = build(WorldConfig, {"families": [{"family": "counting", "kind": "receipt", "detail": "coarse"}], "width": 96})
    assert w.families[0].kind == "receipt" and w.pixels == 96 * 96


def test_balanced_rows_cycle_families_and_answers():
    families = ["a"] * 6 + ["b"] * 6
    answers = ["x", "x", "x", "x", "y", "y"] + ["p", "q", "r", "p", "q", "r"]
    sampler = BalancedRows(families, answers, np.random.default_rng(0), weights={"a": 1, "b": 2})
    rows = np.concatenate([sampler.take(6) for _ in range(4)])
    fam = Counter(families[i] for i in rows)
    assert fam == {"a": 8, "b": 16}  # weights 1:2
    ans_a = Counter(answers[i] for i in rows if families[i] == "a")
    assert ans_a == {"x": 4, "y": 4}  # answers in turn, whatever their frequency in the data
    ans_b = Counter(answers[i] for i in rows if families[i] == "b")
    assert set(ans_b) == {"p", "q", "r"} and sorted(ans_b.values()) == [5, 5, 6]  # 16 rows, 3 answers in turn
    # every row of a (family, answer) group is used before any is used again
    assert len({int(i) for i in rows if answers[i] == "x"}) == 4


def test_by_family_intervals():
    acc = by_family(np.array([1, 1, 0, 1, 0, 0], bool), ["a", "a", "a", "b", "b", "b"], ["a", "b"])
    assert acc["a"]["correct"] == 2 and acc["a"]["n"] == 3 and acc["a"]["accuracy"] == pytest.approx(2 / 3)
    assert acc["all"]["accuracy"] == 0.5 and 0 < acc["all"]["ci_low"] < 0.5 < acc["all"]["ci_high"] < 1


def _stage(out, pair: PairConfig) -> int:
    from jdelta.stages.toy_models import Config, run

    return run(Config(out=str(out), pair=pair, progress=False))


def test_toy_models_stage_is_deterministic(tmp_path):
    """Retraining with the same seed gives the same weights, byte for byte; another seed does not."""
    assert _stage(tmp_path / "a", tiny_pair(seed=0)) == 0
    assert _stage(tmp_path / "b", tiny_pair(seed=0)) == 0
    assert _stage(tmp_path / "c", tiny_pair(seed=1)) == 0
    for role in ("teacher", "student"):
        a = (tmp_path / "a" / role / "model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / role / "model.safetensors").read_bytes()
        assert a != (tmp_path / "c" / role / "model.safetensors").read_bytes()
        info = json.loads((tmp_path / "a" / role / "toy.json").read_text())
        assert info["role"] == role and info["train"]["steps"] == 3 and len(info["loss_curve"]) == 3
        assert (tmp_path / "a" / role / "tokenizer.json").is_file()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(metrics["teacher"]["accuracy"]) == {"trend", "argmax", "all"}
    assert metrics["teacher"]["accuracy"]["all"]["n"] == 4
    assert "targets" in metrics and "| trend (line, level 1) | coarse |" in (tmp_path / "a" / "report.md").read_text()
    # a rerun keeps the trained models; other settings are refused naming the key
    mtime = (tmp_path / "a" / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert _stage(tmp_path / "a", tiny_pair(seed=0)) == 0
    assert (tmp_path / "a" / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(Exception, match="pair.seed"):
        _stage(tmp_path / "a", tiny_pair(seed=2))


def test_toy_models_cli_errors(capsys):
    assert main(["toy-models", "--out", "x", "pair.teacher_train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "config key 'pair.teacher_train.steps': must be >= 1, got 0" in err
    assert main(["toy-models", "--out", "x", "pair.student_train.seed=3"]) == 2
    assert "config key 'pair.student_train': seed is set by pair.seed" in capsys.readouterr().err


def test_shipped_pair_meets_the_world_targets():
    """From a clean install: the shipped weights, evaluated here on the world's held-out split."""
    from jdelta.toy import toy_info, trained_pair
    from jdelta.toy.build import evaluate_dirs

    teacher, student = trained_pair()
    assert toy_info(teacher)["role"] == "teacher" and toy_info(student)["role"] == "student"
    metrics, world = evaluate_dirs(teacher, student)
    checks = target_checks(metrics, world)
    assert checks["teacher_at_least_70"], checks
    assert checks["two_zero_delta"] and checks["two_delta"], checks
    assert checks["fine_hurt_more"], checks
    size = sum(p.stat().st_size for p in teacher.parent.rglob("*") if p.is_file())
    assert size < 25 * 2**20
