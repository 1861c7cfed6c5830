"""DeltaPrompts synthesis: seed -> score -> failure modes -> targeted synthesis -> screen -> dataset.

Modules: :mod:`~jdelta.synth.failure_modes` (group scored prompts, rank modes by Δ mass),
:mod:`~jdelta.synth.writer` (teacher-as-writer instructions, parser, validation),
:mod:`~jdelta.synth.steered` (procedural generator steered by Δ mass), :mod:`~jdelta.synth.screen`
(Δ > τ, dedupe, balance), :mod:`~jdelta.synth.pair_scorers` (model pair and oracle pair),
:mod:`~jdelta.synth.units` (resumable, shardable stages), :mod:`~jdelta.synth.pipeline`
(``jdelta pipeline``) and :mod:`~jdelta.synth.synthesize` (``jdelta synthesize``).
"""
