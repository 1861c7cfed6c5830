"""benchmarks/sampling.py: its greedy parity row compares every generated token, not a prefix."""

import importlib.util
from pathlib import Path

import numpy as np

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "sampling.py"
_spec = importlib.util.spec_from_file_location("benchmark_sampling", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_greedy_agreement_compares_all_tokens():
    ours = np.arange(4 * 64).reshape(4, 64)
    assert bench.greedy_agreement(ours, ours.copy()) == (True, "True (all 64 tokens of 4 rows)")
    late = ours.copy()
    late[2, 40] += 1  # the first 8 tokens agree; the old check said "True"
    same, text = bench.greedy_agreement(ours, late)
    assert not same
    assert text == "False (3/4 rows identical; first difference at token 40 of 64, row 2)"
    assert bench.greedy_agreement(ours, ours[:, :8]) == (False, "False (shapes (4, 64) vs (4, 8))")
