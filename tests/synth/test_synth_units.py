"""Pure parts of jdelta.synth: writer parser, failure modes, screening, steering, the unit runner."""

from collections import Counter

import pytest

from jdelta.data.records import PromptRecord
from jdelta.synth import failure_modes as fm
from jdelta.synth.screen import balance, screen
from jdelta.synth.steered import steered_plan, steering_weights
from jdelta.synth.synthesize import allocate
from jdelta.synth.unit_runner import WaitingForShards, check_balance, run_map_stage
from jdelta.synth.writer import OracleWriter, build_instruction, parse_generation

SEED = PromptRecord(id="s1", images=[b"\x89PNG\r\n\x1a\nfake"], question="What is the value of Plum? Answer with a number.",
                    answer="12.5", answer_type="number", category="bar", family="value_lookup")


def _total(accepted, rejects):
    return len(accepted) + sum(rejects.values())


# ----------------------------------------------------------------------------- writer parser


def test_instruction_names_seed_skill_and_format():
    text = build_instruction(SEED, "student_wrong_teacher_right", 3)
    assert SEED.question in text and "value lookup" in text and "a single number" in text
    assert "Q3: <question 3>" in text and "Q4" not in text


def test_parser_accepts_well_formed_and_lenient_formats():
    gen = ("Q1: What is the value of Fig in the chart?\nA1: 7\n"
           "**Question 2:** How large is the bar labelled Kiwi\nin units?\n**Answer 2:** 3.5.\n"
           "question: Which value does Mango show?\nanswer: 1,200\n")
    acc, rej = parse_generation(gen, SEED, k=5)
    assert [a for _, a in acc] == ["7", "3.5", "1,200"]
    assert acc[1][0] == "How large is the bar labelled Kiwi in units?"  # continuation line joined
    assert sum(rej.values()) == 0


@pytest.mark.parametrize(
    ("gen", "reason", "n_ok"),
    [
        ("I cannot help with that.", "no_questions", 0),
        ("<think>Q1: What is the value of Fig?\nA1: 4 maybe", "no_questions", 0),
        ("<think>Q1: draft?</think>Q1: What is the value of Fig shown?\nA1: 4\nQ2: What is the value of Fig shown?\nA2: 4",
         "duplicate", 1),
        ("", "no_questions", 0),
        ("Q1: What is the value of Fig shown?\nA1: 4\nQ2: What is the value of Lime", "half_question", 1),
        ("Q1: What is the value of Fig shown?\nA1: 4\nQ2: What is the value of Fig shown?\nA2: 4", "duplicate", 1),
        ("Q1: What is the value of Fig shown?\nA1: 4\nQ2: what is the VALUE of fig shown\nA2: 4", "duplicate", 1),
        ("Q1: What is the value of Plum? Answer with a number.\nA1: 12.5", "copy_of_seed", 0),
        ("Q1: what is the value of plum\nA1: 12.5", "copy_of_seed", 0),
        ("Q1: What is the value of Fig shown?\nA1: about seven or so", "answer_type_mismatch", 0),
        ("Q1: What is the value of Fig shown?\nA1:", "no_answer", 0),
        ("Q1: Fig?\nA1: 4", "malformed_question", 0),
        ("Q1:\nA1: 4", "empty_question", 0),
        ("A1: 4\nQ1: What is the value of Fig shown?\nA1: 4", "orphan_answer", 1),
        ("Q1: What is the value of Fig shown?\nA1: 4\nQ2: What is the value of Lime shown?\nA2: 5", "over_limit", 1),
    ],
)
def test_parser_counts_each_malformation(gen, reason, n_ok):
    k = 1 if reason == "over_limit" else 4
    acc, rej = parse_generation(gen, SEED, k=k)
    assert len(acc) == n_ok
    assert rej[reason] >= 1, rej
    assert set(rej) <= {reason}


def test_parser_every_question_accounted_for():
    gen = "\n".join(["Q1: What is the value of Fig shown?", "A1: 4", "Q2: What is the value of Fig shown?", "A2: 4",
                     "Q3: What is the value of Lime shown?", "A3: no idea at all really, sorry about that friend",
                     "A9: stray", "Q4: What is the value of Date shown?"])
    acc, rej = parse_generation(gen, SEED, k=4)
    assert len(acc) == 1
    assert rej == Counter(duplicate=1, answer_too_long=1, orphan_answer=1, half_question=1)


def test_oracle_writer_is_deterministic_and_mixes_in_malformed_outputs():
    seeds = [PromptRecord(id=f"s{i}", images=[b"x"], question=f"What is the value of item {i}?", answer=str(i),
                          answer_type="number", family="value_lookup") for i in range(80)]
    w = OracleWriter(k=3, malformed_rate=0.5)
    a = w.write(seeds, [""] * 80, seed=7)
    assert a == w.write(seeds, [""] * 80, seed=7)
    total: Counter = Counter()
    for s, text in zip(seeds, a, strict=True):
        acc, rej = parse_generation(text, s, k=3)
        total.update(rej)
        total["ok"] += len(acc)
    for reason in ("no_questions", "half_question", "duplicate", "copy_of_seed"):
        assert total[reason] > 0, total


# ----------------------------------------------------------------------------- failure modes


def entry(i, family, t_ok, s_ok, delta, *, zero=False, student=(8,), status="scored"):
    classes = [{"label": str(j), "teacher": 8 if j == 0 else 0, "student": c, "correct": j == 0}
               for j, c in enumerate(student)]
    return {"id": f"e{i}", "status": status, "family": family, "category": "bar", "delta": {"tv": delta},
            "zero_delta": {"exact": zero}, "teacher_majority_correct": t_ok, "student_majority_correct": s_ok,
            "classes": classes}


def test_outcomes():
    assert fm.outcome_of(entry(0, "a", True, True, 0.0, zero=True)) == "zero_delta"
    assert fm.outcome_of(entry(0, "a", True, False, 0.9, student=(1, 7))) == "student_wrong_teacher_right"
    assert fm.outcome_of(entry(0, "a", False, False, 0.2)) == "both_wrong"
    assert fm.outcome_of(entry(0, "a", False, True, 0.2)) == "teacher_wrong_student_right"
    assert fm.outcome_of(entry(0, "a", True, True, 0.5, student=(4, 4))) == "student_inconsistent"
    assert fm.outcome_of(entry(0, "a", True, True, 0.1, student=(7, 1))) == "divergent"
    e = entry(0, "a", None, None, 0.5, student=(0, 8))
    assert fm.outcome_of(e) == "disagree"


def test_failure_modes_rank_by_delta_mass_and_count_skips():
    es = ([entry(i, "trend", True, False, 0.9, student=(1, 7)) for i in range(3)]
          + [entry(10 + i, "argmax", True, True, 0.1, student=(7, 1)) for i in range(20)]
          + [entry(40 + i, "sum", True, True, 0.0, zero=True) for i in range(30)]
          + [entry(99, "sum", None, None, 0.0, status="skipped")])
    a = fm.failure_modes(es)
    assert (a["modes"][0]["group"], a["modes"][0]["outcome"]) == ("trend", "student_wrong_teacher_right")
    assert a["modes"][1]["group"] == "argmax"  # 20 x 0.1 = 2.0 < 2.7
    assert a["groups"][0]["group"] == "trend"
    assert a["counts"] == {"in": 54, "out": 53, "dropped": {"skipped_by_scorer": 1}}
    check_balance(a["counts"], "modes")
    assert sum(m["prompts"] for m in a["modes"]) == 53
    assert [m["outcome"] for m in fm.target_modes(a)] == ["student_wrong_teacher_right"]
    md = fm.report_markdown(a)
    assert md.index("| 1 | trend | student_wrong_teacher_right") < md.index("| 2 | argmax")


# ----------------------------------------------------------------------------- screening


def cand(i, q, family="trend", image="A"):
    import base64

    return {"id": f"c{i}", "question": q, "family": family, "images": [{"b64": base64.b64encode(image.encode()).decode()}],
            "provenance": {"stage": "synthesis"}}


def sc_entry(i, delta, t_acc=1.0, status="scored"):
    return {"id": f"c{i}", "status": status, "delta": {"tv": delta}, "teacher_accuracy": t_acc}


def test_screen_drops_each_reason_and_counts_add_up():
    cands = [cand(0, "What is the trend of sales from Jan to Mar?"),
             cand(1, "What is the trend of sales from Jan to Mar?"),          # exact dup, lower Δ
             cand(2, "what is the trend of the sales from Jan to Mar"),      # near dup
             cand(3, "What is the trend of sales from Jan to Mar?", image="B"),  # same text, other image: kept
             cand(4, "How many bars are taller than five?"),                 # low Δ
             cand(5, "Which month has the highest rainfall?"),               # teacher unreliable
             cand(6, "Which month has the lowest rainfall?"),                # skipped by scorer
             cand(7, "Which city has the most visitors overall?", family="argmax")]
    ents = [sc_entry(0, 0.9), sc_entry(1, 0.5), sc_entry(2, 0.4), sc_entry(3, 0.3), sc_entry(4, 0.0),
            sc_entry(5, 0.8, t_acc=0.25), sc_entry(6, 0.0, status="skipped"), sc_entry(7, 0.6)]
    kept, counts = screen(cands, ents, tau=0.0, min_teacher_accuracy=0.5)
    assert [k["id"] for k in kept] == ["c0", "c3", "c7"]
    d = counts["dropped"]
    assert (d["duplicate_exact"], d["duplicate_near"], d["low_delta"], d["teacher_unreliable"], d["skipped_by_scorer"]) == (1, 1, 1, 1, 1)
    check_balance(counts, "screen")
    assert kept[0]["provenance"]["screening"]["delta"] == 0.9
    # Balance trend:argmax = 1:1 -> one trend (highest Δ) and one argmax.
    kept, counts = screen(cands, ents, shares={"trend": 1, "argmax": 1})
    assert [k["id"] for k in kept] == ["c0", "c7"] and counts["dropped"]["over_share"] == 1
    check_balance(counts, "screen")
    # A candidate duplicating an earlier round's record is dropped.
    kept, counts = screen(cands[:1], ents[:1], existing=[cands[1]])
    assert kept == [] and counts["dropped"]["duplicate_exact"] == 1


def test_balance_hits_shares():
    groups = ["a"] * 50 + ["b"] * 10 + ["c"] * 5
    keep = balance(groups, [float(i) for i in range(65)], [str(i) for i in range(65)], {"a": 0.5, "b": 0.5})
    kept = Counter(g for g, k in zip(groups, keep, strict=True) if k)
    assert kept == Counter(a=10, b=10, c=5)
    assert all(keep[40:50])  # highest scores of group a


# ----------------------------------------------------------------------------- steering and allocation


def test_allocate_proportional_with_caps():
    assert allocate(10, [3.0, 1.0], [100, 100]) == [8, 2] or allocate(10, [3.0, 1.0], [100, 100]) == [7, 3]
    assert allocate(10, [3.0, 1.0], [2, 100]) == [2, 8]
    assert sum(allocate(7, [1.0, 1.0, 1.0], [5, 5, 5])) == 7
    assert allocate(10, [1.0], [4]) == [4]
    assert allocate(5, [], []) == []


def test_steering_weights_follow_delta_mass():
    modes = [{"group": "trend", "delta_mass": 9.0, "ids": ["a", "b", "c"]},
             {"group": "argmax", "delta_mass": 1.0, "ids": ["d"]},
             {"group": "not_a_family", "delta_mass": 5.0, "ids": ["e"]}]
    st = steering_weights(modes, {"a": 3, "b": 3, "c": 1, "d": 2}, floor=0.01)
    w = st["weights"]
    assert not st["uniform"]
    assert w["trend/3"] > w["trend/1"] > w["argmax/2"] > w["sum/2"] > 0
    plan = steered_plan(2000, w, seed=3)
    assert plan == steered_plan(2000, w, seed=3)
    share = Counter(f for f, _ in plan)["trend"] / 2000
    assert share > 0.75
    assert steering_weights([], {})["uniform"]


# ----------------------------------------------------------------------------- resumable sharded map stage


def _fn(rows, u):
    out = [{"v": r * 2} for r in rows if r % 5]
    return out, {"in": len(rows), "out": len(out), "dropped": {"multiple_of_5": len(rows) - len(out)}}


def test_map_stage_resume_shard_and_merge(tmp_path):
    items = list(range(23))
    ref = run_map_stage(tmp_path / "ref", "t", items, 4, _fn)
    assert ref["counts"]["in"] == 23 and ref["counts"]["out"] == 18 and ref["counts"]["dropped"]["multiple_of_5"] == 5
    # Two processes: the first leaves units to the other and says so.
    with pytest.raises(WaitingForShards) as ei:
        run_map_stage(tmp_path / "sh", "t", items, 4, _fn, process_index=0, num_processes=2)
    assert ei.value.missing == [1, 3, 5]
    # A kill: a stray temp file and a data file whose counts file never got written.
    units = tmp_path / "sh" / "units"
    (units / ".unit-00001.jsonl.1.2.tmp").write_text("garbage")
    (units / "unit-00003.jsonl").write_text('{"v": -1}\n')
    calls = []
    done = run_map_stage(tmp_path / "sh", "t", items, 4, lambda r, u: calls.append(u) or _fn(r, u),
                         process_index=1, num_processes=2)
    assert calls == [1, 3, 5]
    assert done["counts"] == ref["counts"]
    assert (tmp_path / "sh" / "out.jsonl").read_bytes() == (tmp_path / "ref" / "out.jsonl").read_bytes()
    # Done stages are skipped.
    assert run_map_stage(tmp_path / "sh", "t", items, 4, lambda r, u: 1 / 0)["counts"] == ref["counts"]


def test_map_stage_rejects_counts_that_do_not_add_up(tmp_path):
    def bad(rows, u):
        return [], {"in": len(rows), "out": 0, "dropped": {}}
    with pytest.raises(RuntimeError, match="do not add up"):
        run_map_stage(tmp_path, "bad", [1, 2], 4, bad)
    assert not (tmp_path / "DONE.json").exists()
