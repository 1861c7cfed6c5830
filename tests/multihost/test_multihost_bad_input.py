"""Multi-process starts that must be refused with one clear line (exit 2), never a hang: an
unreachable coordinator, processes running other code or another config, a run directory only one
process sees, a global batch that does not divide across the processes."""

import shutil
import socket
import subprocess
import sys
import time

import pytest
from multihost_harness import REPO, WORKER, cli, free_port, process_env, run, wait

from jdelta.distributed import DistributedError, wait_for_coordinator
from jdelta.testing import make_seeds, make_tiny_pair, make_tokenizer


def sample_args(model="no-model", prompts="no-prompts.jsonl", out="out", *extra):
    return ["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--n", "1",
            "--max-new-tokens", "2", "--max-pixels", str(64 * 64), "--no-progress", *extra]


def error_lines(done) -> list[str]:
    return [f.stderr.strip().splitlines()[-1] if f.stderr.strip() else "" for f in done]


def test_wait_for_coordinator_times_out_with_one_line():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=rf"coordinator localhost:{port} not reachable within 0.5 s"):
        wait_for_coordinator(f"localhost:{port}", 0.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(DistributedError, match="is not host:port"):
        wait_for_coordinator("localhost", 1)
    with socket.socket() as s:  # a listening port is found at once
        s.bind(("localhost", 0))
        s.listen()
        wait_for_coordinator(f"localhost:{s.getsockname()[1]}", 1)


def test_unreachable_coordinator_is_an_error_within_the_timeout():
    port = free_port()  # nobody listens there: process 0 is never started
    t0 = time.monotonic()
    done = run(cli(*sample_args()), count=1, env={"JDELTA_NUM_PROCESSES": "2", "JDELTA_PROCESS_ID": "1",
                                                  "JDELTA_COORDINATOR": f"localhost:{port}",
                                                  "JDELTA_INIT_TIMEOUT": "3"}, timeout=120)
    assert done[0].returncode == 2
    assert error_lines(done)[0].startswith(f"jdelta sample: error: coordinator localhost:{port} not reachable "
                                           "within 3 s")
    assert time.monotonic() - t0 < 60


def test_missing_process_is_an_error_within_the_timeout():
    t0 = time.monotonic()  # process 0 starts the coordinator; process 1 never comes
    done = run(cli(*sample_args()), count=1, env={"JDELTA_NUM_PROCESSES": "2", "JDELTA_INIT_TIMEOUT": "3"},
               timeout=120)
    assert done[0].returncode == 2
    assert "jdelta: error: not every process joined within 3 s (coordinator localhost:" in done[0].stderr
    assert "2 processes expected" in done[0].stderr
    assert time.monotonic() - t0 < 60


def test_processes_with_different_configs_are_refused():
    port = free_port()
    procs = []
    for i, tokens in enumerate(("2", "3")):  # process 1 asks for other settings
        argv = cli(*sample_args(), "--max-new-tokens", tokens)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *argv], env=process_env(i, 2, port, 1),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = wait(procs, 180)
    assert [f.returncode for f in done] == [2, 2]
    for line in error_lines(done):
        assert "jdelta sample: error: the processes run different resolved config (processes [0] have" in line
        assert "processes [1] have" in line


def test_processes_with_different_code_are_refused(tmp_path):
    copy = tmp_path / "other"
    shutil.copytree(REPO / "jdelta", copy / "jdelta", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    with (copy / "jdelta" / "answers.py").open("a") as f:
        f.write("\n# a changed line\n")
    done = run(cli(*sample_args()), count=2, devices=1, env=[{}, {"PYTHONPATH": str(copy)}], timeout=180)
    assert [f.returncode for f in done] == [2, 2], done[1].stderr[-2000:]
    for line in error_lines(done):
        assert "error: the processes run different jdelta code (or package versions)" in line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    seeds = make_seeds(root / "seeds", 3, seed=1, width=64, height=64)
    tok = make_tokenizer(seeds, root / "tok", vocab_size=320)
    _, student = make_tiny_pair(root / "models", tok, teacher_hidden=32, teacher_layers=1, student_hidden=16,
                                student_layers=1)
    return root, seeds, student


def test_run_directory_only_one_process_sees_is_refused(tiny, tmp_path):
    _, seeds, student = tiny
    cwd = [tmp_path / "host0", tmp_path / "host1"]  # the same relative --out names two directories
    for c in cwd:
        c.mkdir()
    done = run(cli(*sample_args(student, seeds, "run")), count=2, devices=1, cwd=cwd, timeout=180)
    assert [f.returncode for f in done] == [2, 2]
    for line in error_lines(done):
        assert "run directory run is not shared: process(es) 1 (" in line
        assert "cannot see the file process 0 wrote there" in line
    assert not (cwd[0] / "run" / "manifest.json").exists()


def test_global_batch_not_dividing_across_processes_is_refused(tiny, tmp_path):
    _, seeds, student = tiny
    done = run(cli(*sample_args(student, seeds, tmp_path / "out", "--batch-size", "3")), count=2, devices=1,
               timeout=180)
    assert [f.returncode for f in done] == [2, 2]
    for line in error_lines(done):
        assert line == "jdelta sample: error: batch size 3 does not divide across 2 processes"
