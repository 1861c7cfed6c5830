"""The DeltaPrompts pipeline on the oracle pair (student fails the ``trend`` family): targeting,
counts, kill/resume at every stage, sharded processes, CLI."""

import json
from pathlib import Path

import pytest

from jdelta.cli import main as cli_main
from jdelta.data.records import read_records_array_record
from jdelta.errors import RunDirError
from jdelta.runs import read_json, read_jsonl
from jdelta.synth.pipeline import Pipeline, run_pipeline
from jdelta.synth.unit_runner import WaitingForShards, check_balance

CONFIG = {
    "seed": 5,
    "rounds": 2,
    "unit_size": 16,
    "source": {"n": 60, "width": 64, "height": 48},
    "scorer": {"failing_families": ["trend"]},
    "synthesis": {"writer": {"seeds": 12, "k": 3, "malformed_rate": 0.5}, "steered": {"n": 12, "width": 64, "height": 48}},
}
STAGES = ("seeds", "score", "modes", "synth", "screen_score", "screen")


class Killed(Exception):
    pass


def _files(run: Path) -> dict[str, bytes]:
    """Every deterministic output file (records, counts, reports) of a run, by relative path."""
    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.name not in ("manifest.json",) and not p.name.startswith(".") and p.suffix != ".png":
            out[str(p.relative_to(run))] = p.read_bytes()
    out["output/manifest.json"] = (run / "output" / "manifest.json").read_bytes()
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    calls = []
    manifest = run_pipeline(run, CONFIG, after_unit=lambda s, u: calls.append((s, u)), log=None)
    return run, manifest, calls


def test_failure_family_ranked_first_and_enriched(ref):
    run, manifest, _ = ref
    modes = read_json(run / "round-00" / "modes" / "modes.json")
    assert (modes["modes"][0]["group"], modes["modes"][0]["outcome"]) == ("trend", "student_wrong_teacher_right")
    assert modes["groups"][0]["group"] == "trend"
    assert "| 1 | trend | student_wrong_teacher_right" in (run / "round-00" / "modes" / "report.md").read_text()
    assert (run / "round-00" / "modes" / "report.png").read_bytes()[:4] == b"\x89PNG"
    jobs = read_json(run / "round-00" / "modes" / "jobs.json")
    w = jobs["steering"]["weights"]
    assert max(w, key=w.get).startswith("trend/")
    out = read_json(run / "output" / "manifest.json")
    seed_share = out["family_share"]["seeds"]["trend"]
    syn_share = out["family_share"]["synthesized"]["trend"]
    assert syn_share > 3 * seed_share and syn_share > 0.5, (seed_share, syn_share)
    # Both generators contributed, and each record says where it came from.
    recs = read_jsonl(run / "output" / "records.jsonl")
    gens = {r["provenance"].get("generator") for r in recs if r["provenance"]["stage"] == "synthesis"}
    assert gens == {"teacher_writer", "steered_procedural"}
    for r in recs:
        assert r["provenance"]["screening"]["delta"] > 0
        if r["provenance"].get("generator") == "teacher_writer":
            assert r["provenance"]["seed_id"] and r["provenance"]["failure_mode"]["outcome"]
    assert any(r["provenance"]["round"] == 1 for r in recs)


def test_counts_add_up_at_every_stage(ref):
    run, manifest, _ = ref
    st = manifest["stages"]
    for name, c in st.items():
        check_balance(c, name)
    for r in ("round-00", "round-01"):
        s = {k.split("/")[1]: v for k, v in st.items() if k.startswith(r)}
        assert s["score"]["in"] == s["seeds"]["out"]
        assert s["modes"]["in"] == s["score"]["out"]
        assert s["synth"]["items"] == s["modes"]["writer_jobs"] + s["modes"]["steered_jobs"]
        assert s["synth"]["writer_generations"] == s["modes"]["writer_jobs"]
        assert s["screen_score"]["in"] == s["synth"]["out"] == s["screen"]["in"]
        assert s["screen"]["out"] == len(read_jsonl(run / r / "screen" / "kept.jsonl"))
    assert st["round-00/seeds"]["in"] == 60
    assert st["round-01/seeds"]["in"] == st["round-00/screen"]["out"]
    assert st["output"]["in"] == st["round-00/seeds"]["out"] + st["round-00/screen"]["out"] + st["round-01/screen"]["out"]
    assert st["output"]["out"] == len(read_jsonl(run / "output" / "records.jsonl"))
    # The oracle writer's malformed generations show up as counted rejections.
    dropped = {k: st["round-00/synth"]["dropped"].get(k, 0) + st["round-01/synth"]["dropped"].get(k, 0)
               for k in set(st["round-00/synth"]["dropped"]) | set(st["round-01/synth"]["dropped"])}
    assert sum(dropped.values()) > 0 and set(dropped) <= {"no_questions", "half_question", "duplicate", "copy_of_seed"}


def test_kill_in_any_stage_then_rerun_gives_same_output(ref, tmp_path):
    run_ref, _, calls = ref
    want = _files(run_ref)
    # The first call of every stage (round 0 and output), the first of round 1, a mid-stage unit
    # and the very last call.
    firsts = {}
    for i, c in enumerate(calls):
        firsts.setdefault(c[0], i)
    round1 = calls.index(("seeds", 0), firsts["screen"])
    picks = sorted(set(firsts.values()) | {round1, 2, len(calls) - 1})
    stages_hit = {calls[i][0] for i in picks}
    assert stages_hit >= set(STAGES) | {"output"}
    for k in picks:
        run = tmp_path / f"kill{k}"
        n = {"calls": 0}

        def hook(stage, unit, k=k, n=n):
            n["calls"] += 1
            if n["calls"] == k + 1:
                raise Killed(f"{stage} {unit}")

        with pytest.raises(Killed):
            run_pipeline(run, CONFIG, after_unit=hook, log=None)
        run_pipeline(run, CONFIG, log=None)
        got = _files(run)
        assert got.keys() == want.keys(), k
        diff = [p for p in want if got[p] != want[p]]
        assert not diff, (k, calls[k], diff[:5])


def test_sharded_processes_match_single_process(ref, tmp_path):
    run_ref, _, _ = ref
    run = tmp_path / "sharded"
    turns = 0
    finished = set()
    while len(finished) < 2 and turns < 60:
        p = turns % 2
        turns += 1
        try:
            run_pipeline(run, CONFIG, process_index=p, num_processes=2, log=None)
            finished.add(p)
        except WaitingForShards:
            pass
    assert finished == {0, 1}
    assert turns > 2  # the processes really had to hand units to each other
    assert (run / "output" / "records.jsonl").read_bytes() == (run_ref / "output" / "records.jsonl").read_bytes()
    units = sorted((run / "round-00" / "score" / "units").glob("unit-*.counts.json"))
    assert len(units) == 4  # 60 seeds / 16 per unit, split over 2 processes
    m = read_json(run / "manifest.json")
    assert m["complete"] and m["committed"] and m["num_processes"] == 2
    # One process alone later resumes the sharded run: everything is done, nothing is redone.
    m = Pipeline(run, CONFIG, after_unit=lambda s, u: pytest.fail(f"redid {s} {u}")).run()
    assert m["complete"] and m["stages"]["output"]["out"] == len(read_jsonl(run / "output" / "records.jsonl"))


def test_changed_config_is_refused_naming_the_keys(ref):
    run, _, _ = ref
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(RunDirError, match=r"config\.seed \(5 -> 6\); config\.synthesis\.writer\.k \(3 -> 2\)"):
        Pipeline(run, {**CONFIG, "seed": 6, "synthesis": {**CONFIG["synthesis"], "writer": {"seeds": 12, "k": 2,
                                                                                            "malformed_rate": 0.5}}}).run()
    with pytest.raises(RunDirError, match=r"config\.seed \(5 -> 6\)"):  # sharded processes check it too
        Pipeline(run, {**CONFIG, "seed": 6}, process_index=1, num_processes=2).run()
    assert (run / "manifest.json").read_bytes() == before
    # The same config resumes: nothing is redone, the manifest is rewritten complete.
    m = Pipeline(run, CONFIG, after_unit=lambda s, u: pytest.fail(f"redid {s} {u}")).run()
    assert m["complete"] and m["committed"] and m["config"]["seed"] == 5


def test_cli_pipeline_and_synthesize(tmp_path, ref, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(json.dumps({**CONFIG, "rounds": 1, "source": {"n": 24, "width": 64, "height": 48}}))
    out = tmp_path / "cli"
    assert cli_main(["pipeline", "--config", str(cfg), "--out", str(out), "synthesis.steered.n=4",
                     "output.format=array_record"]) == 0
    m = read_json(out / "manifest.json")
    assert m["complete"] and m["config"]["synthesis"]["steered"]["n"] == 4
    assert m["stages"]["round-00/synth"]["steered_records"] == 4
    assert read_json(out / "output" / "manifest.json")["count"] == m["stages"]["output"]["out"]
    recs = list(read_records_array_record(out / "output" / "records.array_record"))
    assert len(recs) == m["stages"]["output"]["out"] and all(r.provenance.get("screening") for r in recs)
    capsys.readouterr()
    assert cli_main(["pipeline", "--config", str(cfg), "--out", str(out), "seed=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jdelta pipeline: error: ") and "config.seed (5 -> 9)" in err[0], err
    first = (out / "output" / "records.array_record").read_bytes()
    assert cli_main(["pipeline", "--config", str(cfg), "--out", str(out), "--overwrite", "seed=9",
                     "synthesis.steered.n=4", "output.format=array_record", "--no-progress"]) == 0
    assert read_json(out / "manifest.json")["config"]["seed"] == 9
    assert (out / "output" / "records.array_record").read_bytes() != first
    # `jdelta synthesize` from a score-like run: the reference run's seeds and their scores.
    run_ref = ref[0]
    prompts = run_ref / "round-00" / "seeds" / "out.jsonl"
    scores = run_ref / "round-00" / "score" / "out.jsonl"
    out2 = tmp_path / "syn"
    assert cli_main(["synthesize", "--scores", str(scores), "--prompts", str(prompts), "--out", str(out2),
                     "synthesis.writer.seeds=12", "synthesis.writer.k=3", "synthesis.steered.n=12",
                     "synthesis.steered.width=64", "synthesis.steered.height=48", "unit_size=16", "seed=5"]) == 0
    # Same modes and the same candidates as the pipeline's round 0 (same code path, same seed).
    assert (out2 / "candidates.jsonl").read_bytes() == (run_ref / "round-00" / "synth" / "out.jsonl").read_bytes()
    assert read_json(out2 / "round-00" / "modes" / "modes.json") == read_json(run_ref / "round-00" / "modes" / "modes.json")


def test_chartqa_layout_seed_source_counts_bad_rows(tmp_path):
    from jdelta.data.charts import generate_records

    recs = generate_records(6, 1, width=64, height=48)
    rows = []
    for i, r in enumerate(recs):
        img = tmp_path / f"img{i}.png"
        img.write_bytes(r.images[0])
        rows.append({"imgname": str(img), "query": r.question, "label": r.answer})
    rows.insert(2, {"imgname": str(tmp_path / "img0.png"), "query": "What is shown?"})  # no label
    src = tmp_path / "chartqa.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in rows))
    cfg = {**CONFIG, "rounds": 1, "source": {"kind": "records", "path": str(src), "layout": "chartqa"},
           "scorer": {"failing_families": ["chartqa"]}, "synthesis": {"writer": {"seeds": 4, "k": 2},
                                                                      "steered": {"n": 2, "width": 64, "height": 48}}}
    m = run_pipeline(tmp_path / "run", cfg, log=None)
    st = m["stages"]
    assert st["round-00/seeds"]["in"] == 7 and st["round-00/seeds"]["out"] == 6
    assert st["round-00/seeds"]["dropped"] == {"missing_field": 1}
    modes = read_json(tmp_path / "run" / "round-00" / "modes" / "modes.json")
    assert modes["modes"][0]["group"] == "chartqa" and modes["modes"][0]["outcome"] == "student_wrong_teacher_right"
    assert read_json(tmp_path / "run" / "round-00" / "modes" / "jobs.json")["steering"]["uniform"]
    for name, c in st.items():
        check_balance(c, name)
