"""``jdelta sample`` end to end: records -> pipeline -> sampler -> a run directory, on a tiny checkpoint;
a killed run never leaves (or leaves behind) a truncated ``samples.jsonl``."""

import json
import warnings

import numpy as np
import pytest
from qwen3_vl_tiny import save_tiny_hf_checkpoint

from jdelta.cli import main
from jdelta.data.charts import corpus_text, generate_records
from jdelta.data.records import write_jsonl
from jdelta.data.tokenizer import SpecialTokens, build_demo_tokenizer
from jdelta.runs import RunDir

warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
N_RECORDS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_stage")
    records = generate_records(N_RECORDS, seed=0, width=64, height=64)
    model_dir = root / "model"
    tok = build_demo_tokenizer(model_dir, corpus_text(records), vocab_size=400)
    sp = SpecialTokens.from_tokenizer(tok)
    save_tiny_hf_checkpoint(tok, model_dir)
    prompts = root / "prompts.jsonl"
    write_jsonl(records, prompts)
    return root, model_dir, prompts, records, tok, sp


def args_for(model_dir, prompts, out, *extra):
    return ["sample", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "5", "--min-pixels", str(32 * 32 * 4),
            "--max-pixels", str(64 * 64), "--no-progress", *extra]


def run_stage(root, model_dir, prompts, name, *extra):
    out = root / name
    assert main(args_for(model_dir, prompts, out, *extra)) == 0
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()], out


def test_sample_stage_writes_n_answers_per_prompt(setup, capsys):
    root, model_dir, prompts, records, tok, sp = setup
    rows, out = run_stage(root, model_dir, prompts, "a", "--n", "3", "--temperature", "1.0", "--seed", "4")
    assert len(rows) == N_RECORDS * 3  # the short final batch (1 of 2 rows) is not lost or duplicated
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == sorted(
        (rec.id, j) for rec in records for j in range(3))
    for r in rows:
        n = len(r["token_ids"])
        assert 1 <= n <= 5 and len(r["logprobs"]) == n and len(r["raw_logprobs"]) == n
        assert r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "stop") == (r["token_ids"][-1] in sp.stop_ids)
        assert all(lp <= 0 for lp in r["logprobs"] + r["raw_logprobs"])
        text_ids = r["token_ids"][:-1] if r["finish_reason"] == "stop" else r["token_ids"]
        assert r["text"] == tok.decode(text_ids, skip_special_tokens=False)
    # the n samples of a prompt are different draws
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(tuple(r["token_ids"]))
    assert any(len(v) > 1 for v in by_prompt.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["stage"] == "sample"
    assert manifest["counts"]["prompts"] == N_RECORDS and manifest["counts"]["samples"] == 3 * N_RECORDS
    assert manifest["counts"]["new_tokens"] == sum(len(r["token_ids"]) for r in rows)
    assert manifest["config"]["sampling"]["n"] == 3 and manifest["inputs"]["model"]["config_sha256"]
    assert manifest["inputs"]["prompts"]["content"].startswith("blake2b:")
    err = capsys.readouterr().err
    assert f"{N_RECORDS} prompts x 3 = {3 * N_RECORDS} samples" in err and "tokens/s" in err
    # same seed -> same file
    again, _ = run_stage(root, model_dir, prompts, "b", "--n", "3", "--temperature", "1.0", "--seed", "4")
    assert again == rows


def test_sample_stage_greedy_is_a_point_mass(setup):
    root, model_dir, prompts, *_ = setup
    rows, _ = run_stage(root, model_dir, prompts, "g", "--n", "1", "--temperature", "0", "--limit", "2")
    assert len(rows) == 2 and [r["record_index"] for r in rows] == [0, 1]
    assert all(np.allclose(r["logprobs"], 0.0) for r in rows)  # greedy: a point mass


def test_a_killed_rerun_never_truncates_complete_output(setup, monkeypatch, capsys):
    """issue 11.2: the output is written to a temporary file and renamed when complete."""
    from jdelta.sampling import Sampler

    root, model_dir, prompts, *_ = setup
    _, out = run_stage(root, model_dir, prompts, "k", "--n", "2")
    complete = (out / "samples.jsonl").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    real_generate = Sampler.generate
    calls = []

    def killed_after_one_batch(self, *a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the kill arrives while the second batch samples
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(Sampler, "generate", killed_after_one_batch)
    # The same command again: the directory is complete, so nothing is sampled and nothing changes.
    assert main(args_for(model_dir, prompts, out, "--n", "2")) == 0
    assert "is complete" in capsys.readouterr().err and not calls
    assert (out / "samples.jsonl").read_bytes() == complete
    # A run killed part-way leaves no samples.jsonl at all (never a truncated one) and no
    # temporary file; its start binds nothing.
    fresh = root / "k2"
    with pytest.raises(KeyboardInterrupt):
        main(args_for(model_dir, prompts, fresh, "--n", "2"))
    assert len(calls) == 2 and not (fresh / "samples.jsonl").exists()
    assert not [p.name for p in fresh.iterdir() if p.name.endswith(".tmp")]
    assert not json.loads((fresh / "manifest.json").read_text())["committed"]
    # The identical command then completes (a temporary file a SIGKILL left behind is removed).
    (fresh / ".samples.jsonl.999.1.tmp").write_text('{"partial": ')
    monkeypatch.setattr(Sampler, "generate", real_generate)
    assert main(args_for(model_dir, prompts, fresh, "--n", "2")) == 0
    assert (fresh / "samples.jsonl").read_bytes() == complete  # same settings, same seed: same samples
    assert not list(fresh.glob("*.tmp")) and not list(fresh.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]


def test_other_settings_are_refused_naming_the_key(setup, capsys):
    root, model_dir, prompts, *_ = setup
    _, out = run_stage(root, model_dir, prompts, "r", "--n", "1", "--limit", "1")
    before = (out / "samples.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args_for(model_dir, prompts, out, "--n", "2", "--limit", "1")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "other settings: config.sampling.n (1 -> 2)" in err[0] and str(out) in err[0]
    assert (out / "samples.jsonl").read_bytes() == before


def test_second_process_is_refused_by_the_lock(setup, capsys):
    root, model_dir, prompts, *_ = setup
    out = root / "locked"
    with RunDir(out, "sample", config={}):
        assert main(args_for(model_dir, prompts, out)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(out) in err[0] and "in use by another jdelta process" in err[0]


def test_user_errors_are_one_line(setup, tmp_path, capsys):
    """issue 11.9: sample's user errors print one line and exit 2 (no traceback)."""
    root, model_dir, prompts, *_ = setup
    (tmp_path / "p.txt").write_text("x")
    cases = [
        (args_for(model_dir, tmp_path / "p.txt", tmp_path / "o1"), "unknown records format"),
        (args_for(tmp_path, prompts, tmp_path / "o2"), "no config.json"),
        (args_for(model_dir, prompts, tmp_path / "o3", "--n", "0"), "config key 'sampling.n': must be >= 1"),
        (args_for(model_dir, prompts, tmp_path / "o4", "bogus=1"), "unknown config key 'bogus'"),
        (args_for(model_dir, prompts, tmp_path / "o5", "sampling.max_new_tokns=3"),
         "did you mean 'sampling.max_new_tokens'?"),
        (args_for(model_dir, prompts, tmp_path / "o6", "--limit", "some"), "config key 'limit'"),
        (args_for(model_dir, prompts, tmp_path / "o7", "--top-p", "2"), "config key 'sampling.top_p'"),
    ]
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("jdelta sample: error: ") and fragment in err[0], err
