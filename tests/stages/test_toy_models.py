"""The trained toy world: world definition, balanced batches, deterministic training, the shipped pair."""

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jdelta.cli import main
from jdelta.config import build
from jdelta.toy.build import PairConfig, target_checks, teacher_init_dir
from jdelta.toy.evaluate import by_family
from jdelta.toy.train import BalancedRows, ModelSize, TrainSettings
from jdelta.toy.world import FamilySpec, WorldConfig, split_seed, world_records

TINY_WORLD = WorldConfig(families=(FamilySpec("trend", "line", 1, "coarse"), FamilySpec("argmax", "bar", 1, "fine", 2)))


def tiny_pair(seed: int = 0, steps: int = 3) -> PairConfig:
    size = ModelSize(hidden=16, layers=1, intermediate=32, vision_hidden=8, vision_depth=1)
    train = TrainSettings(steps=steps, batch_size=4, warmup_steps=1, pixelated_fraction=0.5)
    return PairConfig(world=TINY_WORLD, teacher=size, student=size, teacher_train=train, student_train=train,
                      train_records=8, heldout_per_family=2, vocab_size=400, seed=seed, student_families=None)


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
    """Retraining with the same seed gives the same weights, byte for byte; another seed does not;
    ``teacher_init`` continues the given teacher (its tokenizer and weights) instead of a fresh one."""
    from jdelta.errors import UserError
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    assert _stage(tmp_path / "a", tiny_pair(seed=0)) == 0
    assert _stage(tmp_path / "b", tiny_pair(seed=0)) == 0
    # seed 1, its teacher continued from a's at a vanishing learning rate (so: a's teacher again)
    slow = TrainSettings(steps=1, batch_size=4, warmup_steps=0, learning_rate=1e-12)
    cont = dataclasses.replace(tiny_pair(seed=1), teacher_init=str(tmp_path / "a" / "teacher"), teacher_train=slow)
    assert _stage(tmp_path / "c", cont) == 0
    for role in ("teacher", "student"):
        a = (tmp_path / "a" / role / "model.safetensors").read_bytes()
        assert a == (tmp_path / "b" / role / "model.safetensors").read_bytes()
        if role == "student":  # another seed (c's teacher is a's, continued: below)
            assert a != (tmp_path / "c" / role / "model.safetensors").read_bytes()
        info = json.loads((tmp_path / "a" / role / "toy.json").read_text())
        assert info["role"] == role and info["train"]["steps"] == 3 and len(info["loss_curve"]) == 3
        assert (tmp_path / "a" / role / "tokenizer.json").is_file()
        assert info["continued_from"] is None
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(metrics["teacher"]["accuracy"]) == {"trend", "argmax", "all"}
    assert metrics["teacher"]["accuracy"]["all"]["n"] == 4
    assert "targets" in metrics and "| trend (line, level 1) | coarse |" in (tmp_path / "a" / "report.md").read_text()
    params = {(d, r): {p: np.asarray(v.get_value()) for p, v in
                       nnx.to_flat_state(nnx.state(load_hf_checkpoint(tmp_path / d / r)[0], nnx.Param))}
              for d, r in (("a", "teacher"), ("c", "teacher"), ("c", "student"))}
    for path, value in params["a", "teacher"].items():
        np.testing.assert_allclose(params["c", "teacher"][path], value, atol=1e-6, err_msg=str(path))
    # (the same size, fresh from another seed: far from a's teacher)
    assert any(not np.allclose(params["c", "student"][p], v) for p, v in params["a", "teacher"].items())
    assert (tmp_path / "c" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes()
    info = json.loads((tmp_path / "c" / "teacher" / "toy.json").read_text())
    assert info["continued_from"]["path"] == str(tmp_path / "a" / "teacher")
    assert info["continued_from"]["toy"]["train"]["steps"] == 3
    bigger = dataclasses.replace(cont, teacher=ModelSize(hidden=32, layers=1, intermediate=32, vision_hidden=8))
    with pytest.raises(UserError, match=r"config key 'pair.teacher_init': .* is a teacher of size"):
        _stage(tmp_path / "e", bigger)
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
    """From a clean install: the shipped weights, evaluated here on the world's held-out split (the
    greedy accuracies the targets read: the teacher's on clean and pixelated images, the student's)."""
    from jdelta.toy import toy_info, trained_pair
    from jdelta.toy.build import load_heldout
    from jdelta.toy.evaluate import by_family, greedy_correct

    teacher, student = trained_pair()
    assert toy_info(teacher)["role"] == "teacher" and toy_info(student)["role"] == "student"
    s = load_heldout(teacher, student)
    acc = lambda model, **kw: by_family(greedy_correct(model, s.heldout, **kw), s.heldout.families, s.world.names)
    metrics = {"teacher": {"accuracy": acc(s.teacher), "pixelated_accuracy": acc(s.teacher, pixelated=True)},
               "student": {"accuracy": acc(s.student)}}
    checks = target_checks(metrics, s.world)
    assert checks["teacher_at_least_70"], checks
    assert checks["two_zero_delta"] and checks["two_delta"], checks
    assert checks["fine_hurt_more"], checks
    size = sum(p.stat().st_size for p in teacher.parent.rglob("*") if p.is_file())
    assert size < 25 * 2**20


def test_default_world_rebuilds_the_shipped_tokenizer(tmp_path):
    """``jdelta toy-models`` with the defaults starts from the shipped pair's tokenizer, byte for byte
    (a change to the corpus changes every token id and so every trained weight: the defaults
    would no longer rebuild the shipped pair)."""
    from jdelta.data.tokenizer import build_demo_tokenizer
    from jdelta.toy import trained_pair
    from jdelta.toy.world import answer_corpus

    cfg = PairConfig()
    build_demo_tokenizer(tmp_path, answer_corpus(cfg.world), vocab_size=cfg.vocab_size)
    assert (tmp_path / "tokenizer.json").read_bytes() == (trained_pair()[0] / "tokenizer.json").read_bytes()


def test_shipped_v2_pair_is_the_curriculum_of_v1():
    """The shipped v2 pair (configs/toy_v2.yaml) is found by name, continues the shipped v1 teacher
    on world v2, and its recorded held-out metrics show what it was built for: the teacher reads
    (and the hint helps it on the bar families), the student lacks argmin."""
    from jdelta.config import build, read_yaml
    from jdelta.stages.toy_models import Config
    from jdelta.toy import SHIPPED, toy_info, trained_pair

    teacher, student = trained_pair("v2")
    assert teacher.parent == SHIPPED["v2"] != SHIPPED["v1"] == trained_pair()[0].parent
    info = toy_info(teacher)
    cfg = build(Config, {**read_yaml(Path(__file__).resolve().parents[2] / "configs" / "toy_v2.yaml"), "out": "x"})
    assert info["continued_from"]["path"] == cfg.pair.teacher_init == "shipped"
    # a shipped pair's name works as pair.teacher_init too ("shipped" is v1, as v2's metrics record it)
    named = {n: teacher_init_dir(dataclasses.replace(cfg.pair, teacher_init=n))[0] for n in ("shipped", "v1", "v2")}
    assert named == {"shipped": SHIPPED["v1"] / "teacher", "v1": SHIPPED["v1"] / "teacher", "v2": teacher}
    assert info["continued_from"]["toy"]["train"] == toy_info(trained_pair()[0])["train"]
    assert info["world"]["answer_style"] == cfg.pair.world.answer_style == "placed"
    assert info["train"]["steps"] == cfg.pair.teacher_train.steps
    assert toy_info(student)["families"] == sorted(cfg.pair.student_families) and "argmin" not in toy_info(student)["families"]
    m = json.loads((SHIPPED["v2"] / "metrics.json").read_text())
    acc = lambda role, key, f: m[role][key][f]["accuracy"]  # noqa: E731
    for f in ("argmax", "argmin"):
        assert acc("teacher", "hint_accuracy", f) > acc("teacher", "accuracy", f) >= 0.7
        assert acc("teacher", "pixelated_accuracy", f) < 0.3
    assert acc("student", "accuracy", "argmin") < 0.2


def test_reasoned_completions_and_hints():
    """World v2: bar answers locate the bar then name it; every record carries the toy hint."""
    from jdelta.answers import extract_answer
    from jdelta.toy.world import reference_completion, toy_hint

    world = WorldConfig(families=(FamilySpec("argmax", "bar", 1, "fine"), FamilySpec("argmin", "bar", 1, "fine"),
                                  FamilySpec("counting", "receipt", 1, "coarse"), FamilySpec("trend", "line", 1, "coarse")),
                        answer_style="reasoned", hints="evidence")
    for r in world_records(world, "train", 16):
        comp = r.meta["completion"]
        assert extract_answer(comp) == r.answer
        data = r.meta["data"]
        if r.family in ("argmax", "argmin"):
            vals = data["values"]
            k = (np.argmax(vals) if r.family == "argmax" else np.argmin(vals)) + 1
            assert comp == f"Answer: {r.answer}\nbar {k} of {len(vals)}"
            assert reference_completion(r, "placed") == f"bar {k} of {len(vals)}\nAnswer: {r.answer}"
            assert extract_answer(reference_completion(r, "placed")) == r.answer
            assert data["labels"][k - 1] == r.answer
            assert r.cues.hint == "the bars from left to right are labelled " + ", ".join(f"'{x}'" for x in data["labels"])
        else:
            assert comp == f"Answer: {r.answer}" == reference_completion(r, "placed")
        assert r.cues.hint == toy_hint(r) and r.cues.hint
        assert reference_completion(r, "short") == r.answer
    short = world_records(WorldConfig(families=world.families), "train", 16)  # world v1: the defaults
    assert [r.meta["completion"] for r in short] == [r.answer for r in short]
    from jdelta.data.charts import GeneratorConfig, generate_record

    first = generate_record(0, split_seed(world, "train"), "argmax", config=GeneratorConfig(width=128, height=96,
                                                                                            difficulty=1), kind="bar")
    assert short[0].cues.hint == first.cues.hint  # v1 keeps the generator's hint
    with pytest.raises(ValueError, match="hints: must be 'generator' or 'evidence'"):
        WorldConfig(hints="some")
    with pytest.raises(ValueError, match="answer_style: must be 'short', 'reasoned' or 'placed'"):
        WorldConfig(answer_style="long")


def test_hinted_rows_and_student_families():
    import tempfile

    from jdelta.data.chat import HINT_PREFIX
    from jdelta.data.tokenizer import build_demo_tokenizer, load_tokenizer
    from jdelta.toy.build import encode_split, hinted_rows
    from jdelta.toy.world import answer_corpus

    cfg = dataclasses.replace(tiny_pair(), row_length=128)  # the generator's hints are long
    with tempfile.TemporaryDirectory() as d:
        build_demo_tokenizer(d, answer_corpus(cfg.world, n=20), vocab_size=400)
        tok = load_tokenizer(d)
        hint = hinted_rows(8, 0.5, seed=0)
        assert hint.any() and not hint.all() and (hint == hinted_rows(8, 0.5, seed=0)).all()
        enc = encode_split(cfg, tok, "train", 8, with_pixelated=False, hinted=hint)
        texts = [tok.decode(row[m > 0]) for row, m in zip(enc.input_ids, enc.attention_mask, strict=True)]
        assert [HINT_PREFIX.strip() in t for t in texts] == list(hint)
        assert (enc.hinted == hint).all()
        only = encode_split(cfg, tok, "train", 8, with_pixelated=False, hinted=hint, families=("argmax",))
        assert set(only.families) == {"argmax"} and len(only) == 4
        assert (only.hinted == hint[1::2]).all()  # the hint choice follows the record, not the filtered row
    with pytest.raises(ValueError, match="student_families: must name at least one of the world's families"):
        PairConfig(world=TINY_WORLD, student_families=("argmin",))


def test_greedy_tokens_equal_the_sampler(tmp_path):
    """The toy evaluation's greedy decoding (full forward per token) gives the KV-cache sampler's tokens."""
    import jax

    from jdelta.data.tokenizer import SpecialTokens, build_demo_tokenizer, load_tokenizer
    from jdelta.experiments.common import prompt_batch
    from jdelta.sampling import Sampler, SamplingParams
    from jdelta.toy.evaluate import completion_texts, greedy_correct, greedy_tokens
    from jdelta.toy.train import encode_records, init_model, model_config
    from jdelta.toy.world import answer_corpus

    build_demo_tokenizer(tmp_path, answer_corpus(TINY_WORLD, n=20), vocab_size=400)
    tok = load_tokenizer(tmp_path)
    sp = SpecialTokens.from_tokenizer(tok)
    enc = encode_records(world_records(TINY_WORLD, "heldout", 6), tok, width=128, height=96, length=96)
    model = init_model(model_config(tok, ModelSize(hidden=32, layers=2, intermediate=64, vision_hidden=16)), 3)
    ours = greedy_tokens(model, enc, batch_size=4, max_new_tokens=6)
    batch = prompt_batch(enc, np.arange(6), int(sp.pad))
    res = Sampler(model, pad_id=int(sp.pad)).generate(
        {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")},
        SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=()), rng=jax.random.key(0))
    np.testing.assert_array_equal(ours, np.asarray(res.tokens)[:, :6])
    texts = completion_texts(ours, tok)
    correct = greedy_correct(model, enc, batch_size=4, max_new_tokens=6)
    from jdelta.answers import exact_match, extract_answer

    assert list(correct) == [exact_match(extract_answer(t), a) > 0 for t, a in zip(texts, enc.answers, strict=True)]


def test_answer_mask_marks_the_final_answer(tmp_path):
    from jdelta.data.tokenizer import build_demo_tokenizer, load_tokenizer
    from jdelta.toy.train import encode_records
    from jdelta.toy.world import answer_corpus

    build_demo_tokenizer(tmp_path, answer_corpus(TINY_WORLD, n=20), vocab_size=400)
    tok = load_tokenizer(tmp_path)
    recs = world_records(TINY_WORLD, "train", 6)
    enc = encode_records(recs, tok, width=128, height=96, length=96)
    for i, r in enumerate(recs):
        ans = enc.input_ids[i][enc.answer_mask[i] > 0]
        assert tok.decode(ans).strip() == r.answer
        assert (enc.target_mask[i][enc.answer_mask[i] > 0] == 1).all()  # inside the completion
