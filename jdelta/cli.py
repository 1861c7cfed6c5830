"""``jdelta <stage> ...``: one entry point for every stage.

Each stage lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their stage runs, so
``jdelta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# stage name -> (module, one-line help). Stages register here.
STAGES: dict[str, tuple[str, str]] = {
    "model-info": ("jdelta.models.qwen3_vl.info", "parameter counts and shapes of a Qwen3-VL config"),
    "make-seeds": ("jdelta.data.make_seeds", "generate chart/table/receipt questions with exact answers"),
    "sample": ("jdelta.sample_stage", "n answers per prompt from a Qwen3-VL checkpoint (KV-cache sampler) to JSONL"),
    "score": ("jdelta.score", "sample n answers from teacher and student per prompt; answer divergence Δ and report"),
    "eval": ("jdelta.evaluate", "greedy / majority-vote answers of one model on benchmark sets, each with its own metric"),
    "distill": ("jdelta.distill.stage", "on-policy distillation (reverse KL / GKD / VA-OPD) or SFT of a student, Orbax resume"),
    "synthesize": ("jdelta.synth.synthesize", "failure modes + targeted candidates (teacher-as-writer, steered generator) from a score run"),
    "pipeline": ("jdelta.synth.pipeline", "DeltaPrompts pipeline: seeds -> score -> failure modes -> synthesis -> screen, rounds, resumable"),
    "demo": ("jdelta.demo", "end-to-end CPU demo on tiny random models: seeds, score, VA-OPD steps, re-score"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jdelta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\njdelta: unknown stage {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    if os.environ.get("JDELTA_DISTRIBUTED") == "1":
        # Multi-host (TPU pod slice / multi-node GPU): every process runs the same program.
        import jax

        jax.distributed.initialize()
    module = importlib.import_module(STAGES[argv[0]][0])
    stage_parser = argparse.ArgumentParser(prog=f"jdelta {argv[0]}", description=STAGES[argv[0]][1])
    module.add_arguments(stage_parser)
    args = stage_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
