"""``jdelta write-hints``: the hint parser and answer-leak check, counts that add up by reason, resume
after a kill (identical output), and config errors naming the key. Tiny random writer model."""

import dataclasses
import json

import pytest

from jdelta.cli import main
from jdelta.config import build
from jdelta.data.charts import generate_records
from jdelta.data.records import Cues, PromptRecord, read_records_jsonl, write_jsonl
from jdelta.errors import RunDirError
from jdelta.hints import (
    DEFAULT_INSTRUCTION,
    Generation,
    HintChecks,
    build_instruction,
    check_hint,
    find_leak,
    number_mentions,
    parse_hint,
)
from jdelta.stages.write_hints import Config, run_write_hints
from jdelta.testing import make_random_model_dir, make_seeds, make_tokenizer, tiny_config_for_tokenizer

# ----------------------------------------------------------------------------- the checker


@pytest.mark.parametrize("hint", ["the bar for 2019 reaches about 1200", "it reads 1,200 units", "roughly 1.2K",
                                  "a value of 1.2 thousand", "$1,200.00 in total"])
def test_number_answer_leaks_by_value(hint):
    assert find_leak(hint, ["1,200"], "number") == "1,200"


@pytest.mark.parametrize("hint", ["the bars read 120 and 12,000", "the bar for 1201 is blue", "v1200 is the label",
                                  "the 1200th row"])
def test_other_numbers_do_not_leak(hint):
    assert find_leak(hint, ["1,200"], "number") is None


def test_number_words_and_percent():
    assert find_leak("there are twenty-one dots", ["21"], "number") == "21"
    assert find_leak("one hundred and five people", ["105"], "number") == "105"
    assert find_leak("the slice is 45% of the pie", ["45"], "number") == "45"
    assert find_leak("two and three are marked", ["5"], "number") is None  # two numbers, not 5
    assert sorted(number_mentions("1.2 million, twenty one, 3/4")) == [0.75, 21.0, 1.2e6]


def test_text_answers_whole_word_normalised():
    assert find_leak("The lowest bar is labelled 'Plum'.", ["plum"], "text") == "plum"
    assert find_leak("the city of NEW YORK is marked", ["New-York"], "text") == "New-York"
    assert find_leak("a plumage diagram", ["plum"], "text") is None  # not a whole word
    assert find_leak("the lowest bar is Grape", ["Plum"], "text") is None


def test_any_accepted_answer_leaks():
    answers = ["10 km", "ten kilometres", "10 kilometers"]
    assert find_leak("the road sign reads ten kilometres", answers, "text") == "ten kilometres"
    record = PromptRecord(id="r", images=[], question="Which fruit?", answer="Lemon",
                          meta={"answers": ["Lemon", "lime"]})
    verdict = check_hint("Hint: the smallest bar is the Lime one", record)
    assert (verdict.hint, verdict.reason, verdict.leaked) == (None, "answer_leak", "lime")


def test_yes_no_and_choice_leaks():
    assert find_leak("No, the red bar is shorter.", ["no"], "yes_no") == "no"
    assert find_leak("the answer is yes because the lines cross", ["yes"], "yes_no") == "yes"
    assert find_leak("There is no legend; the red bar reaches 30.", ["no"], "yes_no") is None
    assert find_leak("Option (B) marks the larva", ["B"], "choice") == "B"
    assert find_leak("point B is the midpoint of AC", ["B"], "choice") is None  # a label, not the answer
    assert find_leak("the stage drawn as a worm is the larva", ["B"], "choice", option_texts=["larva"]) == "larva"


def test_parse_hint():
    assert parse_hint("<think>it is 1200</think>\n**Hint:** 'Aug' reads 68.") == ("'Aug' reads 68.", None)
    assert parse_hint("Sure.\n[Hint]: look at AB") == ("look at AB", None)
    assert parse_hint('"the angle at A is marked"') == ("the angle at A is marked", None)
    assert parse_hint("no marker, the whole  answer\n is the hint") == ("no marker, the whole answer is the hint", None)
    assert parse_hint("<think>still thinking when the tokens ran out") == (None, "unparseable")
    assert parse_hint("Hint: **") == (None, "empty")


def test_check_hint_reasons():
    rec = PromptRecord(id="r", images=[], question="q", answer="7", answer_type="number")
    assert check_hint("Hint: " + "x" * 61, rec, checks=HintChecks(max_chars=60)).reason == "too_long"
    assert check_hint("Hint: AB is 3", rec, finish_reason="length").reason == "truncated"
    assert check_hint("Hint: AB is 3", rec, finish_reason="length",
                      checks=HintChecks(reject_truncated=False)).hint == "AB is 3"
    assert check_hint("<think>7</think>Hint: AB is 3", rec).hint == "AB is 3"  # thinking may hold the answer
    assert check_hint("Hint: AB is 7", rec, finish_reason="length").reason == "answer_leak"  # leak named first


def test_default_instruction_holds_the_question_not_the_answer():
    rec = PromptRecord(id="r", images=[], question="  What is the total?  ", answer="9876")
    text = build_instruction(DEFAULT_INSTRUCTION, rec)
    assert "What is the total?" in text and "9876" not in text and "Hint:" in text


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hints")
    seeds = make_seeds(root / "seeds", 6, seed=3, width=128, height=96)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    model = make_random_model_dir(tiny_config_for_tokenizer(tok, hidden=16, layers=1, vision_hidden=16), tok,
                                  root / "model", seed=1)
    return root, seeds, model


@pytest.fixture(scope="module")
def session():
    from jdelta.models.loading import ModelSession

    return ModelSession()


SETTINGS = {"sampling": {"max_new_tokens": 6, "batch_size": 2}, "prompt": {"max_pixels": 64 * 64}, "progress": False}


def config(model, prompts, out, **over) -> Config:
    mapping = {"model": str(model), "prompts": str(prompts), "out": str(out), **SETTINGS}
    for k, v in over.items():
        mapping[k] = {**mapping.get(k, {}), **v} if isinstance(v, dict) else v
    return build(Config, mapping)


def scripted_prompts(path):
    """Records whose scripted writer outputs hit every outcome, plus one unreadable line."""
    base = generate_records(1, seed=0, width=64, height=64)[0]

    def rec(rid, answer, answer_type="text", hint="", **meta):
        return dataclasses.replace(base, id=rid, answer=answer, answer_type=answer_type, meta=meta,
                                   cues=Cues(hint=hint) if hint else None)

    records = [
        rec("leak-number", "1,200", "number"),
        rec("leak-second-answer", "Lemon", answers=["Lemon", "lime"]),
        rec("ok", "7", "number"),
        rec("too-long", "7", "number"),
        rec("unparseable", "7", "number"),
        rec("empty", "7", "number"),
        rec("truncated", "7", "number"),
        rec("bad-prompt", "7", "number"),
        rec("no-reference", None),
        rec("own-hint", "7", "number", hint="AB is 3 and BC is 4"),
        rec("own-hint-states-answer", "Plum", hint="the lowest is 'Plum' at 16%"),
        rec("second-sample-ok", "Plum"),
    ]
    write_jsonl(records, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + ["{not json"] + lines[5:]) + "\n")
    return records


SCRIPT = {
    "leak-number": ["Hint: the bar for 2019 reaches about 1200."],
    "leak-second-answer": ["Hint: the shortest bar is the lime one"],
    "ok": ["<think>the answer is 7</think>\n**Hint:** 'Aug' reads 68 and 'Jul' reads 75."],
    "too-long": ["Hint: " + "the bars are blue " * 40],
    "unparseable": ["<think>the tokens ran out while"],
    "empty": ["Hint:"],
    "truncated": ["Hint: the bars for Aug and"],
    "second-sample-ok": ["Hint: the lowest slice is Plum", "Hint: compare the slice sizes"],
}


class ScriptedWriter:
    """Writes SCRIPT's texts; 'bad-prompt' fails as the pipeline would; records every call."""

    def __init__(self):
        self.calls = []

    def write(self, records, instructions, key):
        self.calls.append([r.id for r in records])
        out = []
        for r, ins in zip(records, instructions, strict=True):
            assert r.question in ins and "[Hint]" not in ins
            if r.id == "bad-prompt":
                out.append(Generation(failure="prompt_too_long", detail="prompt has 9999 tokens > 8192"))
                continue
            texts = SCRIPT[r.id]
            finish = ["length" if r.id == "truncated" else "stop"] * len(texts)
            out.append(Generation(list(texts), finish))
        return out


def out_hint_of(run_dir, rid):
    rec = next(r for r in read_records_jsonl(run_dir / "records.jsonl") if r.id == rid)
    return rec.cues.hint if rec.cues is not None else None


def test_counts_add_up_by_reason_and_nothing_is_lost(setup, tmp_path):
    root, _, model = setup
    prompts = tmp_path / "prompts.jsonl"
    records = scripted_prompts(prompts)
    writer = ScriptedWriter()
    manifest = run_write_hints(config(model, prompts, tmp_path / "run", shard_size=4), writer=writer)
    c = manifest["counts"]
    assert manifest["complete"] and c["input"] == len(records) + 1
    assert c["input"] == c["hinted"] + c["kept"] + c["rejected"] + c["unreadable"] == c["accounted"]
    assert (c["hinted"], c["kept"], c["unreadable"]) == (2, 2, 1)
    assert c["kept_stating_answer"] == 1  # reported, left unchanged
    assert c["rejected_by_reason"] == {"answer_leak": 2, "empty": 1, "no_reference": 1, "prompt_failed": 1,
                                       "too_long": 1, "truncated": 1, "unparseable": 1}
    assert c["unreadable_by_reason"] == {"invalid_json": 1}
    assert c["samples_rejected_by_reason"]["answer_leak"] == 3  # the first sample of second-sample-ok too
    assert c["written"] == len(records) and c["dropped_rejected"] == 0
    assert not any(rid in call for call in writer.calls for rid in ("no-reference", "own-hint"))  # never asked
    assert out_hint_of(tmp_path / "run", "own-hint-states-answer") == "the lowest is 'Plum' at 16%"
    out = {r.id: r for r in read_records_jsonl(tmp_path / "run" / "records.jsonl")}
    assert [r.id for r in read_records_jsonl(tmp_path / "run" / "records.jsonl")] == [r.id for r in records]
    assert out["ok"].cues.hint == "'Aug' reads 68 and 'Jul' reads 75."
    assert out["ok"].provenance["hint"]["stage"] == "write-hints"
    assert out["second-sample-ok"].cues.hint == "compare the slice sizes"
    assert out["own-hint"].cues.hint == "AB is 3 and BC is 4" and "hint" not in out["own-hint"].provenance
    for rid in ("leak-number", "leak-second-answer", "too-long", "bad-prompt", "no-reference"):
        assert out[rid].cues is None, rid  # written, without a hint
    assert out["leak-number"].images == records[0].images and out["leak-number"].answer == "1,200"
    entries = {e["id"]: e for f in sorted((tmp_path / "run" / "shards").glob("*.jsonl"))
               for e in map(json.loads, f.read_text().splitlines())}
    assert entries["leak-second-answer"]["leaked"] == "lime"
    assert entries["bad-prompt"]["detail"].startswith("prompt_too_long")
    assert entries[None]["status"] == "unreadable" and f"{prompts}:6" in entries[None]["detail"]

    # drop_rejected leaves the rejected records out, and counts them
    m2 = run_write_hints(config(model, prompts, tmp_path / "drop", drop_rejected=True), writer=ScriptedWriter())
    assert m2["counts"]["written"] == 4 and m2["counts"]["dropped_rejected"] == 8
    assert [r.id for r in read_records_jsonl(tmp_path / "drop" / "records.jsonl")] == [
        "ok", "own-hint", "own-hint-states-answer", "second-sample-ok"]
    # the same directory with other checks is refused, naming the key
    with pytest.raises(RunDirError, match=r"config\.checks\.max_chars"):
        run_write_hints(config(model, prompts, tmp_path / "run", shard_size=4, checks={"max_chars": 50}),
                        writer=ScriptedWriter())


def hint_prompts(seeds, path):
    """The demo seeds, half of them without their generated hint."""
    records = list(read_records_jsonl(seeds))
    records = [r if i % 2 else dataclasses.replace(r, cues=None) for i, r in enumerate(records)]
    write_jsonl(records, path)
    return records


def test_tiny_model_end_to_end_and_resume_after_kill(setup, session, tmp_path):
    root, seeds, model = setup
    prompts = tmp_path / "prompts.jsonl"
    records = hint_prompts(seeds, prompts)
    flags = ["--max-new-tokens", "6", "--batch-size", "2", "--max-pixels", str(64 * 64), "--no-progress",
             "--shard-size", "2", "--no-reject-truncated"]
    full = tmp_path / "full"
    assert main(["write-hints", "--model", str(model), "--prompts", str(prompts), "--out", str(full), *flags]) == 0
    manifest = json.loads((full / "manifest.json").read_text())
    c = manifest["counts"]
    assert manifest["complete"] and c["input"] == 6 and c["kept"] == 3
    assert c["hinted"] + c["rejected"] == 3 and c["hinted"] >= 1 and c["samples"] == 3
    out = list(read_records_jsonl(full / "records.jsonl"))
    assert [r.id for r in out] == [r.id for r in records]
    assert sum(1 for r in out if "hint" in r.provenance) == c["hinted"]

    class Killed(Exception):
        pass

    def kill(k):
        if k == 0:
            raise Killed

    cfg = config(model, prompts, tmp_path / "resumed", shard_size=2, checks={"reject_truncated": False})
    with pytest.raises(Killed):
        run_write_hints(cfg, session=session, after_shard=kill)
    assert not (tmp_path / "resumed" / "records.jsonl").exists()
    again = run_write_hints(cfg, session=session)
    assert again["shards"]["resumed"] == 1 and again["complete"]
    assert (tmp_path / "resumed" / "records.jsonl").read_bytes() == (full / "records.jsonl").read_bytes()


@pytest.mark.parametrize("override,fragment", [
    ("instruction=Describe {picture}", "config key 'instruction': unknown placeholder {picture}"),
    ("instruction=Describe the image", "config key 'instruction': must contain the {question} placeholder"),
    ("checks.max_chars=0", "config key 'checks.max_chars': must be >= 1"),
    ("shard_size=0", "config key 'shard_size': must be >= 1"),
    ("checks.max_char=10", "unknown config key 'checks.max_char'; did you mean 'checks.max_chars'?"),
])
def test_config_errors_exit_2_naming_the_key(setup, tmp_path, capsys, override, fragment):
    _, seeds, model = setup
    code = main(["write-hints", "--model", str(model), "--prompts", str(seeds), "--out", str(tmp_path / "x"),
                 override])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("jdelta write-hints: error: ") and fragment in err[0]
