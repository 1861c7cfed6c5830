"""Start several jdelta processes on this machine as one multi-host program (JAX multi-controller).

Each process gets ``devices`` virtual CPU devices (``--xla_force_host_platform_device_count``), a
localhost coordinator on a free port, Gloo collectives (set by :func:`jdelta.distributed.initialize`)
and the same fp32 matmul precision as the test process, so an N-process run over ``N * devices``
devices can be compared with the one-process run over the same number of devices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices: int, extra: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDELTA_", "XLA_FLAGS"))}
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "JDELTA_DISTRIBUTED": "1",
        "JDELTA_COORDINATOR": f"localhost:{port}",
        "JDELTA_NUM_PROCESSES": str(count),
        "JDELTA_PROCESS_ID": str(index),
        "JDELTA_INIT_TIMEOUT": "60",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        **(extra or {}),
    })
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def start(args: list[str], *, count: int = 2, devices: int = 4, cwd: list[Path] | None = None,
          env: list[dict] | dict | None = None, port: int | None = None) -> list[subprocess.Popen]:
    """Start ``count`` worker processes running ``args`` (``multihost_worker.py`` arguments)."""
    port = free_port() if port is None else port
    procs = []
    for i in range(count):
        extra = env[i] if isinstance(env, list) else env
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *[str(a) for a in args]],
                                      env=process_env(i, count, port, devices, extra),
                                      cwd=str(cwd[i]) if cwd else None, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[Finished]:
    """Wait for every process (killing all of them after ``timeout`` seconds in total)."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGKILL)
            so, se = p.communicate()
            raise AssertionError(f"multi-process run timed out after {timeout} s; stderr of one:\n{se[-3000:]}") from None
        out.append(Finished(p.returncode, so, se))
    return out


def run(args: list[str], *, timeout: float = 300, **kw) -> list[Finished]:
    return wait(start(args, **kw), timeout)


def run_ok(args: list[str], **kw) -> list[Finished]:
    done = run(args, **kw)
    for i, f in enumerate(done):
        assert f.returncode == 0, f"process {i} exited {f.returncode}:\n{f.stderr[-4000:]}"
    return done


def cli(*argv: str) -> list[str]:
    """Worker arguments that run ``jdelta <argv>``."""
    return ["cli", json.dumps(list(argv))]
