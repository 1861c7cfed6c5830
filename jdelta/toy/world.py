"""The toy world: which question families, at what image size and difficulty, split how.

A world is a list of :class:`FamilySpec` (a :mod:`jdelta.data.charts` question family asked of
one kind of image at one difficulty) plus one image size. Records come from the procedural
generator, so every answer is exact; splits are disjoint generator seeds (``train``,
``heldout``, ``seeds`` for the demo's Δ scoring, ``distill``), so a held-out record is never a
training record (two draws can only coincide by chance, as two different charts with the same
data).

Each family says what its answer needs (``detail``): ``"coarse"`` families can be answered from
the layout alone (how many lines a receipt has; whether a line ends higher than it starts), so
VA-OPD's pixelated view keeps them answerable; ``"fine"`` ones need small text (the label under
a bar), which pixelation wipes out. This is the design intent; :mod:`jdelta.toy.evaluate`
measures it (the teacher's accuracy on pixelated images, per family).

World v2 options (tried, not yet the shipped pair: docs/toy_world.md, runs 23-33):
``answer_style="reasoned"`` makes answers several tokens long, with the line ``Answer: X`` that
:func:`jdelta.answers.extract_answer` reads; the bar families name the label (fine detail), then
say where the bar is (``bar 3 of 4``; ``"placed"``: the other way round), so the tokens of one answer differ in how much they need
the image and later tokens depend on the sampled label (what VA-OPD's token groups and rollout
weights act on). ``hints="evidence"`` puts the toy's ViCuR hint (:func:`toy_hint`: the evidence in
words a small model can use, never which item is the answer) in ``cues.hint``. Every record
carries its reference completion in ``meta["completion"]`` (``answer_style="short"``, world v1:
the answer alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from jdelta.config import check
from jdelta.data.charts import FAMILY_KINDS, GeneratorConfig, generate_record
from jdelta.data.records import Cues, PromptRecord

SPLITS: dict[str, int] = {"train": 0, "heldout": 1, "seeds": 2, "distill": 3}


@dataclass(frozen=True)
class FamilySpec:
    """One question family of the world: ``family`` asked of ``kind`` images at ``difficulty``.

    detail: what answering needs, by design ("coarse": layout; "fine": small text or marks).
    weight: relative share of each training batch (rows are drawn family by family in turn).
    """

    family: str
    kind: str
    difficulty: int = 1
    detail: Literal["coarse", "fine"] = "fine"
    weight: int = 1

    def __post_init__(self):
        check(self.family in FAMILY_KINDS, "family", f"unknown family {self.family!r}; known: {sorted(FAMILY_KINDS)}")
        check(self.kind in FAMILY_KINDS.get(self.family, ()), "kind",
              f"family {self.family!r} cannot be asked of {self.kind!r} (allowed: {FAMILY_KINDS.get(self.family)})")
        check(self.difficulty in (1, 2, 3), "difficulty", f"must be 1, 2 or 3, got {self.difficulty}")
        check(self.detail in ("coarse", "fine"), "detail", f"must be 'coarse' or 'fine', got {self.detail!r}")
        check(self.weight >= 1, "weight", f"must be >= 1, got {self.weight}")


DEFAULT_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("trend", "line", 1, "coarse", 2),
    FamilySpec("counting", "receipt", 1, "coarse", 1),
    FamilySpec("argmax", "bar", 1, "fine", 3),
    FamilySpec("argmin", "bar", 1, "fine", 3),
)


@dataclass(frozen=True)
class WorldConfig:
    """The world: its families, the image size (multiples of 32 px: the processor keeps it as is),
    and the generator seed every split derives from."""

    families: tuple[FamilySpec, ...] = field(default_factory=lambda: DEFAULT_FAMILIES)
    width: int = 128
    height: int = 96
    seed: int = 0
    answer_style: Literal["short", "reasoned", "placed"] = "short"
    hints: Literal["generator", "evidence"] = "generator"

    def __post_init__(self):
        check(len(self.families) >= 1, "families", "must name at least one family")
        names = [f.family for f in self.families]
        check(len(set(names)) == len(names), "families", f"each family may appear once, got {names}")
        for name in ("width", "height"):
            v = getattr(self, name)
            check(v >= 64 and v % 32 == 0, name, f"must be a multiple of 32 and >= 64, got {v}")
        check(self.answer_style in ("short", "reasoned", "placed"), "answer_style",
              f"must be 'short', 'reasoned' or 'placed', got {self.answer_style!r}")
        check(self.hints in ("generator", "evidence"), "hints", f"must be 'generator' or 'evidence', got {self.hints!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.family for f in self.families)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def spec(self, family: str) -> FamilySpec:
        for f in self.families:
            if f.family == family:
                return f
        raise KeyError(f"family {family!r} is not in the world ({self.names})")


def split_seed(world: WorldConfig, split: str) -> int:
    """The generator seed of ``split`` (disjoint per split and world seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    return 1000 * world.seed + 100 + SPLITS[split]


def reference_completion(record: PromptRecord, style: str = "reasoned") -> str:
    """The completion a toy model is trained to write for ``record``: ``"short"``: the answer;
    ``"reasoned"``: for argmax/argmin on bars ``"Answer: X\nbar K of N"`` (the label, then where
    its bar is, K counted from the left), ``"placed"``: the place first, ``"bar K of N\nAnswer: X"``
    (find the bar, then name it: the order in which a list of labels in a hint can be used); for
    other families ``"Answer: X"``."""
    if style == "short":
        return record.answer or ""
    data = record.meta.get("data", {})
    if record.family in ("argmax", "argmin") and record.meta.get("kind") == "bar":
        values = data["values"]
        k = int(np.argmax(values) if record.family == "argmax" else np.argmin(values)) + 1
        if style == "placed":
            return f"bar {k} of {len(values)}\nAnswer: {record.answer}"
        return f"Answer: {record.answer}\nbar {k} of {len(values)}"
    return f"Answer: {record.answer}"


def toy_hint(record: PromptRecord) -> str:
    """ViCuR's privileged cue for a toy record: the question-relevant evidence in words, which a
    small model can use (no numbers to compare): the bar labels from left to right, the
    receipt's items, the line's point labels. It names the answer among the others for the bar
    families (labelled segments, as METHODS.md's cues do) but never says which one it is."""
    data = record.meta.get("data", {})
    kind = record.meta.get("kind")
    if kind == "bar":
        return "the bars from left to right are labelled " + ", ".join(f"'{x}'" for x in data["labels"])
    if kind == "receipt":
        return "the receipt lists " + ", ".join(data["items"])
    if kind == "line":
        return "the line has points at " + ", ".join(f"'{x}'" for x in data["labels"])
    return record.cues.hint if record.cues is not None else ""


def world_records(world: WorldConfig, split: str, n: int, *, start: int = 0,
                  families: Sequence[str] | None = None) -> list[PromptRecord]:
    """Records ``start .. start+n-1`` of ``split``: families in turn (record ``i`` asks family
    ``i mod F`` of ``families``, default all), each drawn by the generator from ``(seed, i)``, with
    the reference completion in ``meta["completion"]`` and, for ``hints="evidence"``, the toy hint
    (:func:`toy_hint`) in ``cues.hint`` (else the generator's)."""
    names = tuple(families) if families is not None else world.names
    specs = [world.spec(f) for f in names]
    seed = split_seed(world, split)
    out = []
    for i in range(start, start + n):
        spec = specs[i % len(specs)]
        cfg = GeneratorConfig(width=world.width, height=world.height, difficulty=spec.difficulty)
        rec = generate_record(i, seed, spec.family, config=cfg, kind=spec.kind)
        if world.hints == "evidence":
            rec = dataclasses.replace(rec, cues=Cues(boxes=list(rec.cues.boxes) if rec.cues else [], hint=toy_hint(rec)))
        out.append(dataclasses.replace(rec, meta={**rec.meta, "completion": reference_completion(rec, world.answer_style)}))
    return out


def answer_corpus(world: WorldConfig, n: int = 400) -> list[str]:
    """Text for the world's tokenizer: questions and answers of ``n`` training records per family
    (only the train split, so the tokenizer never saw a held-out answer it would not see anyway),
    and each record's hint text as it stands in ``cues.hint``.

    Kept as the shipped v1 pair was made (the hint text alone, not the ``[Hint]:`` block): a
    different corpus gives a different BPE, token ids and trained weights, and ``jdelta
    toy-models`` with the defaults must rebuild the shipped pair byte for byte."""
    text: list[str] = ["user", "assistant", "system"] * 50  # the chat template's role names
    for r in world_records(world, "train", n * len(world.families)):
        text.append(r.question)
        text.append(r.meta["completion"])
        if r.cues is not None:
            text.append(r.cues.hint)
    return text
