"""The papers' claims tested at toy scale on the trained toy pair (``jdelta experiment NAME``).

Each experiment is a module exposing ``Settings`` (frozen dataclass; defaults = the default size,
also written in ``jdelta/configs/experiments/NAME.yaml``), ``SMOKE`` (overrides for the test suite's
smoke size), ``CONDITIONS``, ``describe(settings) -> str`` (markdown) and
``run_seed(settings, seed, workdir, log) -> SeedResult``. :mod:`jdelta.experiments.runner` runs the
seeds (resumable), aggregates mean and 95% t-intervals and writes ``results.md``, ``results.json``
and one PNG per curve; :mod:`jdelta.experiments.common` holds the shared pieces.
"""

from __future__ import annotations

# name -> module
EXPERIMENTS: dict[str, str] = {
    "zero_delta": "jdelta.experiments.zero_delta",
    "va_opd": "jdelta.experiments.va_opd",
    "off_policy": "jdelta.experiments.off_policy",
    "transfer": "jdelta.experiments.transfer",
    "synthesis": "jdelta.experiments.synthesis",
    "vicur": "jdelta.experiments.vicur",
}
