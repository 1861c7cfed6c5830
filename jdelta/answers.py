"""Final answers: extraction from completions, normalisation, equivalence classes, benchmark metrics.

Extraction (:func:`extract_answer`), in this order; the first rule that finds something wins:

1. Thinking is removed: every ``<think>...</think>`` block; text before a lone ``</think>`` (chat
   templates that open the block in the prompt); and an unclosed leading ``<think>`` block, which
   means the model ran out of tokens while thinking, so nothing after it is an answer.
2. The last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces handled.
3. The last ``<answer>...</answer>`` (an unclosed ``<answer>`` runs to the end).
4. The last "Answer: ..." / "Final answer: ..." (markdown bold allowed), to the end of its line.
5. The last "the (final) answer is ...", to the end of its line.
6. The last non-empty line.

Then wrappers are peeled: markdown bold, quotes, ``$...$`` / ``\\(...\\)`` math delimiters,
``\\text{}``, a trailing full stop. Answers longer than :data:`MAX_ANSWER_CHARS` or empty are
invalid.

Normalisation (:func:`normalize_answer`) by answer type (:data:`ANSWER_TYPES`):

* ``"number"``: commas (or spaces) as thousands separators, currency symbols and codes, percent signs
  (``"45%"`` -> 45, the percent is dropped as ChartQA does), trailing units (``"12 kg"``), scale
  words (``"1.2 million"``), scientific notation (``1.5e3``, ``1.5 \\times 10^{3}``), negatives (also
  the Unicode minus and "minus five"), fractions (``3/4``, ``1 1/2``, ``\\frac{3}{4}``), and number
  words ("twelve", "one hundred and five", "twenty-one", "three point five"), and attached
  chart suffixes ``"1.5K"``, ``"3M"``, ``"2bn"`` (thousand, million, billion).
* ``"yes_no"``: yes/true/correct vs no/false/incorrect, by the first word.
* ``"choice"``: a multiple-choice letter: ``"(B)"``, ``"B."``, ``"B) 42"``, ``"option b"``.
* ``"text"``: SQuAD-style: Unicode NFKC, lower case, punctuation and articles (a, an, the) removed,
  whitespace collapsed.
* ``"auto"`` (default): number if the whole answer parses as one, else yes/no if it starts with
  yes/no, else a choice letter if written in an explicit choice form (``"(B)"``, ``"B."``, a lone
  capital ``"B"``, ``"option B"``), else text.

With an explicit type, an answer that is a sentence rather than a bare value gets a second,
lenient reading: ``"number"`` takes the last number written in digits ("the value for 2019 is
45.2%" -> 45.2), ``"yes_no"`` a sentence containing exactly one of the words yes / no,
``"choice"`` the last ``"(C)"`` or ``"option c"`` in it. ``"auto"`` has no such fallback.

An answer that is empty, too long, or does not parse as the requested type is ``invalid``; all
invalid answers of a prompt form one class (:data:`INVALID_LABEL`) and are counted, never dropped.

Equivalence classes (:func:`class_answers`): the n teacher + n student answers of one prompt are
mapped to class ids; numbers whose relative difference is within ``rel_tol`` are one class
(single-link chains of sorted values are split so that every member is within ``rel_tol`` of the
class's smallest value). Class ids follow first appearance (teacher answers first).
:func:`pack_classed` pads many prompts into ``[P, C]`` count arrays for :mod:`jdelta.divergence`.

Metrics (:func:`score_answer`, :data:`METRICS`): ``relaxed_accuracy`` (ChartQA), ``anls``
(DocVQA/InfoVQA), ``exact_match``, ``mc_accuracy``. ``relaxed_accuracy`` and ``anls`` follow the
benchmarks' published definitions by default, so a score is comparable with a published one;
``lenient=True`` selects the lenient number reading that answer classing for Δ uses.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ANSWER_TYPES: tuple[str, ...] = ("auto", "number", "yes_no", "choice", "text")
METRICS: tuple[str, ...] = ("relaxed_accuracy", "anls", "exact_match", "mc_accuracy")
MAX_ANSWER_CHARS = 300
"""Extracted answers longer than this are invalid (a runaway completion, not an answer)."""
INVALID_LABEL = "<invalid>"
DEFAULT_REL_TOL = 1e-3
"""Default relative tolerance under which two numeric answers are one class."""


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


# ----------------------------------------------------------------------------- extraction

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_LINE = re.compile(
    r"(?:^|[\s*#>(\[])(?:final\s+answer|answer)\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?[ \t]*(?:\n[ \t]*)?([^\n]*)",
    re.IGNORECASE,
)
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+|correct\s+)?answer\s+is\s*[:：]?[ \t]*([^\n]*)", re.IGNORECASE)


def strip_thinking(completion: str) -> str:
    """Removes thinking: closed ``<think>`` blocks, text before a lone ``</think>``, an unclosed block."""
    text = _THINK_BLOCK.sub("", completion)
    low = text.lower()
    if "</think>" in low:  # the opening tag was in the prompt
        text = text[low.rfind("</think>") + len("</think>") :]
        low = text.lower()
    if "<think>" in low:  # unclosed: truncated while thinking; whatever follows is thought, not answer
        text = text[: low.find("<think>")]
    return text


def _last_braced(text: str, commands: Sequence[str]) -> str | None:
    """Content of the last ``\\cmd{...}`` in ``text`` for any of ``commands``, nested braces handled."""
    best_start, best = -1, None
    for cmd in commands:
        start = text.rfind(cmd + "{")
        while start != -1:
            i = start + len(cmd) + 1
            depth = 1
            j = i
            while j < len(text) and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth == 0:
                if start > best_start:
                    best_start, best = start, text[i : j - 1]
                break
            start = text.rfind(cmd + "{", 0, start)  # unbalanced: try the previous one
    return best


def _peel(ans: str) -> str:
    """Strips presentation wrappers around an extracted answer."""
    prev = None
    ans = ans.strip()
    while ans != prev:
        prev = ans
        ans = ans.replace("**", "").strip().strip("*").strip()  # markdown bold is never content
        if len(ans) >= 2 and ans[0] == ans[-1] and ans[0] in "\"'`":
            ans = ans[1:-1].strip()
        if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
            ans = ans.strip("$").strip()
        if ans.startswith("\\(") and ans.endswith("\\)"):
            ans = ans[2:-2].strip()
        if ans.startswith("\\[") and ans.endswith("\\]"):
            ans = ans[2:-2].strip()
        wrapped = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", ans)
        if wrapped:
            ans = wrapped.group(1).strip()
        inner = _last_braced(ans, ("\\boxed", "\\fbox"))
        if inner is not None and ans.startswith(("\\boxed{", "\\fbox{")) and ans.endswith("}"):
            ans = inner.strip()
        if ans.endswith((".", "。", "!")):
            ans = ans[:-1].strip()
    return ans


def extract_answer(completion: str) -> str:
    """Final answer string of a completion ("" if there is none); see the module docstring for the order."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = strip_thinking(completion)
    boxed = _last_braced(text, ("\\boxed", "\\fbox"))
    if boxed is not None:
        return _peel(boxed)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return _peel(tags[-1])
    lines = _ANSWER_LINE.findall(text)
    lines = [x for x in lines if x.strip()]
    if lines:
        return _peel(lines[-1])
    is_ = [x for x in _ANSWER_IS.findall(text) if x.strip()]
    if is_:
        return _peel(is_[-1])
    for line in reversed(text.splitlines()):
        if line.strip():
            return _peel(line)
    return ""


# ----------------------------------------------------------------------------- numbers

_UNITS_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS_WORDS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fourty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALE_WORDS = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
# Attached chart-style suffixes ("1.5K", "3M", "2bn"); lower-case "m" is left alone (metres).
_SUFFIX_SCALE = {"k": 1e3, "K": 1e3, "M": 1e6, "mn": 1e6, "B": 1e9, "bn": 1e9}
_CURRENCY = re.compile(r"(?:[$€£¥₹₩]|\b(?:usd|eur|gbp|jpy|inr|rs\.?|us\$)\b)", re.IGNORECASE)
_APPROX = re.compile(r"^(?:approximately|approx\.?|about|around|roughly|nearly|almost|~|≈|=)\s*", re.I)
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(
    rf"^(?P<sign>[-+])?\s*(?P<mant>{_NUM})"
    rf"(?:\s*(?:e|E)\s*(?P<exp>[-+]?\d+)|\s*(?:\*|x|×|\\times|\\cdot|·)\s*10\s*\^\s*\{{?\s*(?P<exp2>[-+]?\d+)\s*\}}?)?"
    r"\s*(?P<pct>%|percent\b|per\s+cent\b|percentage points?\b|pp\b)?"
    r"(?:(?P<suffix>[kKMB]|bn|mn)(?![a-zA-Z])|\s*(?P<scale>thousand|million|billion|trillion)\b)?"
    r"(?P<unit>(?:\s*[a-zA-Z°µ²³/][a-zA-Z°µ²³/.\-]*){0,2})\s*$"
)
_FRAC_RE = re.compile(
    r"^(?P<sign>[-+])?\s*(?:(?P<whole>\d+)\s+)?(?P<num>\d+)\s*/\s*(?P<den>\d+)\s*(?P<unit>[a-zA-Z°%]*)$"
)


def _clean_numeric(text: str) -> str:
    s = unicodedata.normalize("NFKC", text).strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("−", "-")
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}", r"\1/\2", s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    s = s.replace("\\left", "").replace("\\right", "").replace("{,}", "")
    s = s.strip().strip("$").strip()
    s = _APPROX.sub("", s)
    # Thousands separators: commas (and thin/narrow spaces) between digit groups of three.
    s = s.replace("\u2044", "/")  # fraction slash, from NFKC of "½"
    s = re.sub(r"(?<=\d)[, \u2009\u202f](?=\d{3}(?![\d/]))", "", s)
    s = _CURRENCY.sub("", s).strip()
    if s.startswith("-") or s.startswith("+"):
        s = s[0] + s[1:].strip()
    return s.rstrip(".").strip()


def _parse_number_words(text: str) -> float | None:
    """Cardinal number words to a value: "one hundred and five" -> 105, "minus three point five" -> -3.5."""
    words = re.sub(r"[-,]", " ", text.lower()).split()
    if not words:
        return None
    sign = 1.0
    if words[0] in ("minus", "negative"):
        sign, words = -1.0, words[1:]
    unit = [w for w in words if w not in ("and",)]
    if not unit:
        return None
    total, current, seen = 0.0, 0.0, False
    frac_digits: list[int] | None = None
    for w in unit:
        if frac_digits is not None:
            if w in _UNITS_WORDS and _UNITS_WORDS[w] < 10:
                frac_digits.append(_UNITS_WORDS[w])
                continue
            return None
        if w in _UNITS_WORDS:
            current += _UNITS_WORDS[w]
        elif w in _TENS_WORDS:
            current += _TENS_WORDS[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in _SCALE_WORDS:
            total += (current or 1) * _SCALE_WORDS[w]
            current = 0.0
        elif w == "point" and seen:
            frac_digits = []
            continue
        else:
            return None
        seen = True
    if not seen:
        return None
    value = total + current
    if frac_digits:
        value += float("0." + "".join(str(d) for d in frac_digits))
    return sign * value


def parse_number(text: str) -> float | None:
    """The number an answer states, or None if the whole answer is not one number (see module doc)."""
    s = _clean_numeric(text)
    if not s:
        return None
    m = _NUMBER_RE.match(s)
    if m:
        exp = m.group("exp") or m.group("exp2")
        value = float(m.group("mant") + (f"e{int(exp)}" if exp is not None else ""))  # 1e400 -> inf
        if m.group("scale"):
            value *= _SCALE_WORDS[m.group("scale").lower()]
        if m.group("suffix"):
            value *= _SUFFIX_SCALE[m.group("suffix")]
        unit = m.group("unit").strip().lower()
        if unit and (
            unit.split()[0] in ("and", "or", "to", "of", "and/or") or any(ch.isdigit() for ch in unit)
        ):
            return None
        return -value if m.group("sign") == "-" else value
    m = _FRAC_RE.match(s)
    if m:
        den = int(m.group("den"))
        if den == 0:
            return None
        value = int(m.group("whole") or 0) + int(m.group("num")) / den
        return -value if m.group("sign") == "-" else value
    # "twelve", "twelve apples": words, optionally followed by one unit word.
    words = s.lower().rstrip(".")
    value = _parse_number_words(words)
    if value is None and " " in words:
        head, tail = words.rsplit(" ", 1)
        if tail.isalpha() and tail not in _SCALE_WORDS and tail not in ("and", "or"):
            value = _parse_number_words(head)
    return value


# ----------------------------------------------------------------------------- other types

_YES = {"yes", "true", "correct", "right", "yeah", "yep"}
_NO = {"no", "false", "incorrect", "wrong", "nope"}
_CHOICE_STRICT = (
    re.compile(r"^(?:option|choice)\s*[:：]?\s*\(?([A-Za-z])\)?(?=$|[\s.):：,])", re.I),  # "option b"
    re.compile(r"^[(\[]([A-Za-z])[)\]]"),  # "(B)", "[b] 42"
    re.compile(r"^([A-Z])(?=$|[.):：,])"),  # "B", "B.", "B) 42", "B: 42"
)
_CHOICE_LOOSE = (
    re.compile(r"^([a-z])(?=$|[.):：,])"),  # "b", "b."
)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "…", "–", "—", "。", "，", "：", "、"}


def parse_yes_no(text: str) -> str | None:
    """``"yes"`` / ``"no"`` from the first word of an answer, else None."""
    words = re.findall(r"[a-z]+", unicodedata.normalize("NFKC", text).lower())
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    return None


def parse_choice(text: str, strict: bool = False) -> str | None:
    """Upper-case multiple-choice letter, or None.

    ``strict`` (used by ``"auto"``) accepts only explicit forms: ``"(b)"``, ``"B."``, ``"B"``,
    ``"option b"``; otherwise a lone lower-case letter (``"b"``) is accepted too.
    """
    s = unicodedata.normalize("NFKC", text).strip().strip("*").strip()
    for pattern in _CHOICE_STRICT + (() if strict else _CHOICE_LOOSE):
        m = pattern.match(s)
        if m:
            return m.group(1).upper()
    return None


def normalize_text(text: str) -> str:
    """SQuAD-style text normalisation: NFKC, lower case, no punctuation or articles, single spaces."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = "".join(" " if ch in _PUNCT else ch for ch in s)
    without_articles = " ".join(_ARTICLES.sub(" ", s).split())
    return without_articles or " ".join(s.split())  # "a" alone stays "a"


@dataclass(frozen=True)
class Normalized:
    """A normalised answer.

    ``kind``: ``"number"``, ``"yes_no"``, ``"choice"``, ``"text"`` or ``"invalid"``. ``value``: float
    for numbers, canonical str otherwise (for invalid: the reason, ``"empty"``, ``"too_long"`` or
    ``"not_a_<type>"``). ``raw``: the extracted answer string.
    """

    kind: str
    value: float | str
    raw: str = ""

    @property
    def label(self) -> str:
        if self.kind == "invalid":
            return INVALID_LABEL
        if self.kind == "number":
            v = float(self.value)
            return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.6g}"
        return str(self.value)


_NUMBER_TOKEN = re.compile(r"(?<![\w.])[-+]?[$€£¥₹]?\d[\d,]*(?:\.\d+)?(?:\s*%)?(?![\w.]*\d)")
_CHOICE_IN_SENTENCE = re.compile(r"[(\[]([A-Z])[)\]]|\b(?:option|choice)\s+([A-Za-z])\b", re.I)


def _last_number_in_sentence(raw: str) -> float | None:
    """The last number written with digits in a sentence ("the value for 2019 is 45.2%" -> 45.2)."""
    found = _NUMBER_TOKEN.findall(unicodedata.normalize("NFKC", raw).replace("\u2212", "-"))
    for token in reversed(found):
        value = parse_number(token)
        if value is not None and math.isfinite(value):
            return float(value)
    return None


def normalize_answer(answer: str, answer_type: str = "auto") -> Normalized:
    """Normalises an *extracted* answer string by ``answer_type`` (see the module docstring)."""
    _check_type(answer_type)
    raw = answer.strip()
    if not raw:
        return Normalized("invalid", "empty", raw)
    if len(raw) > MAX_ANSWER_CHARS:
        return Normalized("invalid", "too_long", raw)
    if answer_type in ("number", "auto"):
        num = parse_number(raw)
        if num is not None and math.isfinite(num):
            return Normalized("number", float(num), raw)
        if answer_type == "number":
            num = _last_number_in_sentence(raw)
            if num is not None:
                return Normalized("number", num, raw)
            return Normalized("invalid", "not_a_number", raw)
    if answer_type in ("yes_no", "auto"):
        yn = parse_yes_no(raw)
        if yn is not None and (answer_type == "yes_no" or re.match(r"^\W*(yes|no)\b", raw, re.I)):
            return Normalized("yes_no", yn, raw)
        if answer_type == "yes_no":
            words = set(re.findall(r"[a-z]+", raw.lower())) & {"yes", "no"}
            if len(words) == 1:  # a sentence that says exactly one of yes / no
                return Normalized("yes_no", words.pop(), raw)
            return Normalized("invalid", "not_a_yes_no", raw)
    if answer_type in ("choice", "auto"):
        letter = parse_choice(raw, strict=answer_type == "auto")
        if letter is not None:
            return Normalized("choice", letter, raw)
        if answer_type == "choice":
            found = _CHOICE_IN_SENTENCE.findall(raw)
            if found:  # "the correct option is (C) because ..."
                return Normalized("choice", next(g for g in found[-1] if g).upper(), raw)
            return Normalized("invalid", "not_a_choice", raw)
    text = normalize_text(raw)
    if not text:
        return Normalized("invalid", "empty", raw)
    return Normalized("text", text, raw)


def normalize_completion(completion: str, answer_type: str = "auto") -> Normalized:
    """``normalize_answer(extract_answer(completion), answer_type)``."""
    return normalize_answer(extract_answer(completion), answer_type)


# ----------------------------------------------------------------------------- equivalence classes


@dataclass(frozen=True, eq=False)
class ClassedAnswers:
    """Answer classes of one prompt.

    ``teacher_counts`` / ``student_counts``: ``[C]`` int32 per-class counts (each sums to its n);
    ``labels``: ``C`` class labels (:data:`INVALID_LABEL` for the invalid class); ``teacher_ids`` /
    ``student_ids``: ``[n]`` int32 class id of every sample; ``classes``: a representative
    :class:`Normalized` per class (its first member's raw answer; for numbers, the class's smallest
    value), used to judge correctness.

    Unpacks as ``teacher_counts, student_counts, labels = class_answers(...)``; the other fields
    are read by name.
    """

    teacher_counts: np.ndarray
    student_counts: np.ndarray
    labels: list[str]
    teacher_ids: np.ndarray
    student_ids: np.ndarray
    classes: list[Normalized]

    def __iter__(self):
        return iter((self.teacher_counts, self.student_counts, self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _class_keys(norms: Sequence[Normalized], rel_tol: float, abs_tol: float) -> list[tuple]:
    """A hashable class key per answer; numbers grouped by tolerance over the sorted unique values."""
    nums = sorted({float(n.value) for n in norms if n.kind == "number"})
    anchor: dict[float, float] = {}
    current = None
    for v in nums:
        if current is None or not math.isclose(v, current, rel_tol=rel_tol, abs_tol=abs_tol):
            current = v
        anchor[v] = current
    keys = []
    for n in norms:
        if n.kind == "number":
            keys.append(("number", anchor[float(n.value)]))
        elif n.kind == "invalid":
            keys.append(("invalid", None))
        else:
            keys.append((n.kind, n.value))
    return keys


def class_answers(
    teacher_answers: Sequence[str],
    student_answers: Sequence[str],
    answer_type: str = "auto",
    extract: bool = True,
    rel_tol: float = DEFAULT_REL_TOL,
    abs_tol: float = 1e-9,
) -> ClassedAnswers:
    """Maps the teacher's and the student's answers on one prompt to shared equivalence classes.

    Args:
      teacher_answers, student_answers: completions (or answers, with ``extract=False``); the two
        lists may differ in length.
      answer_type: one of :data:`ANSWER_TYPES`.
      extract: run :func:`extract_answer` on each string first.
      rel_tol, abs_tol: numbers within this tolerance of a class's smallest value share the class.

    Returns:
      :class:`ClassedAnswers`; unpack its first three fields as ``(teacher_counts, student_counts,
      labels)``. Invalid answers (empty, too long, unparseable for the type) are one class, counted.
    """
    _check_type(answer_type)
    for name, seq in (("teacher_answers", teacher_answers), ("student_answers", student_answers)):
        if isinstance(seq, str):
            raise TypeError(f"{name} must be a list of strings, not a single string")
        for i, a in enumerate(seq):
            if not isinstance(a, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(a).__name__}")
    answers = list(teacher_answers) + list(student_answers)
    norms = [normalize_answer(extract_answer(a) if extract else a, answer_type) for a in answers]
    keys = _class_keys(norms, rel_tol, abs_tol)
    index: dict[tuple, int] = {}
    classes: list[Normalized] = []
    ids = np.empty(len(keys), dtype=np.int32)
    for i, (k, n) in enumerate(zip(keys, norms, strict=True)):
        if k not in index:
            index[k] = len(classes)
            # Numbers are labelled by the class's smallest value, so labels do not depend on order.
            classes.append(Normalized("number", k[1], n.raw) if n.kind == "number" else n)
        ids[i] = index[k]
    nt = len(teacher_answers)
    num_c = len(classes)
    t_ids, s_ids = ids[:nt], ids[nt:]
    return ClassedAnswers(
        teacher_counts=np.bincount(t_ids, minlength=num_c).astype(np.int32),
        student_counts=np.bincount(s_ids, minlength=num_c).astype(np.int32),
        labels=[c.label for c in classes],
        teacher_ids=t_ids,
        student_ids=s_ids,
        classes=classes,
    )


class PackedCounts(NamedTuple):
    """Many prompts' class counts padded to ``[P, C]`` (C = the largest class count, or given).

    ``teacher``, ``student``: int32 ``[P, C]``; ``mask``: bool ``[P, C]`` True for real classes;
    ``correct``: bool ``[P, C]`` correct-class indicator, or None when no references were given.
    """

    teacher: np.ndarray
    student: np.ndarray
    mask: np.ndarray
    correct: np.ndarray | None


def pack_classed(
    classed: Sequence[ClassedAnswers],
    num_classes: int | None = None,
    correct: Sequence[Sequence[bool] | np.ndarray] | None = None,
) -> PackedCounts:
    """Pads per-prompt :class:`ClassedAnswers` into ``[P, C]`` arrays for :mod:`jdelta.divergence`.

    Args:
      classed: one :class:`ClassedAnswers` per prompt.
      num_classes: C; default the maximum number of classes. A prompt with more classes is an error.
      correct: optional per-prompt ``[C_p]`` bool correctness of each class (e.g. from
        :func:`class_correctness`); padded with False.
    """
    num_p = len(classed)
    widths = [len(c.labels) for c in classed]
    width = max(widths, default=0) if num_classes is None else int(num_classes)
    for i, w in enumerate(widths):
        if w > width:
            raise ValueError(f"prompt {i} has {w} answer classes, more than num_classes={width}")
    teacher = np.zeros((num_p, width), np.int32)
    student = np.zeros((num_p, width), np.int32)
    mask = np.zeros((num_p, width), bool)
    cor = None if correct is None else np.zeros((num_p, width), bool)
    if correct is not None and len(correct) != num_p:
        raise ValueError(f"correct has {len(correct)} entries for {num_p} prompts")
    for i, c in enumerate(classed):
        w = widths[i]
        teacher[i, :w] = c.teacher_counts
        student[i, :w] = c.student_counts
        mask[i, :w] = True
        if cor is not None:
            row = np.asarray(correct[i], bool)
            if row.shape != (w,):
                raise ValueError(f"correct[{i}] has shape {row.shape}, expected ({w},) for prompt {i}")
            cor[i, :w] = row
    return PackedCounts(teacher, student, mask, cor)


def class_answers_batch(
    teacher_answers: Sequence[Sequence[str]],
    student_answers: Sequence[Sequence[str]],
    answer_types: str | Sequence[str] = "auto",
    references: Sequence[str | Sequence[str] | None] | None = None,
    metric: str | Sequence[str] = "exact_match",
    extract: bool = True,
    num_classes: int | None = None,
) -> tuple[list[ClassedAnswers], PackedCounts]:
    """:func:`class_answers` over many prompts, then :func:`pack_classed` (with correctness if
    ``references`` is given; a None reference gives an all-False row). Per-prompt ``answer_types``
    and ``metric`` may be lists."""
    num_p = len(teacher_answers)
    if len(student_answers) != num_p:
        raise ValueError(f"{num_p} prompts of teacher answers but {len(student_answers)} of student answers")
    types = [answer_types] * num_p if isinstance(answer_types, str) else list(answer_types)
    metrics = [metric] * num_p if isinstance(metric, str) else list(metric)
    if len(types) != num_p or len(metrics) != num_p:
        raise ValueError("answer_types and metric must be one value or one per prompt")
    if references is not None and len(references) != num_p:
        raise ValueError(f"{len(references)} references for {num_p} prompts")
    classed = [
        class_answers(t, s, ty, extract=extract)
        for t, s, ty in zip(teacher_answers, student_answers, types, strict=True)
    ]
    correct = None
    if references is not None:
        correct = [
            np.zeros(len(c.labels), bool) if ref is None else class_correctness(c, ref, ty, me)
            for c, ref, ty, me in zip(classed, references, types, metrics, strict=True)
        ]
    return classed, pack_classed(classed, num_classes, correct)


# ----------------------------------------------------------------------------- metrics


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _refs(reference: str | Sequence[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"reference answers must be str, got {type(r).__name__}")
    return refs


def anls(prediction: str, reference: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA / InfoVQA), as published.

    ``s = 1 - NL`` with ``NL = lev(p, r) / max(len p, len r)``, best over the references, and
    ``s = 0`` when ``s < threshold`` (the reference script's ``if question_result < 0.5: 0``: a
    similarity of exactly 0.5 is kept). Strings are lower-cased with whitespace collapsed (as the
    widely used lmms-eval / Qwen-VL copies of the script do; identical to the original script for
    answers without extra spaces). The benchmark score is the mean over questions.
    """
    p = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _refs(reference):
        r = " ".join(ref.lower().split())
        if not p and not r:
            return 1.0
        sim = 1.0 - levenshtein(p, r) / max(len(p), len(r))
        best = max(best, sim if sim >= threshold else 0.0)
    return best


def _chartqa_float(text: str) -> float | None:
    """ChartQA's reference ``_to_float``: ``float(text)``; a trailing ``%`` is stripped and divides by 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _lenient_float(text: str) -> float | None:
    """A number as :func:`parse_number` reads it (``"1,200"``, ``"twelve"``, ``"12 kg"``), a trailing
    ``%`` dividing by 100 as in ChartQA; non-finite values are words here, not numbers."""
    t = text.strip()
    if t.endswith("%"):
        v = parse_number(t[:-1])
        return None if v is None else v / 100.0
    try:
        v = float(t)
    except ValueError:
        return parse_number(t)
    return v if math.isfinite(v) else None


def relaxed_accuracy(prediction: str, reference: str | Sequence[str], tolerance: float = 0.05, *,
                     lenient: bool = False) -> float:
    """ChartQA relaxed accuracy (max over references), by default exactly as published.

    Published (ChartQA / Pix2Struct ``relaxed_correctness``): both strings go through plain
    ``float()`` (a trailing ``%`` divides by 100); when the prediction reads as a number and the
    target as a *non-zero* number, correct iff ``|p - t| / |t| <= tolerance``; otherwise
    case-insensitive string equality (``"0.0"`` vs ``"0"`` and ``"1,200"`` vs ``"1200"`` are wrong,
    ``"45%"`` matches ``"0.45"`` but not ``"45"``).

    ``lenient=True`` (how jdelta classes answers for Δ, never a benchmark score): numbers are read
    by :func:`parse_number` (thousands separators, number words, units), a zero target must be
    matched exactly as a number, and strings are compared stripped.
    """
    for ref in _refs(reference):
        if lenient:
            rv, pv = _lenient_float(ref), _lenient_float(prediction)
            if rv is not None and pv is not None:
                ok = pv == rv if rv == 0 else abs(pv - rv) / abs(rv) <= tolerance
            else:
                ok = prediction.strip().lower() == ref.strip().lower()
        else:
            pv, rv = _chartqa_float(prediction), _chartqa_float(ref)
            if pv is not None and rv:
                ok = abs(pv - rv) / abs(rv) <= tolerance
            else:
                ok = prediction.lower() == ref.lower()
        if ok:
            return 1.0
    return 0.0


def exact_match(prediction: str, reference: str | Sequence[str], answer_type: str = "auto") -> float:
    """1.0 if the normalised prediction equals a normalised reference (numbers: equal values)."""
    p = normalize_answer(prediction, answer_type)
    if p.kind == "invalid":
        return 0.0
    for ref in _refs(reference):
        r = normalize_answer(ref, answer_type)
        if r.kind == p.kind and r.value == p.value:
            return 1.0
    return 0.0


def mc_accuracy(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 if the prediction's choice letter equals the reference's letter."""
    p = parse_choice(prediction)
    if p is None:
        return 0.0
    return float(any(parse_choice(r) == p for r in _refs(reference)))


def score_answer(
    prediction: str, reference: str | Sequence[str], metric: str, answer_type: str = "auto", *,
    lenient: bool = False,
) -> float:
    """Scores one extracted answer against one or more references with a metric from :data:`METRICS`.

    ``lenient``: ``relaxed_accuracy``'s lenient number reading (answer classing for Δ); the
    default is each benchmark's published definition."""
    if metric == "relaxed_accuracy":
        return relaxed_accuracy(prediction, reference, lenient=lenient)
    if metric == "anls":
        return anls(prediction, reference)
    if metric == "exact_match":
        return exact_match(prediction, reference, answer_type)
    if metric == "mc_accuracy":
        return mc_accuracy(prediction, reference)
    raise ValueError(f"unknown answer metric {metric!r}; expected one of {METRICS}")


def score_against_reference(
    answers: Sequence[str],
    reference: str | Sequence[str],
    answer_type: str = "auto",
    metric: str = "exact_match",
    extract: bool = True,
    *,
    lenient: bool = False,
) -> np.ndarray:
    """Scores each of a model's answers to one prompt.

    Args:
      answers: completions (or extracted answers with ``extract=False``).
      reference: the reference answer, or a list of accepted answers.
      answer_type: used by ``exact_match``.
      metric: one of :data:`METRICS` (its published definition unless ``lenient``).
      lenient: see :func:`score_answer`.

    Returns:
      ``[n]`` float32 scores in [0, 1] (ANLS is graded; the others are 0/1).
    """
    _check_type(answer_type)
    if metric not in METRICS:
        raise ValueError(f"unknown answer metric {metric!r}; expected one of {METRICS}")
    preds = [extract_answer(a) if extract else a for a in answers]
    return np.array([score_answer(p, reference, metric, answer_type, lenient=lenient) for p in preds],
                    dtype=np.float32)


def class_correctness(
    classed: ClassedAnswers,
    reference: str | Sequence[str],
    answer_type: str = "auto",
    metric: str = "exact_match",
    *,
    lenient: bool = True,
) -> np.ndarray:
    """``[C]`` bool: whether each class's representative answer scores > 0.5 against the reference.

    The representative is the class's first member's extracted answer (numbers in a class agree
    within ``rel_tol``, far below the metrics' tolerances). The invalid class is never correct.
    ``lenient`` (default True: classes are formed by :func:`parse_number`, so their correctness
    reads numbers the same way; ``"1,200"`` and ``"1200"`` are one class) is passed to
    :func:`score_answer`.
    """
    out = np.zeros(len(classed.classes), bool)
    for i, c in enumerate(classed.classes):
        if c.kind != "invalid":
            out[i] = score_answer(c.raw, reference, metric, answer_type, lenient=lenient) > 0.5
    return out
