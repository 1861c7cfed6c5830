"""A non-editable install works on its own: ``pip install .`` into a fresh venv, then the CLI from
another directory finds its shipped configs and the trained toy pair (package data) and runs the demo.

Offline: the wheel is built with ``--no-build-isolation --no-index --no-deps`` from a copy of the
sources (so the checkout is untouched); the new venv sees this environment's dependencies through
a ``.pth`` line, but jdelta itself only through the installed wheel. About 40 s on a quiet CPU
(install 3 s, model-info 3 s, a tiny demo on the shipped pair ~35 s); ~55 s on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_wheel_install_runs_from_another_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "jdelta", src / "jdelta", ignore=shutil.ignore_patterns("__pycache__"))

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
                .stdout.strip())
    # the dependencies (and pip, setuptools) of this environment, but not its jdelta: a plain path
    # line does not run the editable install's finder
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        tmp_path)
    shutil.rmtree(src)  # nothing may refer back to the sources

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(py), "-c", "import jdelta; print(jdelta.__file__)"], elsewhere).stdout.strip()
    assert Path(where).is_relative_to(site), where
    jdelta_cli = str(venv / "bin" / "jdelta")

    info = json.loads(run([jdelta_cli, "model-info", "--model", "2b", "--json"], elsewhere).stdout)
    assert info["total"] == 2_127_532_032
    assert Path(info["config"]) == site / "jdelta" / "configs" / "models" / "qwen3-vl-2b.json"
    for shipped in ("distill_demo.yaml", "pipeline_demo.yaml", "meshes/cpu-8.yaml"):
        assert (site / "jdelta" / "configs" / shipped).is_file(), shipped

    for pair in ("", "v2"):  # the trained toy pairs ship as package data
        for role in ("teacher", "student"):
            for name in ("config.json", "model.safetensors", "tokenizer.json", "toy.json"):
                assert (site / "jdelta" / "toy" / "weights" / pair / role / name).is_file(), (pair, role, name)
    assert (site / "jdelta" / "toy" / "weights" / "v2" / "report.md").is_file()
    run([jdelta_cli, "demo", "--out", "D", "--n-prompts", "4", "--heldout-per-family", "2", "--n", "2",
         "--max-new-tokens", "4", "--distill-steps", "1", "--no-progress"], elsewhere)
    summary = json.loads((elsewhere / "D" / "summary.json").read_text())
    assert Path(summary["pair"]) == site / "jdelta" / "toy" / "weights"
    assert summary["accuracy"]["teacher"]["all"]["n"] == 8 and summary["delta_by_family"]["all"]["prompts"] == 4
