"""The package's layering, read from the source with ``ast`` (no imports are executed).

* A library module (anything outside ``jdelta/stages/`` and ``jdelta/cli.py``) never imports the
  stages layer.
* No module imports another module's private name (``from m import _x``) or reaches into it
  (``m._x``), for jdelta modules ``m``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jdelta

ROOT = Path(jdelta.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def is_stage_layer(mod: str) -> bool:
    return mod == "jdelta.cli" or mod == "jdelta.stages" or mod.startswith("jdelta.stages.")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_module(dotted: str) -> bool:
    return dotted in MODULES


def resolve_from(mod: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"] for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def violations(mod: str, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT.parent)
    found: list[str] = []
    library = not is_stage_layer(mod)
    aliases: dict[str, str] = {}  # local name -> jdelta module it is bound to

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not a.name.startswith("jdelta"):
                    continue
                if library and is_stage_layer(a.name) and a.name != "jdelta.cli":
                    found.append(f"{rel}:{node.lineno}: library module imports the stages layer ({a.name})")
                if any(is_private(p) for p in a.name.split(".")):
                    found.append(f"{rel}:{node.lineno}: imports private module {a.name}")
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases["jdelta"] = "jdelta"
        elif isinstance(node, ast.ImportFrom):
            target = resolve_from(mod, path, node)
            if not (target == "jdelta" or target.startswith("jdelta.")):
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                if library and (is_stage_layer(target) and target != "jdelta.cli" or is_stage_layer(full)):
                    found.append(f"{rel}:{node.lineno}: library module imports the stages layer "
                                 f"(from {target} import {a.name})")
                if any(is_private(p) for p in target.split(".")):
                    found.append(f"{rel}:{node.lineno}: imports from private module {target}")
                if is_private(a.name) and target != mod:
                    found.append(f"{rel}:{node.lineno}: imports private name {a.name} from {target}")
                if is_module(full):
                    aliases[a.asname or a.name] = full
        elif isinstance(node, ast.Call) and library:
            fn = dotted(node.func)
            if fn and fn[-1] == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                name = str(node.args[0].value)
                if is_stage_layer(name):
                    found.append(f"{rel}:{node.lineno}: library module imports the stages layer ({name})")

    # m._x where m is bound to another jdelta module (``import jdelta.x as m``, ``from jdelta import x``,
    # or the full ``jdelta.x._y``)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        chain = dotted(node.value)
        if not chain or chain[0] not in aliases:
            continue
        owner = ".".join([aliases[chain[0]], *chain[1:]])
        if is_module(owner) and owner != mod:
            found.append(f"{rel}:{node.lineno}: uses private name {node.attr} of {owner}")
    return found


def test_modules_found():
    assert {"jdelta.config", "jdelta.runs", "jdelta.cli", "jdelta.stages"} <= set(MODULES)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_layering(mod):
    found = violations(mod, MODULES[mod])
    assert not found, "\n".join(found)


def test_the_checker_catches_violations(tmp_path, monkeypatch):
    """The checker itself: each kind of violation is reported, allowed imports are not."""
    pkg = tmp_path / "jdelta"
    (pkg / "stages").mkdir(parents=True)
    for name in ("__init__.py", "stages/__init__.py", "stages/score.py", "config.py", "runs.py"):
        (pkg / name).write_text("")
    (pkg / "lib.py").write_text(
        "import jdelta.runs as r\n"
        "from jdelta import config\n"
        "from jdelta.stages import score\n"
        "from jdelta.config import _hidden, __version__, public\n"
        "from . import _other\n"
        "import importlib\n"
        "def f():\n"
        "    from jdelta.stages.score import run\n"
        "    importlib.import_module('jdelta.stages.score')\n"
        "    return r._lock, config._describe, jdelta.runs._now, r.public, self._mine\n"
    )
    (pkg / "stages" / "demo.py").write_text("from jdelta.stages import score\nfrom jdelta import runs\nruns.open_atomic\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    monkeypatch.setattr(__import__(__name__), "MODULES",
                        {module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    found = violations("jdelta.lib", pkg / "lib.py")
    text = "\n".join(found)
    assert "jdelta/lib.py:3: library module imports the stages layer (from jdelta.stages import score)" in text
    assert "jdelta/lib.py:8: library module imports the stages layer (from jdelta.stages.score import run)" in text
    assert "jdelta/lib.py:9: library module imports the stages layer (jdelta.stages.score)" in text
    assert "jdelta/lib.py:4: imports private name _hidden from jdelta.config" in text
    assert "jdelta/lib.py:5: imports private name _other from jdelta" in text
    assert "uses private name _lock of jdelta.runs" in text and "uses private name _describe of jdelta.config" in text
    assert "__version__" not in text and "public" not in text and "_mine" not in text
    assert len(found) == 7, text
    assert violations("jdelta.stages.demo", pkg / "stages" / "demo.py") == []  # stages may compose stages


def test_testing_module_needs_no_torch():
    """jdelta.testing is imported by the demo, which must run without torch installed."""
    import subprocess
    import sys

    code = "import sys, jdelta.testing, jdelta.stages.demo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"
