"""``jdelta score`` on a tiny random Qwen3-VL pair: valid output, counts that add up, resume."""

import base64
import json

import numpy as np
import pytest

from jdelta import divergence as dv
from jdelta.cli import main
from jdelta.data.records import read_jsonl, write_jsonl
from jdelta.delta_scoring import delta_records, score_prompts
from jdelta.demo import make_seeds, make_tiny_pair, make_tokenizer
from jdelta.stages.score import run_score

N_GOOD = 6
SETTINGS = dict(n=2, max_new_tokens=6, batch_size=4, max_pixels=64 * 64, num_permutations=99,
                num_posterior_draws=100, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    seeds = make_seeds(root / "seeds", N_GOOD, seed=3, width=128, height=96)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    teacher, student = make_tiny_pair(root / "models", tok, teacher_hidden=32, teacher_layers=1,
                                      student_hidden=16, student_layers=1)
    # Plant bad records among the good ones: invalid JSON, an empty question, a non-image.
    lines = seeds.read_text().splitlines()
    good = json.loads(lines[0])
    empty_q = dict(good, id="bad-empty-question", question="  ")
    not_image = dict(good, id="bad-image", images=[{"b64": base64.b64encode(b"not an image").decode()}])
    mixed = lines[:2] + ["{not json"] + lines[2:4] + [json.dumps(empty_q)] + lines[4:] + [json.dumps(not_image)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(mixed) + "\n")
    return root, prompts, teacher, student, tok


def prompts_of(setup):
    return setup[1]


def _entries(run_dir):
    return [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines()]


def test_score_counts_add_up_and_resume(setup, tmp_path):
    root, prompts, teacher, student, _ = setup
    total = N_GOOD + 3
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    def kill_after_two(k):
        if k == 1:
            raise Killed

    with pytest.raises(Killed):  # "killed" after two of the five shards were written
        run_score(teacher, student, prompts, out, shard_size=2, after_shard=kill_after_two, **SETTINGS)
    shards = sorted((out / "shards").glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert not list((out / "shards").glob("*.tmp"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    assert not (out / "scores.jsonl").exists()

    # The rerun scores only the missing shards, stopping after one more (a second interruption).
    m = run_score(teacher, student, prompts, out, shard_size=2, max_shards=1, **SETTINGS)
    assert m["shards"] == {"total": 5, "resumed": 2, "scored_now": 1, "done": 3} and not m["complete"]
    assert m["counts"]["accounted"] == 6 and m["counts"]["remaining"] == total - 6
    m = run_score(teacher, student, prompts, out, shard_size=2, **SETTINGS)
    assert m["complete"] and m["shards"]["resumed"] == 3 and m["shards"]["scored_now"] == 2
    for p in sorted((out / "shards").glob("shard-*.jsonl"))[:2]:  # never rewritten
        assert (p.read_bytes(), p.stat().st_mtime_ns) == before[p.name]

    entries = _entries(out)
    assert [e["index"] for e in entries] == list(range(total))  # every prompt exactly once, in order
    c = m["counts"]
    assert c["input"] == total and c["scored"] + c["skipped"] == total and c["remaining"] == 0
    assert c["scored"] == N_GOOD
    assert c["skipped_by_reason"] == {"invalid_json": 1, "empty_question": 1, "bad_image": 1}
    skipped = {e["id"]: e for e in entries if e["status"] == "skipped"}
    assert set(skipped) == {None, "bad-empty-question", "bad-image"}
    assert f"{prompts}:3" in skipped[None]["message"]  # names the file and line

    good_ids = [r.id for r in read_jsonl(root / "seeds" / "records.jsonl")]
    for e in entries:
        if e["status"] != "scored":
            continue
        assert e["id"] in good_ids
        assert e["n_teacher"] == 2 and e["n_student"] == 2
        assert sum(k["teacher"] for k in e["classes"]) == 2 and sum(k["student"] for k in e["classes"]) == 2
        t = np.array([[k["teacher"] for k in e["classes"]]])
        s = np.array([[k["student"] for k in e["classes"]]])
        assert e["delta"]["tv"] == pytest.approx(float(dv.answer_divergence(t, s)[0]), abs=1e-6)
        assert e["zero_delta"]["exact"] == (e["delta"]["tv"] == 0.0)
        assert 0 < e["p_value"] <= 1 and 0 <= e["posterior_delta_exceeds"] <= 1
        assert e["reference"] and e["answer_metric"] in ("relaxed_accuracy", "exact_match", "mc_accuracy")
        assert len(e["completions"]["teacher"]) == 2

    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["scored"] == N_GOOD and report["counts"]["skipped"] == 3
    assert report["zero_delta"]["exact"]["overall"]["prompts"] == N_GOOD
    assert sum(r["prompts"] for r in report["per_category"].values()) == N_GOOD
    assert (out / "delta_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert f"{total} input = {N_GOOD} scored + 3 skipped" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["config_sha256"] and manifest["config"]["settings"]["n"] == 2

    # Same settings reproduce the same samples: an uninterrupted run writes identical records.
    # (through the command line this time)
    rc = main(["score", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
               "--out", str(tmp_path / "fresh"), "--shard-size", "2", "--n", "2", "--max-new-tokens", "6",
               "--batch-size", "4", "--max-pixels", str(64 * 64), "--num-permutations", "99",
               "--num-posterior-draws", "100", "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "fresh" / "manifest.json").read_text())["complete"]
    strip = lambda es: [e if e["status"] == "scored" else (e["id"], e["reason"]) for e in es]
    assert strip(_entries(tmp_path / "fresh")) == strip(entries)

    # A different setting in the same run dir is refused, not mixed in.
    with pytest.raises(ValueError, match="different settings"):
        run_score(teacher, student, prompts, out, shard_size=2, **{**SETTINGS, "n": 3})


def test_score_prompts_library_call(setup):
    root, _, teacher, student, tok = setup
    records = list(read_jsonl(root / "seeds" / "records.jsonl"))[:3]
    settings = {k: v for k, v in SETTINGS.items() if k != "progress"}
    rows = score_prompts(teacher, student, records, tokenizer=tok, **settings)
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(r["status"] == "scored" and set(r["delta"]) == set(dv.METRICS) for r in rows)


def test_delta_records_on_known_answers():
    """The per-prompt Δ block on hand-made completions (no models): classes, flags, correctness."""
    import jax

    from jdelta.data.records import PromptRecord

    recs = [
        PromptRecord(id="same", images=[], question="q", answer="12", answer_type="number"),
        PromptRecord(id="diff", images=[], question="q", answer="yes", answer_type="yes_no"),
        PromptRecord(id="noref", images=[], question="q"),
    ]
    teacher = [["Answer: 12", "The answer is twelve"], ["yes", "Yes."], ["cat", "cat"]]
    student = [["\\boxed{12.0}", "12"], ["no", "No"], ["cat", "dog"]]
    rows = delta_records(recs, [0, 1, 2], teacher, student, key=jax.random.key(0), num_permutations=99,
                         num_posterior_draws=200)
    same, diff, noref = rows
    assert same["delta"]["tv"] == 0.0 and same["zero_delta"]["exact"] and same["p_value"] == 1.0
    assert same["teacher_accuracy"] == 1.0 and same["student_accuracy"] == 1.0
    assert [c["label"] for c in same["classes"]] == ["12"]
    assert diff["delta"]["tv"] == 1.0 and not diff["zero_delta"]["exact"]
    assert diff["teacher_accuracy"] == 1.0 and diff["student_accuracy"] == 0.0 and diff["accuracy_gap"] == 1.0
    assert diff["posterior_delta_exceeds"] > 0.5 and not diff["zero_delta"]["posterior"]
    assert noref["delta"]["tv"] == 0.5 and noref["reference"] is None and noref["teacher_accuracy"] is None


def test_bad_prompts_file_is_a_clear_error(setup, tmp_path, capsys):
    _, _, teacher, student, _ = setup
    with pytest.raises(ValueError, match="unknown records format"):
        run_score(teacher, student, tmp_path / "prompts.csv", tmp_path / "out", **SETTINGS)
    (tmp_path / "p.csv").write_text("x")
    rc = main(["score", "--teacher", str(teacher), "--student", str(student), "--prompts", str(tmp_path / "p.csv"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown records format" in capsys.readouterr().err
    write_jsonl([], tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="no prompt records"):
        run_score(teacher, student, tmp_path / "empty.jsonl", tmp_path / "out2", **SETTINGS)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run_score(tmp_path, student, prompts_of(setup), tmp_path / "out3", **SETTINGS)


@pytest.mark.slow
def test_score_on_a_mesh(setup):
    """Sharded models and prompts (8 host CPU devices as data x fsdp) give valid, complete entries."""
    from jdelta.models.loading import parse_mesh

    root, _, teacher, student, tok = setup
    records = list(read_jsonl(root / "seeds" / "records.jsonl"))[:4]
    settings = {k: v for k, v in SETTINGS.items() if k != "progress"}
    rows = score_prompts(teacher, student, records, tokenizer=tok, mesh=parse_mesh("data=2,fsdp=4"), **settings)
    assert [r["id"] for r in rows] == [r.id for r in records]
    for r in rows:
        assert r["status"] == "scored" and r["n_teacher"] == 2 and r["n_student"] == 2
        assert 0.0 <= r["delta"]["tv"] <= 1.0
