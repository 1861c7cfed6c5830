"""The stages layer: one thin module per CLI verb (read its config, call the library, write its run directory).

Each module exposes ``Config`` (a frozen dataclass composed of the shared parts in
:mod:`jdelta.config`) and ``run(cfg: Config) -> int``; its docstring's first line is its help.
Library modules never import this package (``tests/test_layers.py`` checks).
"""

from __future__ import annotations

# verb -> (module, one-line help). Modules are imported only when their verb runs.
STAGES: dict[str, tuple[str, str]] = {
    "model-info": ("jdelta.stages.model_info", "parameter counts and shapes of a model config (Qwen3-VL, Gemma 3)"),
    "make-seeds": ("jdelta.stages.make_seeds", "generate chart/table/receipt questions with exact answers"),
    "sample": ("jdelta.stages.sample", "n answers per prompt from a checkpoint of any family (KV-cache sampler), a run directory"),
    "score": ("jdelta.stages.score", "sample n answers from teacher and student per prompt; answer divergence Δ and report"),
    "write-hints": ("jdelta.stages.write_hints", "ViCuR teacher hints: a model describes the visual evidence; hints stating the answer are rejected"),
    "eval": ("jdelta.stages.evaluate", "greedy / majority-vote answers of one model on benchmark sets, each with its own metric"),
    "distill": ("jdelta.stages.distill", "on-policy distillation (reverse KL / GKD / VA-OPD) or SFT of a student, Orbax resume"),
    "synthesize": ("jdelta.stages.synthesize", "failure modes + targeted candidates (teacher-as-writer, steered generator) from a score run"),
    "pipeline": ("jdelta.stages.pipeline", "DeltaPrompts pipeline: seeds -> score -> failure modes -> synthesis -> screen, rounds, resumable"),
    "toy-models": ("jdelta.stages.toy_models", "train the toy teacher and student from scratch on the chart world (CPU, minutes)"),
    "experiment": ("jdelta.stages.experiment", "a paper's claim as a toy-scale experiment over seeds (jdelta experiment NAME --seeds 3 --out DIR): table with 95% intervals, curves"),
    "demo": ("jdelta.stages.demo", "end-to-end CPU demo on the shipped trained toy pair: accuracies, Δ by family, distillation on Δ > 0 vs random prompts"),
    "plan": ("jdelta.stages.plan", "per-device memory (params, optimizer, grads, KV cache, activations) of a run on a mesh; fits a device? which mesh"),
}
