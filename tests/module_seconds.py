"""Refresh tests/module_seconds.json (the order in which xdist workers take test modules, see
conftest.py) from the output of ``python -m pytest -v -m "not slow" -n 2 --dist loadfile --durations=0``.

    python tests/module_seconds.py LOG
"""

import collections
import json
import re
import sys
from pathlib import Path


def module_seconds(log: str) -> dict[str, float]:
    """``{module path: seconds}`` summed over its tests' setup, call and teardown, largest first."""
    total: collections.Counter = collections.Counter()
    for m in re.finditer(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)", log, re.M):
        total[m.group(2).split("::")[0]] += float(m.group(1))
    return {k: round(v, 1) for k, v in total.most_common()}


if __name__ == "__main__":
    out = Path(__file__).with_name("module_seconds.json")
    out.write_text(json.dumps(module_seconds(Path(sys.argv[1]).read_text()), indent=1) + "\n")
    print(f"wrote {out}")
