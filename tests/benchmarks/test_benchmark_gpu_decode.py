"""benchmarks/gpu_decode.py runs end to end on CPU with the tiny preset and prints its table."""

import importlib.util
import sys
from pathlib import Path

_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_decode_tiny_preset_prints_the_table(capsys):
    sys.path.insert(0, str(_DIR))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_gpu_decode", _DIR / "gpu_decode.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.main(["--preset", "tiny", "--batches", "2", "--repeats", "1", "--skip", "short,sampling",
                  "--hbm-gbps", "100"])
    finally:
        sys.path.remove(str(_DIR))
    out = capsys.readouterr().out
    assert "jax 0." in out.splitlines()[0]  # versions first
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 5, out  # long: dense, bounded; top-p: sort, preselect, grouped
    assert "| long | 40+16 / 512 | dense (512) |" in rows[0]
    assert "bounded (64,128,256,512)" in rows[1] and "speed-up" in rows[1]
    assert all("failed" not in r and "skipped" not in r for r in rows)
    assert "preselect 64" in rows[3] and "grouped 64" in rows[4]
    # --hbm-gbps gives a bound column on CPU too
    assert all(r.split("|")[8].strip() not in ("", "-") for r in rows)
