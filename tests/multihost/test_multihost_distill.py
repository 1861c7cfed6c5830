"""``jdelta distill`` (VA-OPD) as one program over 2 processes x 4 CPU devices: the same losses and
parameters as the one-process run over 8 devices; a SIGTERM to one process makes both save the
same step and exit cleanly, and the rerun resumes to the uninterrupted run's parameters (the
default-suite test checks both at once for reverse-KL OPD: interrupted 2-process run == uninterrupted
1-process run)."""

import json
import signal
import time

import jax
import numpy as np
import pytest
from distill_pair import DEMO_CONFIG
from multihost_harness import run_ok, start, wait

from jdelta.config import load_mapping, merge
from jdelta.distill.metrics import read_metrics

MESH = {"fsdp": 4, "tensor": 2}


def mapping(run_dir, steps: int, **over) -> dict:
    return merge(load_mapping(DEMO_CONFIG), merge({
        "run_dir": str(run_dir), "progress": False, "mesh": MESH, "train": {"steps": steps},
        "optimizer": {"total_steps": 6}, "checkpoint": {"save_every": 2, "async_save": False}}, over))


def one_process(run_dir, steps: int, **over):
    from jdelta.config import build
    from jdelta.stages.distill import Config, train

    state = train(build(Config, mapping(run_dir, steps, **over))).state
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def params_of(run_dir):
    with np.load(run_dir / "params.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def summary_of(finished) -> dict:
    line = [x for x in finished.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def assert_params_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


CASES = [
    pytest.param("va_opd", "synthetic", id="va_opd-synthetic"),
    pytest.param("gkd", "synthetic", id="gkd-synthetic"),
    pytest.param("va_opd", "records", id="va_opd-records"),
    pytest.param("sft", "sft_jsonl", id="sft"),
]


def sft_file(path):
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(1, 60, int(rng.integers(3, 8))).tolist(),
             "response_ids": rng.integers(1, 60, int(rng.integers(2, 6))).tolist()} for _ in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # the SIGTERM test below compares a 2-process run with the 1-process one too
@pytest.mark.parametrize(("mode", "source"), CASES)
def test_two_processes_equal_one(mode, source, tmp_path):
    over = {"distill": {"mode": mode, **({"gkd_lambda": 0.5, "off_policy_source": "teacher"} if mode == "gkd"
                                         else {})}}
    if mode == "sft":  # teacher-written responses: the same batches on every process
        over = {"method": "sft", "data": {"source": "sft_jsonl", "path": str(sft_file(tmp_path / "sft.jsonl"))}}
    if source == "records":  # the records pipeline: each process reads its slice of every global batch
        from distill_pair import records_setup

        over = merge(records_setup(tmp_path / "data"), merge(over, {"distill": {"chunk_size": 16,
                                                                                 "completion_bucket": 8,
                                                                                 "prompt_bucket": 32}}))
    from jdelta.config import build
    from jdelta.stages.distill import Config, train

    ref_state = train(build(Config, mapping(tmp_path / "one", 3, **over,
                                            export={"path": str(tmp_path / "one-hf")}))).state
    ref = [np.asarray(x) for x in jax.tree.leaves(ref_state.params)]
    done = run_ok(["distill", json.dumps(mapping(tmp_path / "two", 3, **over,
                                                 export={"path": str(tmp_path / "two-hf")}))])
    assert [summary_of(f)["steps"] for f in done] == [3, 3]
    # records: Adam turns a cross-process (Gloo) vs in-process all-reduce order difference on a near-zero
    # gradient into one weight of 4096 off by 2.1e-5 after 3 steps (measured); the other cases hold 1e-5
    atol = 1e-4 if source == "records" else 1e-5
    assert_params_close(params_of(tmp_path / "two"), ref, atol=atol)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5)
    assert [r.get("rollout/mean_length") for r in two] == [r.get("rollout/mean_length") for r in one]
    # every process wrote its data-iterator state into the checkpoint; only process 0 the metrics
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "2" / "data").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    # the exported student (gathered from both processes, written by process 0) equals the 1-process one
    from safetensors.numpy import load_file

    for f in sorted((tmp_path / "one-hf").glob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "two-hf" / f.name)
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=atol, rtol=0)


# Preemption is the loop's and the checkpoint's business, not the loss's: plain reverse-KL OPD on text
# prompts, ~20% less CPU than VA-OPD on image prompts (measured). VA-OPD on image prompts over 2
# processes: test_two_processes_equal_one (-m slow); its step sharded over 8 devices in one process:
# tests/distill/test_distill_mesh.py (default suite).
PREEMPT = {"distill": {"mode": "reverse_kl"}, "data": {"with_image": False}}


def test_sigterm_to_one_process_saves_both_at_one_step_and_resumes_exactly(tmp_path):
    steps = 6
    run_dir = tmp_path / "run"
    procs = start(["distill", json.dumps(mapping(run_dir, steps, **PREEMPT)), "0.5"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert all(p.poll() is None for p in procs), "a process ended before training started"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    first = wait(procs, 240)
    assert [f.returncode for f in first] == [0, 0], first[1].stderr[-3000:]
    saved = [summary_of(f) for f in first]
    assert saved[0]["preempted"] and saved[1]["preempted"]
    stop = saved[0]["steps"]
    assert saved[1]["steps"] == stop and 1 <= stop < steps
    ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == stop
    second = run_ok(["distill", json.dumps(mapping(run_dir, steps, **PREEMPT))])
    assert [summary_of(f)["steps_run"] for f in second] == [steps - stop] * 2
    # the interrupted 2-process run (resumed) equals the uninterrupted 1-process run over 8 devices
    straight = one_process(tmp_path / "straight", steps, **PREEMPT)
    assert_params_close(params_of(run_dir), straight)
    rows, ref = read_metrics(metrics), read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], atol=1e-5)
    assert [r["rollout/mean_length"] for r in rows] == [r["rollout/mean_length"] for r in ref]
    # each process saved its own data-iterator state (the same global position)
    states = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints" / str(steps) / "data").glob("p*"))]
    assert len(states) == 2 and states[0] == states[1]
