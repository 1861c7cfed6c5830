"""A trained toy world: a small Qwen3-VL teacher and a smaller student that know something.

* :mod:`jdelta.toy.world`: the question families (charts from :mod:`jdelta.data.charts`), image
  size and disjoint data splits;
* :mod:`jdelta.toy.train`: training from scratch on teacher-forced answer tokens (optax AdamW);
* :mod:`jdelta.toy.evaluate`: held-out accuracy per family with intervals;
* :mod:`jdelta.toy.build`: the whole pair (``jdelta toy-models``).

The pair made by ``jdelta toy-models`` with its defaults ships as package data
(``jdelta/toy/weights/{teacher,student}``, Hugging Face layout); :func:`trained_pair` finds it.
``docs/toy_world.md`` describes the world and every setting tried.
"""

from __future__ import annotations

import json
from pathlib import Path

from jdelta.errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


SHIPPED = {"v1": WEIGHTS_DIR, "v2": WEIGHTS_DIR / "v2"}
"""The shipped pairs: ``v1`` (the default; ``jdelta demo``), ``v2`` (``configs/toy_v2.yaml``: a
hint-trained teacher with multi-token answers and a two-layer student; VA-OPD and ViCuR)."""


def trained_pair(root: str | Path | None = None) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)`` of a trained toy pair: ``root`` (a ``jdelta toy-models`` output
    directory, or the name of a shipped pair, :data:`SHIPPED`) or, by default, the shipped v1 pair."""
    base = SHIPPED["v1"] if root is None else SHIPPED.get(str(root), Path(root))
    dirs = (base / "teacher", base / "student")
    for d in dirs:
        if not (d / "toy.json").is_file() or not (d / "config.json").is_file():
            raise UserError(f"{d}: not a trained toy model (no toy.json/config.json); make one with "
                            "`jdelta toy-models --out DIR`")
    return dirs


def toy_info(model_dir: str | Path) -> dict:
    """The ``toy.json`` of a toy model directory: its world, size, training settings and timing."""
    return json.loads((Path(model_dir) / "toy.json").read_text())


__all__ = ["SHIPPED", "WEIGHTS_DIR", "toy_info", "trained_pair"]
