"""The teacher as writer: instruction templates, a robust parser, validation, and the oracle writer.

Given a seed prompt (image, question, answer) and the failure mode it belongs to, the
instruction asks the teacher for ``k`` new question/answer pairs about the *same image* that
exercise the same skill. The generation is parsed leniently (``Q1:``/``A1:``, ``Question:``/
``Answer:``, numbering optional) and every rejected piece is counted by reason:

``no_questions`` (a generation without any question), ``half_question`` (a question with no
answer; also a truncated last pair), ``orphan_answer`` (an answer with no question),
``empty_question``, ``malformed_question`` (too short or too long), ``no_answer``,
``answer_too_long``, ``answer_type_mismatch`` (seed expects a number / yes-no and the answer is
not one), ``copy_of_seed`` (same or near-same question as the seed), ``duplicate`` (same or
near-same as an earlier question of the generation), ``over_limit`` (beyond ``k``).

Accepted pairs become :class:`PromptRecord`s with the seed's image, category and family, the
writer's answer as reference, and provenance. Whether a question is answerable from the image is
checked later by screening (the teacher must agree with the written answer often enough).

The instruction wording is jdelta's choice (DeltaPrompts' prompts are not published). The model
writer (the teacher samples the instruction) is :class:`jdelta.synth.pair_scorers.TeacherWriter`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from jdelta.data.records import PromptRecord, infer_answer_type
from jdelta.synth.failure_modes import DESCRIPTIONS

REJECT_REASONS = (
    "no_questions",
    "half_question",
    "orphan_answer",
    "empty_question",
    "malformed_question",
    "no_answer",
    "answer_too_long",
    "answer_type_mismatch",
    "copy_of_seed",
    "duplicate",
    "over_limit",
)

# Suffixes the chart generator appends; stripped before comparing questions.
_FORMAT_SUFFIXES = (" answer with a number.", " answer yes or no.")
ANSWER_HINTS = {
    "number": "a single number",
    "yes_no": "yes or no",
    "choice": "one option letter",
    "text": "a short phrase of at most a few words",
}

INSTRUCTION_TEMPLATE = """You are writing new test questions about the image above.
Example question about this image: {question}
Its answer: {answer}
A smaller model {description}; the skill it needs here is "{skill}".
Write {k} new questions about this same image that need the same skill. Each must differ from the example and from each other, be answerable from the image alone, and have a short answer ({answer_hint}).
Use exactly this format and nothing else:
{format_lines}"""


def build_instruction(seed: PromptRecord, outcome: str, k: int) -> str:
    """The writer instruction for ``k`` new questions on ``seed``'s image targeting ``outcome``."""
    fmt = "\n".join(f"Q{i}: <question {i}>\nA{i}: <answer {i}>" for i in range(1, k + 1))
    return INSTRUCTION_TEMPLATE.format(
        question=seed.question.strip(),
        answer=seed.answer if seed.answer is not None else "(not given)",
        description=DESCRIPTIONS.get(outcome, DESCRIPTIONS["divergent"]),
        skill=(seed.family or seed.category or "visual question answering").replace("_", " "),
        k=k,
        answer_hint=ANSWER_HINTS.get(seed.answer_type, ANSWER_HINTS["text"]),
        format_lines=fmt,
    )


def normalize_question(q: str) -> str:
    """Lower case, format suffixes removed, punctuation dropped, spaces collapsed."""
    s = " " + q.strip().lower()
    for suf in _FORMAT_SUFFIXES:
        if s.endswith(suf):
            s = s[: -len(suf)]
    s = re.sub(r"[^\w\s.]", " ", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # keep decimal points, drop sentence dots
    return " ".join(s.split())


def jaccard(a: str, b: str) -> float:
    """Token-set Jaccard similarity of two normalised questions."""
    sa, sb = set(a.split()), set(b.split())
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


_LINE = re.compile(
    r"^\s*(?:[-*]\s*)?(?:\*\*)?(?P<tag>q(?:uestion)?|a(?:nswer)?)\s*(?P<num>\d+)?\s*(?:\*\*)?\s*[:.)\]-]\s*(?:\*\*)?\s*(?P<text>.*)$",
    re.IGNORECASE,
)


def split_pairs(text: str) -> tuple[list[tuple[str, str | None]], Counter]:
    """``[(question, answer or None)]`` in order, plus structural rejections (``orphan_answer``).

    A question's text may continue on following untagged lines; an answer is its first line.
    """
    pairs: list[list[Any]] = []
    rejects: Counter = Counter()
    current: list[Any] | None = None
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            if current is not None and current[1] is None and line.strip():
                current[0] += " " + line.strip()
            continue
        tag = m.group("tag").lower()[0]
        body = m.group("text").strip().strip("*").strip()
        if tag == "q":
            current = [body, None]
            pairs.append(current)
        elif current is not None and current[1] is None:
            current[1] = body
        else:
            rejects["orphan_answer"] += 1
    return [(q.strip(), a) for q, a in pairs], rejects


def _answer_ok(answer: str, answer_type: str) -> bool:
    if answer_type == "number":
        return infer_answer_type(answer) == "number"
    if answer_type == "yes_no":
        return answer.strip().lower().rstrip(".") in ("yes", "no")
    if answer_type == "choice":
        return bool(re.fullmatch(r"\(?[A-Ja-j]\)?\.?", answer.strip()))
    return True


def parse_generation(
    text: str,
    seed: PromptRecord,
    k: int,
    *,
    near_duplicate: float = 0.8,
    min_words: int = 3,
    max_words: int = 60,
    max_answer_words: int = 8,
) -> tuple[list[tuple[str, str]], Counter]:
    """Valid ``(question, answer)`` pairs from one generation, and rejections by reason. Pure.

    Every question-shaped piece of ``text`` ends as exactly one accepted pair or one rejection
    (plus ``no_questions`` once for a generation without any question).
    """
    # A thinking model's reasoning (closed or cut off) is not part of the answer.
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.DOTALL)
    pairs, rejects = split_pairs(text)
    if not pairs:
        rejects["no_questions"] += 1
        return [], rejects
    seed_norm = normalize_question(seed.question)
    accepted: list[tuple[str, str]] = []
    seen: list[str] = []
    for q, a in pairs:
        if a is not None and seed.answer_type in ("number", "yes_no"):
            a = a.strip().rstrip(".")
        norm = normalize_question(q)
        words = len(norm.split())
        if a is None:
            reason = "half_question"
        elif not norm:
            reason = "empty_question"
        elif words < min_words or words > max_words:
            reason = "malformed_question"
        elif not a.strip():
            reason = "no_answer"
        elif len(a.split()) > max_answer_words:
            reason = "answer_too_long"
        elif not _answer_ok(a, seed.answer_type):
            reason = "answer_type_mismatch"
        elif norm == seed_norm or jaccard(norm, seed_norm) >= near_duplicate:
            reason = "copy_of_seed"
        elif any(norm == s or jaccard(norm, s) >= near_duplicate for s in seen):
            reason = "duplicate"
        elif len(accepted) >= k:
            reason = "over_limit"
        else:
            reason = None
        if reason is None:
            accepted.append((q, a.strip()))
            seen.append(norm)
        else:
            rejects[reason] += 1
            if reason in ("duplicate", "over_limit"):
                seen.append(norm)
    return accepted, rejects


def candidate_record(
    seed: PromptRecord, question: str, answer: str, j: int, *, round_index: int, mode: Mapping[str, Any]
) -> PromptRecord:
    """A written question as a prompt record on the seed's image, with provenance."""
    answer_type = seed.answer_type if seed.answer_type in ("number", "yes_no", "choice") else infer_answer_type(answer)
    if seed.answer_type == "number" and "answer with a number" not in question.lower():
        question = question.rstrip() + " Answer with a number."
    elif seed.answer_type == "yes_no" and "answer yes or no" not in question.lower():
        question = question.rstrip() + " Answer yes or no."
    h = hashlib.sha1(f"{seed.id}|{j}|{question}".encode()).hexdigest()[:10]
    meta = {k: v for k, v in (seed.meta or {}).items() if k in ("kind", "family", "difficulty", "data")}
    return PromptRecord(
        id=f"w{round_index}-{seed.id}-{j}-{h}",
        images=list(seed.images),
        question=question,
        answer=answer,
        answer_type=answer_type,
        category=seed.category,
        family=seed.family,
        provenance={
            "stage": "synthesis",
            "generator": "teacher_writer",
            "round": round_index,
            "seed_id": seed.id,
            "failure_mode": {"group": mode.get("group"), "outcome": mode.get("outcome")},
            "source": seed.provenance,
        },
        meta=meta,
    ).validate()


class Writer(Protocol):
    """Anything that turns (seed record, instruction) pairs into one generation text each."""

    identity: dict[str, Any]

    def write(self, seeds: Sequence[PromptRecord], instructions: Sequence[str], seed: int) -> list[str]: ...


# ----------------------------------------------------------------------------- oracle writer (tests, benchmarks)

_PREFIXES = (
    "Looking closely at the image,",
    "Based only on what the figure shows,",
    "Reading the picture carefully,",
    "From the values displayed here,",
    "Inspecting this graphic in detail,",
    "Judging by what is drawn,",
)


class OracleWriter:
    """A deterministic stand-in for the teacher-writer (tests and benchmarks; no model).

    For each seed it writes ``k`` rephrasings of the seed question (a distinct lead-in each) with
    the seed's answer. A stable hash of the seed id injects malformed generations at rate
    ``malformed_rate``: no questions, a truncated last pair, a duplicated pair, a copy of the seed.
    """

    def __init__(self, k: int, malformed_rate: float):
        self.k = int(k)
        self.malformed_rate = float(malformed_rate)
        self.identity = {"kind": "oracle_writer", "k": self.k, "malformed_rate": self.malformed_rate}

    def _one(self, seed: PromptRecord, salt: int) -> str:
        h = int.from_bytes(hashlib.sha256(f"{salt}|{seed.id}".encode()).digest()[:8], "little")
        core = seed.question.strip()
        for suf in (" Answer with a number.", " Answer yes or no."):
            core = core.removesuffix(suf)
        for pre in _PREFIXES:  # a seed written in an earlier round: rephrase its core, not its lead-in
            core = core.removeprefix(pre + " ")
        core = core[0].lower() + core[1:] if core else core
        start = h % len(_PREFIXES)
        pairs = [(f"{_PREFIXES[(start + i) % len(_PREFIXES)]} {core}", seed.answer or "")
                 for i in range(min(self.k, len(_PREFIXES)))]
        roll = (h >> 16) % 10_000 / 10_000
        if roll < self.malformed_rate:
            kind = (h >> 32) % 4
            if kind == 0:
                return "I am sorry, I cannot write questions about this image."
            if kind == 1:  # truncated: the last question lost its answer
                body = "\n".join(f"Q{i}: {q}\nA{i}: {a}" for i, (q, a) in enumerate(pairs[:-1], 1))
                return body + f"\nQ{len(pairs)}: {pairs[-1][0]}"
            if kind == 2:
                pairs = pairs[:-1] + [pairs[0]]
            else:
                pairs = pairs[:-1] + [(seed.question, seed.answer or "")]
        return "\n".join(f"Q{i}: {q}\nA{i}: {a}" for i, (q, a) in enumerate(pairs, 1))

    def write(self, seeds: Sequence[PromptRecord], instructions: Sequence[str], seed: int) -> list[str]:
        return [self._one(s, seed) for s in seeds]
