"""The launch/ scripts, run against stub ``gcloud`` / ``srun`` / ``sbatch`` / ``jdelta`` executables put
first on PATH: each stub appends its argv (and the JDELTA_* environment) to a log, so the tests check
the exact commands the scripts would issue, and their one-line errors for missing or bad arguments.
The remote commands handed to ``gcloud ... ssh --command`` are also run here with bash, against a
stub checkout, to show their quoting reaches jdelta intact. No network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"

STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith(("JDELTA_", "XLA_PYTHON_CLIENT_MEM_FRACTION"))}}
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": name, "argv": sys.argv[1:], "env": env}}) + "\\n")
args = sys.argv[1:]
if name == "gcloud":
    if args[:3] == ["config", "get-value", "project"]:
        print(os.environ.get("STUB_PROJECT", ""))
    elif "describe" in args and "queued-resources" in args:
        print(os.environ.get("STUB_QR_STATE", "ACTIVE"))
    elif "ssh" in args and os.environ.get("STUB_SSH_RC"):
        sys.exit(int(os.environ["STUB_SSH_RC"]))
"""


@pytest.fixture()
def env(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("gcloud", "srun", "sbatch", "jdelta"):
        p = stubs / name
        p.write_text(STUB.format(python=sys.executable))
        p.chmod(0o755)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("JDELTA_", "SLURM_", "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE",
                              "RUNTIME_VERSION", "REPO_DIR", "VENV", "JAX_SPEC"))}
    e.update(PATH=f"{stubs}:/usr/bin:/bin", STUB_LOG=str(tmp_path / "calls.jsonl"), TMPDIR=str(tmp_path),
             VENV=str(tmp_path / "no-venv"), POLL_SECONDS="0")
    return e


def launch(script: str, *args: str, env: dict, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**env, **extra_env}, capture_output=True,
                          text=True, timeout=60)


def calls(env: dict) -> list[dict]:
    log = Path(env["STUB_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def argvs(env: dict, prog: str = "gcloud") -> list[list[str]]:
    return [c["argv"] for c in calls(env) if c["prog"] == prog]


ZP = ["--zone", "us-central2-b", "--project", "proj"]


def test_scripts_are_strict_bash():
    for script in LAUNCH.glob("*.sh"):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash"), script
        assert "set -euo pipefail" in text or "common.sh" in text, script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


# ----------------------------------------------------------------------------------- create


def test_create_on_demand(env):
    r = launch("create_tpu.sh", "--project", "proj", env=env)
    assert r.returncode == 0, r.stderr
    assert argvs(env) == [["compute", "tpus", "tpu-vm", "create", "jdelta", "--accelerator-type", "v4-32",
                           "--version", "tpu-ubuntu2204-base", *ZP]]


def test_create_spot_v5p_with_project_from_gcloud_config(env):
    r = launch("create_tpu.sh", "--name", "jd-v5p", "--type", "v5p-64", "--zone", "us-east5-a", "--spot",
               env=env, STUB_PROJECT="from-config")
    assert r.returncode == 0, r.stderr
    assert argvs(env) == [
        ["config", "get-value", "project"],
        ["compute", "tpus", "tpu-vm", "create", "jd-v5p", "--accelerator-type", "v5p-64", "--version",
         "v2-alpha-tpuv5", "--spot", "--zone", "us-east5-a", "--project", "from-config"],
    ]


def test_create_queued_spot_waits_until_active(env):
    r = launch("create_tpu.sh", "--project", "proj", "--type", "v6e-16", "--queued", "--spot", "--valid-until", "6h",
               "--wait", env=env)
    assert r.returncode == 0, r.stderr
    assert argvs(env) == [
        ["compute", "tpus", "queued-resources", "create", "jdelta-qr", "--node-id", "jdelta", "--accelerator-type",
         "v6e-16", "--runtime-version", "v2-alpha-tpuv6e", "--spot", "--valid-until-duration", "6h", *ZP],
        ["compute", "tpus", "queued-resources", "describe", "jdelta-qr", "--format", "value(state.state)", *ZP],
    ]
    assert "jdelta-qr is ACTIVE" in r.stdout


def test_create_queued_failed_is_an_error(env):
    r = launch("create_tpu.sh", "--project", "proj", "--queued", "--wait", env=env, STUB_QR_STATE="FAILED")
    assert r.returncode == 1
    assert "queued resource jdelta-qr is FAILED" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--name"], "--name needs a value"),
    (["--wait"], "--wait needs --queued"),
    (["--reserved"], "--reserved needs --queued"),
    (["--queued", "--spot", "--reserved"], "--spot and --reserved exclude each other"),
    (["--type", "v9-8"], "unknown accelerator type 'v9-8'"),
    (["--name", "Bad_Name"], "TPU name 'Bad_Name' is not valid"),
])
def test_create_refuses_bad_arguments(env, args, message):
    r = launch("create_tpu.sh", "--project", "proj", *args, env=env)
    assert r.returncode == 2
    assert f"launch/create_tpu.sh: error: {message}" in r.stderr
    assert argvs(env) == []


def test_no_project_is_an_error(env):
    r = launch("create_tpu.sh", env=env)  # gcloud config has no project
    assert r.returncode == 2
    assert "no GCP project: pass --project ID" in r.stderr
    assert argvs(env) == [["config", "get-value", "project"]]


def test_help_prints_usage(env):
    for script in ("create_tpu.sh", "setup_tpu.sh", "run_tpu.sh", "logs_tpu.sh", "stop_tpu.sh", "run_gpu.sh"):
        r = launch(script, "--help", env=env)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: launch/{script}"), script
    assert calls(env) == []


# ----------------------------------------------------------------------------------- setup / run / logs / stop


def test_setup_copies_the_checkout_and_installs(env, tmp_path):
    r = launch("setup_tpu.sh", "--project", "proj", "--name", "jd", env=env)
    assert r.returncode == 0, r.stderr
    tarball = tmp_path / "jdelta_src_jd.tgz"
    scp, ssh = argvs(env)
    assert scp == ["compute", "tpus", "tpu-vm", "scp", str(tarball), "jd:/tmp/jdelta_src.tgz", "--worker=all", *ZP]
    assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "jd", "--worker=all"] and ssh[-4:] == ZP
    remote = ssh[7]
    assert ssh[6] == "--command"
    assert "tar xzf /tmp/jdelta_src.tgz -C ~/jdelta" in remote
    assert r"pip install -q -e . jax\[tpu\]" in remote
    names = subprocess.run(["tar", "tzf", str(tarball)], capture_output=True, text=True, check=True).stdout.split()
    assert "./pyproject.toml" in names and "./launch/run_tpu.sh" in names
    assert not any(n.startswith(("./.git/", "./.venv/")) for n in names)


def _stub_checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "worker" / "jdelta"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("# stub venv\n")
    return repo


def test_run_starts_the_stage_on_all_workers_and_the_quoting_survives(env, tmp_path):
    stage_args = ["distill", "--config", "configs/va opd.yaml", "run_dir=gs://bucket/run1", "note=it's"]
    r = launch("run_tpu.sh", "--project", "proj", "--name", "jd", "--", *stage_args, env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = argvs(env)
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "jd", "--worker=all", "--command"] and ssh[-4:] == ZP
    remote = ssh[7]
    assert remote.startswith("cd ~/jdelta && . .venv/bin/activate && (JDELTA_DISTRIBUTED=1 nohup jdelta distill")
    assert remote.endswith("> run.log 2>&1 < /dev/null & echo $! > jdelta.pid)")
    # Run the remote command here, as a worker would, against a stub checkout and the stub jdelta.
    repo = _stub_checkout(tmp_path)
    worker = subprocess.run(["bash", "-c", remote.replace("cd ~/jdelta", f"cd {repo}")], env=env, timeout=30)
    assert worker.returncode == 0
    for _ in range(100):
        if any(c["prog"] == "jdelta" for c in calls(env)):
            break
        time.sleep(0.05)
    (job,) = [c for c in calls(env) if c["prog"] == "jdelta"]
    assert job["argv"] == stage_args
    assert job["env"]["JDELTA_DISTRIBUTED"] == "1"
    assert (repo / "jdelta.pid").read_text().strip().isdigit()


def test_run_foreground_streams_to_the_log(env, tmp_path):
    r = launch("run_tpu.sh", "--project", "proj", "--foreground", "--log", "logs/a.log", "score", "--n", "8",
               env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = argvs(env)
    assert ssh[7] == "cd ~/jdelta && . .venv/bin/activate && JDELTA_DISTRIBUTED=1 jdelta score --n 8  2>&1 | tee logs/a.log"


@pytest.mark.parametrize("args, message", [
    ([], "no stage given"),
    (["--log", "a b", "score"], "--log 'a b' must be a plain relative path"),
    (["--n", "8"], "unknown option '--n' (jdelta's own flags go after the stage name)"),
    (["Score"], "'Score' is not a jdelta stage name"),
])
def test_run_refuses_bad_arguments(env, args, message):
    r = launch("run_tpu.sh", "--project", "proj", *args, env=env)
    assert r.returncode == 2
    assert f"launch/run_tpu.sh: error: {message}" in r.stderr
    assert argvs(env) == []


def test_logs(env):
    assert launch("logs_tpu.sh", "--project", "proj", env=env).returncode == 0
    assert launch("logs_tpu.sh", "--project", "proj", "--worker", "3", "--lines", "100", "--follow",
                  env=env).returncode == 0
    assert launch("logs_tpu.sh", "--project", "proj", "--all", env=env).returncode == 0
    assert [a[5:8] for a in argvs(env)] == [
        ["--worker=0", "--command", "tail -n 50 ~/jdelta/run.log"],
        ["--worker=3", "--command", "tail -F -n 100 ~/jdelta/run.log"],
        ["--worker=all", "--command", "tail -n 50 ~/jdelta/run.log"],
    ]
    r = launch("logs_tpu.sh", "--project", "proj", "--worker", "x", env=env)
    assert r.returncode == 2 and "--worker must be a worker number or 'all', got 'x'" in r.stderr
    r = launch("logs_tpu.sh", "--project", "proj", "--lines", "many", env=env)
    assert r.returncode == 2 and "--lines must be a number, got 'many'" in r.stderr


def test_stop_sends_sigterm_and_deletes(env, tmp_path):
    r = launch("stop_tpu.sh", "--project", "proj", "--name", "jd", "--timeout", "20", "--delete", env=env)
    assert r.returncode == 0, r.stderr
    ssh, delete = argvs(env)
    assert ssh[:7] == ["compute", "tpus", "tpu-vm", "ssh", "jd", "--worker=all", "--command"]
    assert delete == ["compute", "tpus", "tpu-vm", "delete", "jd", "--quiet", *ZP]
    # The remote command, run here: it stops a process started from the stub checkout.
    repo = _stub_checkout(tmp_path)
    proc = subprocess.Popen(["sleep", "60"])
    reaper = threading.Thread(target=proc.wait, daemon=True)  # reap it at once, as init does on a worker
    reaper.start()
    try:
        (repo / "jdelta.pid").write_text(f"{proc.pid}\n")
        worker = subprocess.run(["bash", "-c", ssh[7].replace("cd ~/jdelta", f"cd {repo}")], capture_output=True,
                                text=True, timeout=30)
        assert worker.returncode == 0, worker.stderr
        assert f"jdelta (pid {proc.pid}) stopped" in worker.stdout
        reaper.join(timeout=5)
        assert proc.returncode == -15  # SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_queued_deletes_the_queued_resource(env):
    r = launch("stop_tpu.sh", "--project", "proj", "--delete", "--queued", env=env)
    assert r.returncode == 0, r.stderr
    assert argvs(env)[1] == ["compute", "tpus", "queued-resources", "delete", "jdelta-qr", "--force", "--quiet", *ZP]


def test_stop_keeps_the_slice_when_a_worker_did_not_stop(env):
    r = launch("stop_tpu.sh", "--project", "proj", "--delete", env=env, STUB_SSH_RC="1")
    assert r.returncode == 1
    assert "some worker's jdelta did not stop; not deleting" in r.stderr
    assert len(argvs(env)) == 1  # the ssh only, no delete


def test_stop_refuses_bad_arguments(env):
    r = launch("stop_tpu.sh", "--project", "proj", "--queued", env=env)
    assert r.returncode == 2 and "launch/stop_tpu.sh: error: --queued needs --delete" in r.stderr
    r = launch("stop_tpu.sh", "--project", "proj", "--timeout", "soon", env=env)
    assert r.returncode == 2 and "--timeout must be a number of seconds, got 'soon'" in r.stderr
    assert argvs(env) == []


# ----------------------------------------------------------------------------------- GPU


def test_gpu_single_host(env):
    r = launch("run_gpu.sh", "sample", "--model", "/models/Qwen3-VL-2B-Instruct", "--n", "8", env=env)
    assert r.returncode == 0, r.stderr
    (job,) = calls(env)
    assert job["prog"] == "jdelta" and job["argv"] == ["sample", "--model", "/models/Qwen3-VL-2B-Instruct", "--n", "8"]
    assert job["env"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}


def test_gpu_sbatch_submits_this_script_in_srun_mode(env):
    r = launch("run_gpu.sh", "--sbatch", "--nodes", "4", "--partition", "h100", "--time", "12:00:00", "--",
               "distill", "--config", "cfg.yaml", env=env)
    assert r.returncode == 0, r.stderr
    assert argvs(env, "sbatch") == [["--nodes", "4", "--ntasks-per-node", "1", "--gpus-per-node", "8", "--job-name",
                                     "jdelta", "--partition", "h100", "--time", "12:00:00",
                                     str(LAUNCH / "run_gpu.sh"), "--srun", "--", "distill", "--config", "cfg.yaml"]]


def test_gpu_srun_inside_an_allocation(env):
    r = launch("run_gpu.sh", "--srun", "--", "distill", "--config", "cfg.yaml", env=env, SLURM_JOB_ID="42")
    assert r.returncode == 0, r.stderr
    (job,) = calls(env)
    assert job["prog"] == "srun"
    assert job["argv"] == ["--ntasks-per-node", "1", "--kill-on-bad-exit", "1", "jdelta", "distill", "--config",
                           "cfg.yaml"]
    assert job["env"]["JDELTA_DISTRIBUTED"] == "1"


def test_gpu_explicit_coordinator(env):
    r = launch("run_gpu.sh", "--coordinator", "10.0.0.1:8476", "--num-processes", "2", "--process-id", "1", "--",
               "score", "--config", "cfg.yaml", env=env)
    assert r.returncode == 0, r.stderr
    (job,) = calls(env)
    assert job["prog"] == "jdelta" and job["argv"] == ["score", "--config", "cfg.yaml"]
    assert job["env"] == {"JDELTA_DISTRIBUTED": "1", "JDELTA_COORDINATOR": "10.0.0.1:8476",
                          "JDELTA_NUM_PROCESSES": "2", "JDELTA_PROCESS_ID": "1",
                          "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "no stage given"),
    (["--coordinator", "10.0.0.1:8476", "score"], {},
     "explicit mode needs all of --coordinator HOST:PORT, --num-processes N and --process-id I"),
    (["--coordinator", "10.0.0.1", "--num-processes", "2", "--process-id", "0", "score"], {},
     "--coordinator must be HOST:PORT, got '10.0.0.1'"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2", "score"], {},
     "--process-id 2 is not below --num-processes 2"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0", "score"], {},
     "--num-processes must be a positive integer, got '0'"),
    (["--sbatch", "score"], {}, "--sbatch needs --nodes N"),
    (["--sbatch", "--nodes", "two", "score"], {}, "--nodes must be a positive integer, got 'two'"),
    (["--nodes", "2", "score"], {}, "--nodes/--gpus-per-node/--partition/--time/--account/--job-name need --sbatch"),
    (["--sbatch", "--nodes", "2", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "score"], {},
     "--coordinator/--num-processes/--process-id cannot be combined with --sbatch"),
    (["--srun", "score"], {}, "--srun runs inside a SLURM allocation (no SLURM_JOB_ID)"),
    (["--gpus", "8", "score"], {}, "unknown option '--gpus'"),
])
def test_gpu_refuses_bad_arguments(env, args, extra, message):
    r = launch("run_gpu.sh", *args, env=env, **extra)
    assert r.returncode == 2
    assert f"launch/run_gpu.sh: error: {message}" in r.stderr
    assert calls(env) == []


def test_gpu_without_jdelta_on_path(env, tmp_path):
    (tmp_path / "stubs" / "jdelta").unlink()
    r = launch("run_gpu.sh", "score", env=env)
    assert r.returncode == 2
    assert "jdelta is not on PATH: install it (launch/run_gpu.sh --install ...) or set VENV" in r.stderr
