"""VA-OPD mode learns: the teacher scores each rollout on the original and the pixelated image."""

from distill_pair import distill_pair


def test_va_opd_learns():
    # 50 steps: the held-out KL falls to ~0.4x (0.90 -> 0.35; 2-core VM, 2026-11-29)
    before, after, result = distill_pair("va_opd", 50)
    print(f"held-out reverse KL {before:.4f} -> {after:.4f}; {result.time_split()}")
    assert after <= 0.5 * before, (before, after)
    m = result.last_metrics
    assert m["va/positive_fraction"] > 0.0  # the pixelated view changes the teacher's log-probs
    assert 0.0 < m["va/weight_min"] <= m["va/weight_max"] < 1.0
    assert abs(m["va/high_fraction"] - 0.2) < 0.15
