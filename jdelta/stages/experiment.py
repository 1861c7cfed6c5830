"""run one of the papers' claims as a toy-scale experiment over seeds: results.md table with 95% intervals, PNG curves

``jdelta experiment NAME --seeds 3 --out DIR [--smoke] [settings.KEY=VALUE ...]`` runs experiment
``NAME`` (one of :data:`jdelta.experiments.EXPERIMENTS`) on the shipped trained toy pair
(``docs/toy_world.md``), seeds ``0 .. seeds-1``, in the run directory ``DIR``: one
``seed-K/result.json`` per seed (a rerun skips finished seeds; other settings in the same directory
are refused, ``--overwrite`` starts over), then ``results.md`` (the setup, mean and 95% t-interval
over seeds per condition and metric, every seed's values, time), ``results.json`` and one PNG per
curve.

Settings: the experiment's defaults (its default size, written in
``configs/experiments/NAME.yaml``) <- its smoke size with ``--smoke`` <- ``settings.KEY=VALUE``
overrides (``jdelta experiment NAME --help`` does not list them: see the results document or
``describe`` of ``jdelta/experiments/NAME.py``). An unknown key is refused naming the closest one.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from typing import Any

from jdelta.config import check

POSITIONAL = "name"
"""``jdelta experiment NAME ...``: a first bare argument is the experiment's name."""


@dataclasses.dataclass(frozen=True)
class Config:
    """name: the experiment (zero_delta, va_opd, ...). out: run directory. seeds: seeds 0 .. seeds-1.
    smoke: the test suite's small size. settings: overrides of the experiment's settings.
    overwrite: discard a previous run in ``out``."""

    name: str
    out: str
    seeds: int = 3
    smoke: bool = False
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    overwrite: bool = False

    def __post_init__(self):
        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")


def run(cfg: Config) -> int:
    from jdelta.experiments.runner import resolve_settings, run_experiment

    settings = resolve_settings(cfg.name, cfg.settings, smoke=cfg.smoke)
    command = "jdelta " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None
    summary = run_experiment(cfg.name, cfg.out, seeds=cfg.seeds, settings=settings, overwrite=cfg.overwrite,
                             log=lambda m: print(m, flush=True), command=command)
    print(f"\n{cfg.out}/results.md ({len(summary['seeds'])} seeds)", flush=True)
    return 0
