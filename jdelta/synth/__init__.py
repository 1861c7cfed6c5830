"""DeltaPrompts synthesis: seed -> score -> failure modes -> targeted synthesis -> screen -> dataset.

Modules: :mod:`~jdelta.synth.pipeline_config` (the typed config, one dataclass per section),
:mod:`~jdelta.synth.failure_modes` (group scored prompts, rank modes by Δ mass),
:mod:`~jdelta.synth.writer` (teacher-as-writer instructions, parser, validation, oracle writer),
:mod:`~jdelta.synth.steered` (procedural generator steered by Δ mass), :mod:`~jdelta.synth.screen`
(Δ > τ, dedupe, balance), :mod:`~jdelta.synth.pair_scorers` (model pair and its teacher writer;
oracle pair), :mod:`~jdelta.synth.unit_runner` (resumable, shardable units; the run directory
several processes share), :mod:`~jdelta.synth.synthesize` (the run with modes + synthesis stages;
candidates from a score run) and :mod:`~jdelta.synth.pipeline` (the full pipeline with rounds).
The CLI verbs are :mod:`jdelta.stages.pipeline` and :mod:`jdelta.stages.synthesize`.
"""
