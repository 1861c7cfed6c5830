"""Per-step metrics to a JSONL file and TensorBoard (tensorboardX)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jdelta.runs import open_atomic, read_jsonl


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars (JAX/NumPy/Python) -> plain floats; non-scalars are dropped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size == 1 and np.issubdtype(a.dtype, np.number):
            out[k] = float(a.reshape(()))
    return out


class MetricsLogger:
    """Append one JSON object per step to ``<run_dir>/metrics.jsonl``; mirror scalars to TensorBoard.

    Non-finite values are written as JSON ``null`` (and skipped in TensorBoard). A resumed run
    calls :meth:`truncate` with the restored step first, so the steps a killed run logged after
    its last checkpoint are not logged twice (in TensorBoard they are purged the same way).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = to_python(metrics)
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
        return values

    def truncate(self, step: int) -> int:
        """Drop the rows after ``step`` (and a partial last line a kill left); returns the rows kept.

        The file is rewritten atomically, so a kill during the rewrite leaves the old file.
        """
        self._file.close()
        kept: list[str] = []
        if self.path.is_file():
            lines = self.path.read_bytes().split(b"\n")
            for lineno, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    if lineno == len(lines):  # a row cut short by a kill mid-write
                        break
                    raise ValueError(f"{self.path} line {lineno}: not a JSON metrics row") from None
                if int(row.get("step", 0)) <= step:
                    kept.append(raw.decode("utf-8") + "\n")
            with open_atomic(self.path) as f:
                f.write("".join(kept))
        self._file = self.path.open("a")
        if self._tb is not None:  # TensorBoard hides the older events at steps > step
            from tensorboardX import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)
        return len(kept)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` back (for tests, plots and reports); a bad line names file and line."""
    return read_jsonl(path)
