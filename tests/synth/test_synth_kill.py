"""A real kill: SIGKILL a ``jdelta pipeline`` process in the middle of a stage, rerun the same
command, and get the bytes of an uninterrupted run (subprocesses, so slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jdelta.synth.pipeline import run_pipeline

CONFIG = {
    "seed": 3,
    "rounds": 1,
    "unit_size": 8,
    "source": {"n": 48, "width": 64, "height": 48},
    "scorer": {"failing_families": ["trend"]},
    "synthesis": {"writer": {"seeds": 8, "k": 3}, "steered": {"n": 8, "width": 64, "height": 48}},
}


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["round-00/score/units/unit-00002.counts.json", "round-00/synth/DONE.json"])
def test_sigkill_mid_run_then_rerun_matches_uninterrupted(tmp_path, marker):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(CONFIG))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jdelta.cli", "pipeline", "--config", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (run / marker).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "output" / "DONE.json").exists()
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    ref = tmp_path / "ref"
    run_pipeline(ref, CONFIG, log=None)
    for rel in ("output/records.jsonl", "round-00/modes/modes.json", "round-00/screen/DONE.json"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), rel
