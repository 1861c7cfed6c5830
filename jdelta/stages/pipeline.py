"""DeltaPrompts pipeline: seeds -> score -> failure modes -> synthesis -> screen, rounds, resumable and shardable.

    jdelta pipeline --config configs/pipeline_demo.yaml --out runs/pipeline_demo

Writes ``OUT/round-RR/<stage>/`` per round and the dataset in ``OUT/output/`` (layout:
:mod:`jdelta.synth.pipeline`). Rerunning the same command resumes; a different config in ``OUT``
is refused naming the differing keys (``--overwrite`` discards that run). Several processes can
share ``OUT`` (``--num-processes P --process-index i``, each runs every P-th unit): a process
whose units are done but whose siblings' are not exits with code 3; rerun it (or give ``--wait``
seconds) to merge and continue.
"""

from __future__ import annotations

import dataclasses
import sys

from jdelta.config import check
from jdelta.synth.pipeline import Pipeline
from jdelta.synth.pipeline_config import PipelineConfig
from jdelta.synth.unit_runner import WaitingForShards


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(PipelineConfig):
    """out: the run directory. num_processes / process_index: this process's share of the units.
    wait: seconds to wait for the other processes' units. overwrite: discard a run with another
    config in ``out``. progress: progress bars."""

    out: str
    num_processes: int = 1
    process_index: int = 0
    wait: float = 0.0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_processes(self)


def check_processes(cfg) -> None:
    """Range checks of the run options shared by ``pipeline`` and ``synthesize``."""
    check(cfg.num_processes >= 1, "num_processes", f"must be >= 1, got {cfg.num_processes}")
    check(0 <= cfg.process_index < cfg.num_processes, "process_index",
          f"must be in [0, {cfg.num_processes}), got {cfg.process_index}")
    check(cfg.wait >= 0, "wait", f"must be >= 0, got {cfg.wait}")
    check(not (cfg.overwrite and cfg.num_processes > 1), "overwrite",
          "needs num_processes=1 (it discards files that the other processes are writing)")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(cfg: Config) -> int:
    from jdelta import distributed

    if distributed.is_multiprocess() and cfg.num_processes > 1:
        raise distributed.DistributedError(
            "num_processes > 1 (independent processes over file units) and a multi-host run (JDELTA_DISTRIBUTED: "
            "one program over every process) exclude each other; use one of them")
    # multi-host: one program; process 0 writes OUT, the others run in a private copy of it
    with distributed.private_mirror(cfg.out) as out:
        pipeline = Pipeline(out, cfg, process_index=cfg.process_index, num_processes=cfg.num_processes,
                            wait_seconds=cfg.wait, overwrite=cfg.overwrite, progress=cfg.progress, log=log)
        try:
            manifest = pipeline.run()
        except WaitingForShards as e:
            print(f"jdelta pipeline: {e}", file=sys.stderr)
            return 3
    if not distributed.is_primary():
        return 0
    out = manifest["stages"]["output"]
    print(f"output: {out['out']} records ({out['seed_records']} seeds, {out['synthesized_records']} synthesized) "
          f"in {manifest['output']}")
    return 0
