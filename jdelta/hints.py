"""Model-written hints for ViCuR's privileged teacher: the instruction, the parser and the answer-leak check.

ViCuR's teacher sees ``question + [Hint]: ...`` where the hint describes the question-relevant
visual evidence (labelled segments, tick marks, angles, values) without giving the answer
(``shared/METHODS.md``). Who writes the hints is not published; for records that carry none,
``jdelta write-hints`` asks a configurable model with :data:`DEFAULT_INSTRUCTION` and checks what
it writes:

1. :func:`parse_hint`: thinking is removed (``<think>...</think>``; a block never closed means the
   writer ran out of tokens while thinking: ``unparseable``), then the text after the last
   ``Hint:`` marker (``**Hint:**``, ``[Hint]:`` too) is taken, or the whole answer when there is
   none; quotes and markdown bold are peeled and whitespace collapsed.
2. :func:`check_hint` rejects, by reason (:data:`REJECT_REASONS`): ``unparseable``, ``empty`` (no
   letter or digit left), ``answer_leak`` (:func:`find_leak`), ``too_long`` (over
   ``HintChecks.max_chars``; not cut, a cut hint may lose its evidence), ``truncated`` (the writer
   hit ``max_new_tokens``: the hint may stop mid-sentence).
3. :func:`find_leak`: a hint leaks when it states any accepted answer (``PromptRecord.answers``,
   and an option's text for choice questions). Numbers compare by value (``"1,200"`` ==
   ``"about 1200"`` == ``"1.2K"`` == ``"1.2 thousand"``; cardinal words such as ``"twelve"`` too,
   signs ignored); text answers by whole-word normalised substring (:func:`jdelta.answers.normalize_text`);
   ``yes``/``no`` when the word stands as an answer (followed by punctuation or the end, or after
   "answer is"); a choice letter in an explicit form (``(B)``, ``option B``, ``answer: B``). The
   check is string-level and conservative: a hint listing every bar label also names a text
   answer and is rejected; a hint that implies the answer without stating it passes.

The model writer (:class:`ModelHintWriter`) samples the instruction on the record's image through
the one batch path (:mod:`jdelta.completions`). :func:`hint_entries` turns a list of records into
one audit entry each (status ``hinted`` / ``kept`` / ``rejected`` / ``unreadable``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from jdelta.answers import (
    normalize_answer,
    normalize_text,
    parse_choice,
    parse_number,
    parse_yes_no,
    strip_thinking,
)
from jdelta.config import check
from jdelta.data.records import Cues, PromptRecord, RecordError, infer_answer_type

if TYPE_CHECKING:
    from jdelta.config import ModelSpec, PromptConfig, SamplingConfig

REJECT_REASONS = ("answer_leak", "empty", "too_long", "truncated", "unparseable", "no_reference", "prompt_failed")
"""Why a record gets no new hint. ``no_reference``: no reference answer to check a hint against
(``require_reference``); ``prompt_failed``: the writer's prompt could not be built (unreadable
image, prompt over the longest sequence bucket)."""

STATUSES = ("hinted", "kept", "rejected", "unreadable")

DEFAULT_INSTRUCTION = (
    "Question about the image: {question}\n"
    "Do not answer the question. Write a hint for someone who will answer it: describe only the visual "
    "evidence in the image that the question needs (the relevant labels, values, tick marks, segments, "
    "angles, rows or positions, as they appear). Do not state, compute or suggest the answer, and do not "
    "say which option is correct.\n"
    'Reply with one short paragraph that starts with "Hint:".'
)
"""The writer's default instruction (jdelta's wording; ViCuR does not publish how its cues were
written). It follows METHODS.md's description of a cue (question-relevant visual structure, not
the answer) and withholds the reference answer from the writer: a writer that does not know the
answer can only leak it by solving the question, which :func:`find_leak` catches when it is stated."""

INSTRUCTION_FIELDS = ("question", "answer")
"""Placeholders an instruction template may use: ``{question}`` (required) and ``{answer}`` (the
reference answer; not in the default, since a writer shown the answer leaks it more often)."""

MAX_KEPT_TEXT = 2000
"""Characters of each raw writer output kept in the audit entries."""


@dataclasses.dataclass(frozen=True)
class HintChecks:
    """What a written hint must pass.

    max_chars: longest accepted hint (characters, after parsing); longer ones are rejected
    (``too_long``), not cut. reject_truncated: reject a generation that hit ``max_new_tokens``.
    number_rel_tol: relative tolerance under which a number in the hint equals a numeric answer.
    """

    max_chars: int = 600
    reject_truncated: bool = True
    number_rel_tol: float = 1e-6

    def __post_init__(self):
        check(self.max_chars >= 1, "max_chars", f"must be >= 1, got {self.max_chars}")
        check(0 <= self.number_rel_tol < 1, "number_rel_tol", f"must be in [0, 1), got {self.number_rel_tol}")


# ----------------------------------------------------------------------------- instruction


def check_instruction(template: str) -> None:
    """Raise ``ValueError("instruction: ...")`` unless ``template`` formats with :data:`INSTRUCTION_FIELDS`
    and uses ``{question}``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"instruction: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    for f in fields:
        name = re.split(r"[.\[!:]", f, maxsplit=1)[0]
        if name not in INSTRUCTION_FIELDS:
            raise ValueError(f"instruction: unknown placeholder {{{f}}}; known: "
                             f"{', '.join('{' + k + '}' for k in INSTRUCTION_FIELDS)}")
    if "question" not in fields:
        raise ValueError("instruction: must contain the {question} placeholder")


def build_instruction(template: str, record: PromptRecord) -> str:
    """The writer's prompt text for ``record`` (``template`` checked by :func:`check_instruction`)."""
    return template.format(question=record.question.strip(), answer=(record.answer or "").strip())


# ----------------------------------------------------------------------------- parsing

_MARKER = re.compile(r"(?:^|(?<=[\s*#>(]))\**\[?hint\]?\**\s*[:：]\s*\**", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’"}


def _peel(text: str) -> str:
    """Whitespace collapsed, markdown bold and one pair of wrapping quotes removed."""
    s = " ".join(text.split()).strip("*").strip()
    if len(s) >= 2 and _QUOTE_PAIRS.get(s[0]) == s[-1]:
        s = s[1:-1].strip()
    return s


def parse_hint(text: str) -> tuple[str | None, str | None]:
    """``(hint, None)`` from one writer generation, or ``(None, "unparseable" | "empty")``."""
    low = text.lower()
    tail = low[low.rfind("</think>") + len("</think>"):] if "</think>" in low else low
    if "<think>" in tail:  # a thinking block that never closed: the writer ran out of tokens while thinking
        return None, "unparseable"
    body = strip_thinking(text)
    marks = list(_MARKER.finditer(body))
    if marks:
        body = body[marks[-1].end() :]
    hint = _peel(body)
    if not any(ch.isalnum() for ch in hint):
        return None, "empty"
    return hint, None


# ----------------------------------------------------------------------------- the leak check

_NUMBER_MENTION = re.compile(
    r"(?<![\w.,])[$€£¥₹]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"(?:\s*/\s*\d+)?"
    r"(?:\s*(?:%|percent\b)|(?:[kKMB]|bn|mn)(?![A-Za-z])|\s+(?:thousand|million|billion|trillion)\b)?"
    r"(?![A-Za-z\d])"
)
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = frozenset({"hundred", "thousand", "million", "billion", "trillion"})
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_TENS) | _SCALES


def _word_numbers(text: str) -> list[str]:
    """Runs of cardinal words that read as one number: ``"twenty-one"``, ``"one hundred and five"``;
    ``"two and three"`` and ``"one two"`` are two numbers each; punctuation and digits end a run."""
    runs: list[list[str]] = []
    run: list[str] = []
    for tok in [*re.findall(r"[a-z]+|\d+|[^\s\w-]", text.lower()), "."]:
        prev = run[-1] if run else None
        if tok == "and" and prev in _SCALES:
            run.append(tok)
            continue
        if tok in _NUMBER_WORDS:
            joins = prev is not None and (prev in _SCALES or prev == "and" or tok in _SCALES
                                          or (prev in _TENS and tok in _UNITS[1:10]))
            if not joins and run:
                runs.append(run)
                run = []
            run.append(tok)
            continue
        if run:
            runs.append(run)
            run = []
    out = []
    for r in runs:
        while r and r[-1] == "and":
            r = r[:-1]
        if r and not set(r) <= _SCALES | {"and"}:  # "1.2 million": the digits carried the number
            out.append(" ".join(r))
    return out


def number_mentions(text: str) -> list[float]:
    """Every number a text states: digit forms (``1,200``, ``45%``, ``1.5K``, ``3/4``, ``$12``) and
    cardinal words (:func:`_word_numbers`). Signs are ignored (absolute values)."""
    values = []
    pieces = [m.group(0) for m in _NUMBER_MENTION.finditer(text)] + _word_numbers(text)
    for piece in pieces:
        v = parse_number(piece)
        if v is not None and math.isfinite(v):
            values.append(abs(float(v)))
    return values


def _number_of(answer: str, answer_type: str) -> float | None:
    """The value of a numeric answer (``answer_type`` number, or a bare number of another type)."""
    if answer_type != "number" and infer_answer_type(answer) != "number":
        return None
    norm = normalize_answer(answer, "number")
    return abs(float(norm.value)) if norm.kind == "number" else None


def _contains_words(text_norm: str, phrase: str) -> bool:
    phrase = normalize_text(phrase)
    return bool(phrase) and f" {phrase} " in f" {text_norm} "


def _states_yes_no(hint: str, word: str) -> bool:
    standalone = rf"\b{word}\b(?=\s*(?:[,.;:!?)\]]|$))"
    stated = rf"\banswer\W+(?:is\W+|would\s+be\W+)?{word}\b"
    return bool(re.search(standalone, hint, re.IGNORECASE) or re.search(stated, hint, re.IGNORECASE))


def _states_choice(hint: str, letter: str) -> bool:
    forms = (rf"[(\[]{letter}[)\]]", rf"\b(?:option|choice)\s*\(?{letter}\b", rf"\banswer\W+(?:is\W+)?\(?{letter}\b")
    return any(re.search(f, hint, re.IGNORECASE if i else 0) for i, f in enumerate(forms))


def find_leak(hint: str, answers: Sequence[str], answer_type: str = "text", *, rel_tol: float = 1e-6,
              option_texts: Sequence[str] = ()) -> str | None:
    """The first accepted answer ``hint`` states (see the module docstring), else None.

    answers: every accepted reference answer; answer_type: the record's (``number``, ``text``,
    ``yes_no``, ``choice``); option_texts: the text of the right option of a choice question.
    """
    mentions: list[float] | None = None
    hint_norm = normalize_text(hint)
    for answer in [*answers, *option_texts]:
        if not answer or not answer.strip():
            continue
        is_option = answer not in answers
        kind = "text" if is_option else answer_type
        if kind == "yes_no" or (kind == "text" and answer.strip().lower() in ("yes", "no")):
            word = parse_yes_no(answer)
            if word is not None and _states_yes_no(hint, word):
                return answer
            continue
        if kind == "choice":
            letter = parse_choice(answer)
            if letter is not None:
                if _states_choice(hint, letter):
                    return answer
                continue
        value = _number_of(answer, kind)
        if value is not None:
            mentions = number_mentions(hint) if mentions is None else mentions
            if any(math.isclose(m, value, rel_tol=rel_tol, abs_tol=1e-9) for m in mentions):
                return answer
            continue
        if _contains_words(hint_norm, answer):
            return answer
    return None


def option_texts_of(record: PromptRecord) -> list[str]:
    """The right option's text of a choice question (``meta["answer_text"]``, as AI2D records carry)."""
    text = (record.meta or {}).get("answer_text")
    return [text] if record.answer_type == "choice" and isinstance(text, str) and text.strip() else []


@dataclasses.dataclass(frozen=True)
class HintVerdict:
    """One generation checked: the accepted ``hint`` or a rejection ``reason`` (and the answer it leaked)."""

    hint: str | None
    reason: str | None
    leaked: str | None = None


def check_hint(text: str, record: PromptRecord, *, finish_reason: str = "stop",
               checks: HintChecks = HintChecks()) -> HintVerdict:
    """Parse and check one writer generation for ``record`` (reasons in the module docstring's order)."""
    hint, reason = parse_hint(text)
    if hint is None:
        return HintVerdict(None, reason)
    leaked = find_leak(hint, record.answers or [], record.answer_type, rel_tol=checks.number_rel_tol,
                       option_texts=option_texts_of(record))
    if leaked is not None:
        return HintVerdict(None, "answer_leak", leaked)
    if len(hint) > checks.max_chars:
        return HintVerdict(None, "too_long")
    if finish_reason == "length" and checks.reject_truncated:
        return HintVerdict(None, "truncated")
    return HintVerdict(hint, None)


# ----------------------------------------------------------------------------- records


def existing_hint(record: PromptRecord) -> str | None:
    """The record's own cue hint (``cues.hint``), or None."""
    return record.cues.hint.strip() if record.cues is not None and record.cues.hint.strip() else None


def with_written_hint(record: PromptRecord, hint: str, source: dict[str, Any]) -> PromptRecord:
    """``record`` with ``cues.hint = hint`` (its boxes kept) and ``provenance["hint"] = source``."""
    boxes = list(record.cues.boxes) if record.cues is not None else []
    return dataclasses.replace(record, cues=Cues(boxes=boxes, hint=hint),
                               provenance={**record.provenance, "hint": dict(source)})


# ----------------------------------------------------------------------------- writers


@dataclasses.dataclass
class Generation:
    """A writer's output for one record: ``texts`` / ``finish_reasons`` (``"stop"`` / ``"length"``) of its
    samples, or ``failure`` (a short reason) and ``detail`` when its prompt could not be built."""

    texts: list[str] = dataclasses.field(default_factory=list)
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    failure: str | None = None
    detail: str | None = None


class HintWriter(Protocol):
    """Anything that samples one instruction per record on the record's images."""

    def write(self, records: Sequence[PromptRecord], instructions: Sequence[str], key) -> list[Generation]: ...


class ModelHintWriter:
    """A checkpoint of any model family as hint writer: each instruction becomes the question of a prompt on its
    record's images (chat template, image processing, bucketed batches), ``sampling.n`` samples each."""

    def __init__(self, session, spec: ModelSpec, tokenizer, *, prompt: PromptConfig, sampling: SamplingConfig):
        from jdelta.completions import sampling_params
        from jdelta.models.family import prompt_special_tokens
        from jdelta.models.loading import pipeline_config_for

        model, model_config = session.load(spec, role="model")
        special = prompt_special_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.pipeline = pipeline_config_for(model_config, prompt, batch_size=sampling.batch_size)
        self.params = sampling_params(sampling, special.stop_ids)
        self.sampler = session.sampler(model, pipeline=self.pipeline, pad_id=special.pad)

    def write(self, records: Sequence[PromptRecord], instructions: Sequence[str], key) -> list[Generation]:
        """One :class:`Generation` per record; a prompt the pipeline leaves out gets ``failure`` = its reason."""
        import jax

        from jdelta.completions import prompt_batches, sample_texts

        prompts = [PromptRecord(id=r.id, images=list(r.images), question=ins, answer=None, answer_type="text",
                                category=r.category, family=r.family)
                   for r, ins in zip(records, instructions, strict=True)]
        out = [Generation() for _ in prompts]
        batches = prompt_batches(prompts, self.tokenizer, self.pipeline)
        for b, batch in enumerate(batches):
            texts, finish = sample_texts(self.sampler, self.tokenizer, batch.inputs, self.params,
                                         jax.random.fold_in(key, b))
            for i, t, f in zip(batch.indices, texts, finish, strict=True):
                out[i] = Generation(list(t), [str(x) for x in f])
        for s in batches.skipped:
            out[int(s["record_index"])] = Generation(failure=str(s["reason"]), detail=str(s["message"]))
        return out


# ----------------------------------------------------------------------------- one batch of records


def hint_entries(items: Sequence[tuple[int, PromptRecord | RecordError]], writer: HintWriter | None, key, *,
                 instruction: str = DEFAULT_INSTRUCTION, checks: HintChecks = HintChecks(),
                 require_reference: bool = True) -> list[dict[str, Any]]:
    """One audit entry per ``(index, record or the error that kept it from parsing)``, in order.

    Entry: ``{"index", "id", "status", "reason", "hint", "leaked", "candidates", "detail"}``; status
    ``kept`` (the record's own hint, with ``leaked`` set when it states the answer: reported, not
    changed), ``hinted`` (the first of its samples that passes :func:`check_hint`), ``rejected``
    (``reason``: the first sample's), ``unreadable`` (``reason``: the record error's). ``candidates``
    lists each sample's text (first :data:`MAX_KEPT_TEXT` characters), finish reason and verdict.
    ``writer`` is only called when some record needs a hint.
    """
    entries: list[dict[str, Any]] = []
    todo: list[tuple[int, PromptRecord]] = []
    for pos, (index, rec) in enumerate(items):
        entry: dict[str, Any] = {"index": int(index), "id": None, "status": None, "reason": None, "hint": None,
                                 "leaked": None, "candidates": [], "detail": None}
        entries.append(entry)
        if isinstance(rec, RecordError):
            entry.update(status="unreadable", reason=rec.reason, detail=str(rec))
            continue
        entry["id"] = rec.id
        own = existing_hint(rec)
        if own is not None:
            entry.update(status="kept", hint=own,
                         leaked=find_leak(own, rec.answers or [], rec.answer_type, rel_tol=checks.number_rel_tol,
                                          option_texts=option_texts_of(rec)))
        elif require_reference and not rec.answers:
            entry.update(status="rejected", reason="no_reference")
        else:
            todo.append((pos, rec))
    if not todo:
        return entries
    if writer is None:
        raise ValueError("hint_entries: records need hints but no writer was given")
    generations = writer.write([r for _, r in todo], [build_instruction(instruction, r) for _, r in todo], key)
    for (pos, rec), gen in zip(todo, generations, strict=True):
        entry = entries[pos]
        if gen.failure is not None:
            entry.update(status="rejected", reason="prompt_failed", detail=f"{gen.failure}: {gen.detail}")
            continue
        for text, finish in zip(gen.texts, gen.finish_reasons, strict=True):
            verdict = check_hint(text, rec, finish_reason=finish, checks=checks)
            entry["candidates"].append({"text": text[:MAX_KEPT_TEXT], "finish_reason": finish,
                                        "reason": verdict.reason, "leaked": verdict.leaked})
            if verdict.hint is not None and entry["status"] is None:
                entry.update(status="hinted", hint=verdict.hint)
        if entry["status"] is None:
            first = entry["candidates"][0] if entry["candidates"] else {"reason": "empty", "leaked": None}
            entry.update(status="rejected", reason=first["reason"], leaked=first["leaked"])
    return entries


__all__ = [
    "DEFAULT_INSTRUCTION",
    "INSTRUCTION_FIELDS",
    "REJECT_REASONS",
    "STATUSES",
    "Generation",
    "HintChecks",
    "HintVerdict",
    "HintWriter",
    "ModelHintWriter",
    "build_instruction",
    "check_hint",
    "check_instruction",
    "existing_hint",
    "find_leak",
    "hint_entries",
    "number_mentions",
    "option_texts_of",
    "parse_hint",
    "with_written_hint",
]
