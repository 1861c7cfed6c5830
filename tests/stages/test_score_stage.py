"""``jdelta score`` on a tiny random Qwen3-VL pair: valid output, counts that add up, resume, and
the run-directory guarantees (lock, reuse refusal naming keys, content-hashed inputs, failed starts)."""

import base64
import json
import shutil

import numpy as np
import pytest

from jdelta import completions
from jdelta import divergence as dv
from jdelta.cli import main
from jdelta.config import build
from jdelta.data.records import read_records_jsonl, write_jsonl
from jdelta.delta_scoring import DeltaTestConfig, delta_records, score_prompts
from jdelta.errors import RunDirError, UserError
from jdelta.runs import RunDir
from jdelta.stages.score import Config, run_score
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer

N_GOOD = 6
SETTINGS = {"sampling": {"n": 2, "max_new_tokens": 6, "batch_size": 4}, "prompt": {"max_pixels": 64 * 64},
            "delta": {"num_permutations": 99, "num_posterior_draws": 100}, "progress": False}
FLAGS = ["--n", "2", "--max-new-tokens", "6", "--batch-size", "4", "--max-pixels", str(64 * 64),
         "--num-permutations", "99", "--num-posterior-draws", "100", "--no-progress"]


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


@pytest.fixture(scope="module")
def session():
    """One model session for the module: the pair is loaded and its samplers compiled once."""
    from jdelta.models.loading import ModelSession

    return ModelSession()


def config(teacher, student, prompts, out, **over) -> Config:
    mapping = {"teacher": str(teacher), "student": str(student), "prompts": str(prompts), "out": str(out),
               **SETTINGS, **over}
    return build(Config, mapping)


def cli_args(teacher, student, prompts, out, *extra):
    return ["score", "--teacher", str(teacher), "--student", str(student), "--prompts", str(prompts),
            "--out", str(out), *FLAGS, *extra]


def _entries(run_dir):
    return [json.loads(x) for x in (run_dir / "scores.jsonl").read_text().splitlines()]


def test_score_counts_add_up_and_resume(setup, session, tmp_path):
    root, prompts, teacher, student, _ = setup
    total = N_GOOD + 3
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    def kill_after_two(k):
        if k == 1:
            raise Killed

    with pytest.raises(Killed):  # "killed" after two of the five shards were written
        run_score(config(teacher, student, prompts, out, shard_size=2), after_shard=kill_after_two, session=session)
    shards = sorted((out / "shards").glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert not list((out / "shards").glob("*.tmp"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    assert not (out / "scores.jsonl").exists()

    # The rerun scores only the missing shards, stopping after one more (a second interruption).
    m = run_score(config(teacher, student, prompts, out, shard_size=2, max_shards=1), session=session)
    assert m["shards"] == {"total": 5, "resumed": 2, "scored_now": 1, "done": 3} and not m["complete"]
    assert m["counts"]["accounted"] == 6 and m["counts"]["remaining"] == total - 6
    m = run_score(config(teacher, student, prompts, out, shard_size=2), session=session)
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

    good_ids = [r.id for r in read_records_jsonl(root / "seeds" / "records.jsonl")]
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
        assert isinstance(e["reference"], list) and e["reference"]
        assert e["answer_metric"] in ("relaxed_accuracy", "exact_match", "mc_accuracy")
        assert len(e["completions"]["teacher"]) == 2

    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["scored"] == N_GOOD and report["counts"]["skipped"] == 3
    assert report["zero_delta"]["exact"]["overall"]["prompts"] == N_GOOD
    assert sum(r["prompts"] for r in report["per_category"].values()) == N_GOOD
    assert (out / "delta_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert f"{total} input = {N_GOOD} scored + 3 skipped" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["teacher"]["config_sha256"] and manifest["config"]["sampling"]["n"] == 2
    assert manifest["inputs"]["prompts"]["content"].startswith("blake2b:")

    # Same settings reproduce the same samples: an uninterrupted run writes identical records
    # (through the command line this time).
    assert main(cli_args(teacher, student, prompts, tmp_path / "fresh", "--shard-size", "2")) == 0
    assert json.loads((tmp_path / "fresh" / "manifest.json").read_text())["complete"]
    assert _entries(tmp_path / "fresh") == entries

    # A different setting in the same run dir is refused, naming the key, not mixed in.
    with pytest.raises(RunDirError, match=r"other settings: config\.sampling\.n \(2 -> 3\)"):
        run_score(config(teacher, student, prompts, out, shard_size=2, sampling={**SETTINGS["sampling"], "n": 3}))


def test_score_prompts_library_call(setup, session):
    root, _, teacher, student, tok = setup
    records = list(read_records_jsonl(root / "seeds" / "records.jsonl"))[:3]
    s = SETTINGS
    rows = score_prompts(teacher, student, records, tokenizer=tok, sampling=build_part("sampling"),
                         prompt=build_part("prompt"), tests=DeltaTestConfig(**s["delta"]), session=session)
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(r["status"] == "scored" and set(r["delta"]) == set(dv.METRICS) for r in rows)


def build_part(name):
    from jdelta.config import PromptConfig, SamplingConfig

    return build({"sampling": SamplingConfig, "prompt": PromptConfig}[name], SETTINGS[name])


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
    rows = delta_records(recs, [0, 1, 2], teacher, student, key=jax.random.key(0),
                         tests=DeltaTestConfig(num_permutations=99, num_posterior_draws=200))
    same, diff, noref = rows
    assert same["delta"]["tv"] == 0.0 and same["zero_delta"]["exact"] and same["p_value"] == 1.0
    assert same["teacher_accuracy"] == 1.0 and same["student_accuracy"] == 1.0
    assert [c["label"] for c in same["classes"]] == ["12"]
    assert diff["delta"]["tv"] == 1.0 and not diff["zero_delta"]["exact"]
    assert diff["teacher_accuracy"] == 1.0 and diff["student_accuracy"] == 0.0 and diff["accuracy_gap"] == 1.0
    assert diff["posterior_delta_exceeds"] > 0.5 and not diff["zero_delta"]["posterior"]
    assert noref["delta"]["tv"] == 0.5 and noref["reference"] is None and noref["teacher_accuracy"] is None


def test_list_references_stay_lists_end_to_end(setup, session, tmp_path, monkeypatch):
    """issue 11.1: ``"answer": ["123", "124"]``: a correct "123" (or "124") scores 1, through the stage."""
    _, prompts, teacher, student, _ = setup
    good = json.loads(prompts.read_text().splitlines()[0])
    rec = dict(good, id="several", answer=["123", "124"], answer_type="number")
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    teacher_model = session.model(teacher)

    def fake(sampler, tokenizer, batch, params, rng):  # teacher says 123, student 124: both right
        b = batch["input_ids"].shape[0]
        text = "Answer: 123" if sampler.model is teacher_model else "Answer: 124"
        return [[text] * params.n] * b, [["stop"] * params.n] * b

    monkeypatch.setattr(completions, "sample_texts", fake)
    m = run_score(config(teacher, student, path, tmp_path / "out"), session=session)
    assert m["complete"]
    (e,) = _entries(tmp_path / "out")
    assert e["reference"] == ["123", "124"]
    assert [(c["label"], c["teacher"], c["student"], c["correct"]) for c in e["classes"]] == [
        ("123", 2, 0, True), ("124", 0, 2, True)]
    assert e["teacher_accuracy"] == 1.0 and e["student_accuracy"] == 1.0
    assert e["teacher_majority_correct"] and e["student_majority_correct"]


def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys):
    """issue 11.9: user errors (bad prompts file, empty file, missing model) -> one line, exit 2."""
    _, prompts, teacher, student, _ = setup
    (tmp_path / "p.csv").write_text("x")
    write_jsonl([], tmp_path / "empty.jsonl")
    cases = [
        (cli_args(teacher, student, tmp_path / "p.csv", tmp_path / "o1"), "unknown records format"),
        (cli_args(teacher, student, tmp_path / "empty.jsonl", tmp_path / "o2"), "no prompt records"),
        (cli_args(tmp_path / "nowhere", student, prompts, tmp_path / "o3"),
         f"teacher {tmp_path / 'nowhere'}: no config.json"),
        (cli_args(teacher, student, prompts, tmp_path / "o4", "--n", "0"), "config key 'sampling.n': must be >= 1"),
        (cli_args(teacher, student, prompts, tmp_path / "o5", "--metric", "l2"), "config key 'delta.metric'"),
    ]
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("jdelta score: error: ") and fragment in err[0], err


@pytest.mark.parametrize("args, fragment", [
    (["bogus_key=1"], "unknown config key 'bogus_key'"),
    (["sampling.temprature=0.5"], "unknown config key 'sampling.temprature'; did you mean 'sampling.temperature'?"),
    (["--shard-sise", "4"], "unknown option --shard-sise; did you mean --shard-size?"),
    (["delta.levl=0.1"], "did you mean 'delta.level'?"),
    (["--n", "eight"], "config key 'sampling.n'"),
    (["--level", "high"], "config key 'delta.level'"),
    (["--shard-size", "0"], "config key 'shard_size': must be >= 1"),
])
def test_config_errors_name_the_key(args, fragment, capsys, tmp_path):
    """Unknown, misspelled and wrongly typed keys: exit 2, one line naming the key (no model loaded)."""
    rc = main(["score", "--teacher", "T", "--student", "S", "--prompts", "P", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("jdelta score: error: ") and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_second_process_is_refused_by_the_lock(setup, tmp_path, capsys):
    """issue 11.10: a live run directory (its lock held) refuses a second score run, naming the dir."""
    _, prompts, teacher, student, _ = setup
    out = tmp_path / "locked"
    with RunDir(out, "score", config={}):
        rc = main(cli_args(teacher, student, prompts, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(out) in err[0] and "in use by another jdelta process" in err[0]


def test_prompts_edited_in_place_are_a_different_input(setup, session, tmp_path):
    """issue 11.7: same path, same size, other content (a reference changed) -> refused, not stale shards."""
    _, prompts, teacher, student, _ = setup
    path = tmp_path / "p.jsonl"
    lines = prompts.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")
    out = tmp_path / "out"
    assert run_score(config(teacher, student, path, out), session=session)["complete"]
    rec = json.loads(lines[0])
    old_answer = rec["answer"]
    new_answer = "9" * len(old_answer) if old_answer != "9" * len(old_answer) else "8" * len(old_answer)
    edited = json.dumps(dict(rec, answer=new_answer))
    assert len(edited) == len(lines[0])
    size = path.stat().st_size
    path.write_text(edited + "\n" + lines[1] + "\n")
    assert path.stat().st_size == size
    with pytest.raises(RunDirError, match=r"inputs\.prompts\.content"):
        run_score(config(teacher, student, path, out), session=session)
    m = run_score(config(teacher, student, path, out, overwrite=True), session=session)  # explicitly discarded: rescored
    assert m["complete"] and _entries(out)[0]["reference"] == [new_answer]


def test_failed_start_leaves_the_directory_reusable(setup, tmp_path):
    """issue 11.8: a student that fails to load; fixed, the identical command runs (no --overwrite)."""
    _, prompts, teacher, student, _ = setup
    broken = tmp_path / "student"
    shutil.copytree(student, broken)
    weights = next(broken.glob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # half-written
    out = tmp_path / "out"
    with pytest.raises(UserError, match=str(broken)):
        run_score(config(teacher, broken, prompts, out, shard_size=4))
    assert not json.loads((out / "manifest.json").read_text())["committed"]
    weights.write_bytes(good)
    assert run_score(config(teacher, broken, prompts, out, shard_size=4))["complete"]


def test_tokenizers_are_compared_by_content(setup, tmp_path, capsys):
    """issue 11.3: a student tokenizer of the same size with other token ids is refused."""
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.loading import check_same_tokenizer

    _, prompts, teacher, student, tok = setup
    other = tmp_path / "student"
    shutil.copytree(student, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(k for k, v in vocab.items() if v >= 256)[:2]  # two learned tokens swap ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    swapped = load_tokenizer(other)
    assert len(swapped) == len(tok)
    with pytest.raises(UserError, match="2 of .* token ids map to different tokens"):
        check_same_tokenizer(tok, swapped)
    check_same_tokenizer(tok, load_tokenizer(student))  # same content: fine
    assert main(cli_args(teacher, other, prompts, tmp_path / "out")) == 2
    assert "teacher and student tokenizers differ" in capsys.readouterr().err


def test_score_on_a_mesh(setup):
    """Sharded models and prompts (8 host CPU devices as data x fsdp): the models' parameters live
    on all 8 devices and the entries are valid and complete."""
    import jax
    from flax import nnx

    from jdelta.config import MeshConfig
    from jdelta.models.loading import ModelSession

    root, _, teacher, student, tok = setup
    records = list(read_records_jsonl(root / "seeds" / "records.jsonl"))[:4]
    session = ModelSession(MeshConfig(data=2, fsdp=4).make())
    rows = score_prompts(teacher, student, records, tokenizer=tok, sampling=build_part("sampling"),
                         prompt=build_part("prompt"), tests=DeltaTestConfig(**SETTINGS["delta"]), session=session)
    assert [r["id"] for r in rows] == [r.id for r in records]
    for r in rows:
        assert r["status"] == "scored" and r["n_teacher"] == 2 and r["n_student"] == 2
        assert 0.0 <= r["delta"]["tv"] <= 1.0
    leaves = [x for x in jax.tree.leaves(nnx.state(session.model(teacher))) if hasattr(x, "sharding")]
    assert leaves and all(len(x.sharding.device_set) == 8 for x in leaves)
    assert any(not x.sharding.is_fully_replicated for x in leaves)  # fsdp actually splits parameters
