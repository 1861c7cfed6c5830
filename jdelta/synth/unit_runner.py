"""The resumable, shardable unit runner of the synthesis stages, and the run directory several processes share.

A *map stage* turns a list of input items into output items in fixed-size *units* (the unit of
resume and of sharding). Unit ``u`` writes ``units/unit-00007.jsonl`` (its outputs) and then
``units/unit-00007.counts.json`` (its counts; written last, so a unit is done exactly when its
counts file exists). Process ``i`` of ``P`` runs the units with ``u % P == i``; when every unit
is present, any process *merges* them, in unit order, into ``out.jsonl`` plus ``DONE.json``
(summed counts). A stage with ``DONE.json`` is skipped. A *global stage* is one cheap,
deterministic function of earlier stages' outputs that any process may run. Every file is written
atomically (:func:`jdelta.runs.write_atomic`), so a kill never leaves a half-written file that
counts as done, and two processes merging at once write identical bytes.

Outputs depend only on the unit's inputs and a seed derived from (run seed, stage, unit), never
on which process ran it or how often the run was interrupted, so a resumed or sharded run gives
the same bytes as an uninterrupted single-process run.

:func:`open_run_dir` gives the run directory: a :class:`jdelta.runs.RunDir`, shared between the
processes when ``P > 1`` (see there for the locks).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jdelta.runs import RunDir, dumps_jsonl, read_json, read_jsonl, write_atomic, write_json

DONE = "DONE.json"


class WaitingForShards(RuntimeError):
    """This process finished its units of a stage; other processes' units are still missing."""

    def __init__(self, stage: str, missing: Sequence[int]):
        self.stage = stage
        self.missing = list(missing)
        super().__init__(
            f"stage {stage!r}: this process's units are done; waiting for {len(self.missing)} unit(s) of other "
            f"processes (first: {self.missing[:5]}); rerun once they finish to merge and continue"
        )


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from the run seed and a path of names (stage, round, unit): stable across runs."""
    h = hashlib.sha256(json.dumps([int(seed), *[str(p) for p in parts]]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def add_counts(total: Counter, part: Mapping[str, Any], prefix: str = "") -> None:
    """Add nested integer counts ``part`` into the flat counter ``total`` (keys joined with '.')."""
    for k, v in part.items():
        if isinstance(v, Mapping):
            add_counts(total, v, f"{prefix}{k}.")
        else:
            total[f"{prefix}{k}"] += int(v)


def nest(flat: Mapping[str, int]) -> dict:
    """Inverse of :func:`add_counts`' flattening."""
    out: dict = {}
    for key in sorted(flat):
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = int(flat[key])
    return out


def check_balance(counts: Mapping[str, Any], stage: str) -> None:
    """Raise if ``counts["in"] != counts["out"] + sum(counts["dropped"].values())`` (nothing lost silently)."""
    dropped = sum(int(v) for v in (counts.get("dropped") or {}).values())
    if int(counts["in"]) != int(counts["out"]) + dropped:
        raise RuntimeError(f"stage {stage!r}: counts do not add up: {dict(counts)}")


def stage_done(stage_dir: str | os.PathLike) -> bool:
    return (Path(stage_dir) / DONE).is_file()


def run_global_stage(
    stage_dir: str | os.PathLike, name: str, fn: Callable[[Path], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``fn(stage_dir) -> counts`` unless the stage is already done; ``fn`` writes its files
    atomically, then ``DONE.json`` is written. Returns the stage's DONE content."""
    d = Path(stage_dir)
    if stage_done(d):
        return read_json(d / DONE)
    d.mkdir(parents=True, exist_ok=True)
    counts = fn(d)
    check_balance(counts, name)
    done = {"stage": name, "counts": counts}
    write_json(d / DONE, done)
    return done


def run_map_stage(
    stage_dir: str | os.PathLike,
    name: str,
    items: Sequence[Any],
    unit_size: int,
    fn: Callable[[Sequence[Any], int], tuple[list[dict], dict[str, Any]]],
    *,
    process_index: int = 0,
    num_processes: int = 1,
    wait_seconds: float = 0.0,
    after_unit: Callable[[str, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run a resumable, shardable map stage; returns its DONE content (counts summed over units).

    ``fn(unit_items, unit_index) -> (outputs, counts)``: ``counts`` must hold ``in``, ``out`` (=
    ``len(outputs)``) and ``dropped`` (reason -> count) with ``in == out + sum(dropped)``, plus any
    other integer counts (``in`` counts what the stage accounts for, e.g. parsed questions, which
    need not be the number of items; the runner adds ``items``). ``after_unit(name, u)`` is called after unit ``u`` is written (tests use it to
    simulate a kill). Raises :class:`WaitingForShards` when other processes' units are still
    missing after ``wait_seconds``.
    """
    d = Path(stage_dir)
    if stage_done(d):
        return read_json(d / DONE)
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1, got {unit_size}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} not in [0, {num_processes})")
    units = d / "units"
    units.mkdir(parents=True, exist_ok=True)
    n_units = max(1, -(-len(items) // unit_size))

    def data_path(u: int) -> Path:
        return units / f"unit-{u:05d}.jsonl"

    def counts_path(u: int) -> Path:
        return units / f"unit-{u:05d}.counts.json"

    for u in range(process_index, n_units, num_processes):
        if counts_path(u).is_file() and data_path(u).is_file():
            continue
        chunk = items[u * unit_size : (u + 1) * unit_size]
        outputs, counts = fn(chunk, u)
        counts = {**counts, "items": len(chunk)}
        if int(counts["out"]) != len(outputs):
            raise RuntimeError(f"stage {name!r} unit {u}: counts say {counts['out']} out, fn returned {len(outputs)}")
        check_balance(counts, f"{name} unit {u}")
        write_atomic(data_path(u), dumps_jsonl(outputs))
        write_json(counts_path(u), counts)
        if progress is not None:
            progress(len(chunk))
        if after_unit is not None:
            after_unit(name, u)

    deadline = time.monotonic() + wait_seconds
    while True:
        missing = [u for u in range(n_units) if not (counts_path(u).is_file() and data_path(u).is_file())]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise WaitingForShards(name, missing)
        time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))

    total: Counter = Counter()
    parts = []
    for u in range(n_units):
        add_counts(total, read_json(counts_path(u)))
        parts.append(data_path(u).read_text(encoding="utf-8"))
    counts = nest(total)
    counts.setdefault("dropped", {})
    if int(counts.get("items", 0)) != len(items):
        raise RuntimeError(f"stage {name!r}: units account for {counts.get('items')} items, expected {len(items)}")
    check_balance(counts, name)
    write_atomic(d / "out.jsonl", "".join(parts))
    done = {"stage": name, "units": n_units, "unit_size": unit_size, "counts": counts}
    write_json(d / DONE, done)
    return done


def stage_outputs(stage_dir: str | os.PathLike) -> list[dict]:
    """The merged outputs of a done map stage."""
    return read_jsonl(Path(stage_dir) / "out.jsonl")


# ----------------------------------------------------------------------------- the run directory


def open_run_dir(path: str | os.PathLike, stage: str, *, config: Mapping[str, Any], inputs: Mapping[str, Any],
                 overwrite: bool = False, ignore: Sequence[str] = (), process_index: int = 0,
                 num_processes: int = 1) -> RunDir:
    """The run directory of process ``process_index`` of ``num_processes`` (a
    :class:`~jdelta.runs.RunDir`, shared between the processes when ``num_processes > 1``). Use as
    a context manager. ``ignore``: dotted config keys that may differ from the previous run's."""
    return RunDir(path, stage, config=config, inputs=inputs, overwrite=overwrite, ignore=ignore,
                  process_index=process_index, num_processes=num_processes)

