"""Typed config of the DeltaPrompts synthesis pipeline: one frozen dataclass per section.

:class:`PipelineConfig` (``jdelta pipeline``) is :class:`SynthesisRunConfig` (what failure modes
and synthesis need; all of ``jdelta synthesize``) plus the seed source, rounds, screening and
output. Every default is stated once, here. Choices are ``Literal``; ranges are checked in
``__post_init__`` (:func:`jdelta.config.check`), so a bad value is an error naming its dotted key.

The scorer reuses the shared parts of :mod:`jdelta.config`: ``sampling`` (:class:`SamplingConfig`:
``n`` answers per model per prompt, for the oracle pair too), ``prompt`` (:class:`PromptConfig`)
and ``mesh`` (:class:`MeshConfig`). The pipeline derives every seed from the top-level ``seed``
(round, stage, unit), so ``scorer.sampling.seed`` must stay 0.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jdelta.config import MeshConfig, ModelSpec, PromptConfig, SamplingConfig, check
from jdelta.delta_scoring import DeltaTestConfig

# Choices (tests check they match the library's tables: records.LAYOUTS, failure_modes.OUTCOMES).
Layout = Literal["jdelta", "chartqa", "docvqa", "infovqa", "ai2d", "charxiv"]
Outcome = Literal["student_wrong_teacher_right", "student_inconsistent", "both_wrong", "teacher_wrong_student_right",
                  "disagree", "divergent", "zero_delta"]
GroupBy = Literal["family", "category", "answer_type"]
ZeroDeltaTest = Literal["exact", "permutation", "posterior"]


def _unit_interval(value: float | None, name: str) -> None:
    check(value is None or 0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Round-0 seeds.

    kind: ``procedural`` (the chart generator: ``n`` records of ``families`` at ``difficulty``
    1..3, ``width`` x ``height`` pixels), ``records`` (``path``: a ``.jsonl`` / ``.array_record``
    / dataset dir; ``layout``: a benchmark's dict layout for a ``.jsonl`` / ``.json``), ``tfds``
    (``path``: a prepared builder dir, ``split``), ``hf_disk`` (a ``save_to_disk`` dir, ``split``).
    """

    kind: Literal["procedural", "records", "tfds", "hf_disk"] = "procedural"
    path: str | None = None
    layout: Layout = "jdelta"
    split: str | None = None
    n: int = 256
    families: tuple[str, ...] | None = None
    difficulty: int | dict[str, int] = 2
    width: int = 128
    height: int = 96

    def __post_init__(self):
        check(self.kind == "procedural" or bool(self.path), "path", f"is required for kind={self.kind}")
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.width >= 16 and self.height >= 16, "width", f"images must be at least 16x16, got "
              f"{self.width}x{self.height}")
        levels = self.difficulty.values() if isinstance(self.difficulty, dict) else [self.difficulty]
        check(all(lv in (1, 2, 3) for lv in levels), "difficulty", f"levels must be 1, 2 or 3, got {self.difficulty}")
        if self.families is not None:
            from jdelta.data.charts import FAMILIES

            unknown = [f for f in self.families if f not in FAMILIES]
            check(not unknown and len(self.families) > 0, "families",
                  f"unknown {unknown} (known: {', '.join(FAMILIES)})" if unknown else "must not be empty")


@dataclasses.dataclass(frozen=True)
class ScreeningDeltaTest(DeltaTestConfig):
    """:class:`~jdelta.delta_scoring.DeltaTestConfig` with screening-sized zero-Δ tests: the
    pipeline scores every seed and candidate, so its Monte-Carlo tests are 10x smaller."""

    num_permutations: int = 99
    num_posterior_draws: int = 100


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """The teacher/student pair that gives Δ per prompt.

    kind: ``models`` (``teacher`` and ``student``: Hugging Face checkpoints, a path or a
    :class:`~jdelta.config.ModelSpec`; ``tokenizer`` default: the teacher's; ``prompt``, ``delta``
    and ``mesh`` as in ``jdelta score``) or ``oracle`` (a toy
    pair whose student fails ``failing_families`` with probability ``fail_rate``; each model errs
    at its ``*_noise`` rate elsewhere; tests and benchmarks). ``sampling.n`` answers per model per
    prompt for both kinds. ``engine`` / ``engine_slots`` (``kind=models``): static batches or
    continuous batching, as in ``jdelta score`` (the same answers; not part of the run's identity).
    """

    kind: Literal["oracle", "models"] = "oracle"
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    delta: ScreeningDeltaTest = dataclasses.field(default_factory=ScreeningDeltaTest)
    failing_families: tuple[str, ...] = ("trend",)
    fail_rate: float = 0.85
    teacher_noise: float = 0.05
    student_noise: float = 0.05
    teacher: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    student: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    tokenizer: str | None = None
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    engine: Literal["static", "continuous"] = "static"
    engine_slots: int | None = None

    def __post_init__(self):
        check(self.engine_slots is None or self.engine_slots >= self.sampling.n, "engine_slots",
              f"must be >= sampling.n ({self.sampling.n}), got {self.engine_slots}")
        check(self.engine == "static" or self.mesh.is_single_device, "engine",
              "continuous runs on one device in one process; use engine=static with a mesh")
        for name in ("fail_rate", "teacher_noise", "student_noise"):
            _unit_interval(getattr(self, name), name)
        if self.kind == "models":
            check(bool(self.teacher.path), "teacher", "needs a checkpoint directory for kind=models (teacher.path)")
            check(bool(self.student.path), "student", "needs a checkpoint directory for kind=models (student.path)")
        check(self.sampling.seed == 0, "sampling",
              f"seed must stay 0 (got {self.sampling.seed}): the pipeline derives every seed from the top-level seed")


@dataclasses.dataclass(frozen=True)
class FailureModesConfig:
    """Grouping scored prompts into modes (:mod:`jdelta.synth.failure_modes`).

    group_by: the record field a mode groups by. zero_delta_test: which zero-Δ flag makes an
    outcome ``zero_delta``. consistency: below this share of its top answer the student is
    ``student_inconsistent``. targets: outcomes synthesis aims at. top: at most this many modes.
    """

    group_by: GroupBy = "family"
    zero_delta_test: ZeroDeltaTest = "exact"
    consistency: float = 0.75
    targets: tuple[Outcome, ...] = ("student_wrong_teacher_right", "student_inconsistent")
    top: int | None = None

    def __post_init__(self):
        check(0.0 < self.consistency <= 1.0, "consistency", f"must be in (0, 1], got {self.consistency}")
        check(len(self.targets) > 0, "targets", "must name at least one outcome")
        check(self.top is None or self.top >= 1, "top", f"must be >= 1 (or null for all), got {self.top}")


@dataclasses.dataclass(frozen=True)
class WriterConfig:
    """Teacher-as-writer: ``seeds`` seed prompts of the targeted modes get ``k`` new questions each.

    kind: ``teacher`` (the scorer's teacher model writes; needs ``scorer.kind=models``; sampled at
    ``temperature`` / ``top_p``, at most ``max_new_tokens``) or ``oracle`` (deterministic
    rephrasings with ``malformed_rate`` malformed generations). near_duplicate: word-Jaccard above
    which a written question counts as a copy.
    """

    kind: Literal["oracle", "teacher"] = "oracle"
    seeds: int = 64
    k: int = 3
    malformed_rate: float = 0.25
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    near_duplicate: float = 0.8

    def __post_init__(self):
        check(self.seeds >= 0, "seeds", f"must be >= 0, got {self.seeds}")
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        _unit_interval(self.malformed_rate, "malformed_rate")
        check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _unit_interval(self.near_duplicate, "near_duplicate")


@dataclasses.dataclass(frozen=True)
class SteeredConfig:
    """Procedural records steered by Δ mass: ``n`` draws of (family, difficulty); every pair keeps
    at least ``floor`` of the top weight; images ``width`` x ``height``."""

    n: int = 64
    floor: float = 0.05
    width: int = 128
    height: int = 96

    def __post_init__(self):
        check(self.n >= 0, "n", f"must be >= 0, got {self.n}")
        _unit_interval(self.floor, "floor")
        check(self.width >= 16 and self.height >= 16, "width", f"images must be at least 16x16, got "
              f"{self.width}x{self.height}")


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Candidate generation: the writer, the steered generator, and how many screened prompts
    (highest Δ first) seed the next round."""

    writer: WriterConfig = dataclasses.field(default_factory=WriterConfig)
    steered: SteeredConfig = dataclasses.field(default_factory=SteeredConfig)
    next_round_seeds: int = 256

    def __post_init__(self):
        check(self.next_round_seeds >= 1, "next_round_seeds", f"must be >= 1, got {self.next_round_seeds}")


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    """Which candidates are kept: Δ > ``tau``; teacher accuracy >= ``min_teacher_accuracy`` (null:
    no check); no exact or near (word-Jaccard >= ``near_duplicate``) duplicate on the same image;
    at most ``shares[group]`` of the kept per ``balance_by`` group (empty: no caps)."""

    tau: float = 0.0
    min_teacher_accuracy: float | None = 0.5
    near_duplicate: float = 0.8
    shares: dict[str, float] = dataclasses.field(default_factory=dict)
    balance_by: GroupBy = "family"

    def __post_init__(self):
        _unit_interval(self.min_teacher_accuracy, "min_teacher_accuracy")
        _unit_interval(self.near_duplicate, "near_duplicate")
        bad = {k: v for k, v in self.shares.items() if not 0.0 <= v <= 1.0}
        check(not bad, "shares", f"each share must be in [0, 1], got {bad}")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """The dataset: screened candidates of every round, plus (``include_seeds``) the round-0 seeds
    with Δ > ``screen.tau``; ``jsonl`` or ``array_record`` records."""

    include_seeds: bool = True
    format: Literal["jsonl", "array_record"] = "jsonl"


@dataclasses.dataclass(frozen=True)
class SynthesisRunConfig:
    """Failure modes and targeted synthesis (``jdelta synthesize``; the core of the pipeline).

    seed: every random draw derives from it (round, stage, unit). unit_size: items per unit, the
    unit of resume and of sharding across processes.
    """

    seed: int = 0
    unit_size: int = 64
    scorer: ScorerConfig = dataclasses.field(default_factory=ScorerConfig)
    failure_modes: FailureModesConfig = dataclasses.field(default_factory=FailureModesConfig)
    synthesis: SynthesisConfig = dataclasses.field(default_factory=SynthesisConfig)

    def __post_init__(self):
        check(self.unit_size >= 1, "unit_size", f"must be >= 1, got {self.unit_size}")
        check(self.synthesis.writer.kind != "teacher" or self.scorer.kind == "models", "synthesis",
              "writer.kind=teacher needs scorer.kind=models (the scorer's teacher writes)")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(SynthesisRunConfig):
    """The whole DeltaPrompts pipeline (``jdelta pipeline``): ``rounds`` of seeds -> score ->
    failure modes -> synthesis -> screen, then the output dataset."""

    rounds: int = 1
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    screen: ScreenConfig = dataclasses.field(default_factory=ScreenConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def __post_init__(self):
        super().__post_init__()
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")


def narrow(cfg: SynthesisRunConfig, cls: type[SynthesisRunConfig]) -> SynthesisRunConfig:
    """``cfg`` (e.g. a stage's Config, a subclass carrying run options) as exactly ``cls``."""
    if type(cfg) is cls:
        return cfg
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
