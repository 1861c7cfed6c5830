"""Prompt records: one schema for every stage, with readers and writers.

A :class:`PromptRecord` is one visual question: images (encoded bytes or file paths), the
question, an optional reference answer (or several accepted ones) with its type, the question
family, optional cues (evidence boxes and a text hint, used by ViCuR), provenance and free-form
``meta``.

On disk a record is a JSON object (one per JSONL line, or one per ArrayRecord entry) with the
images inline as base64 (``{"b64": ...}``) or as paths relative to an image folder
(``{"path": ...}``). Sources expose random access (``__len__``/``__getitem__``, what
``grain.MapDataset.source`` wants) over *raw* items plus ``to_record(raw, index)``; parsing
happens inside the pipeline so a bad record is counted there instead of stopping the read.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jdelta.errors import UserError

ANSWER_TYPES = ("number", "text", "yes_no", "choice")


class RecordError(UserError, ValueError):
    """A record that cannot be used; the message names it (id, or file and line) and the problem."""

    def __init__(self, where: str, problem: str, reason: str = "invalid_record"):
        self.where = where
        self.problem = problem
        self.reason = reason  # short key used when the pipeline counts skipped records
        super().__init__(f"{where}: {problem}")


@dataclass
class Cues:
    """Where the evidence is: boxes ``(image_index, x0, y0, x1, y1)`` in pixels and a text hint."""

    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    hint: str = ""

    def to_json(self) -> dict:
        return {"boxes": [list(b) for b in self.boxes], "hint": self.hint}

    @classmethod
    def from_json(cls, d: dict) -> Cues:
        boxes = [(int(b[0]), *(float(v) for v in b[1:5])) for b in d.get("boxes", [])]
        return cls(boxes=boxes, hint=str(d.get("hint", "")))


@dataclass
class PromptRecord:
    """One visual question. ``images`` holds encoded image bytes or file paths.

    ``answer`` is the reference answer. Where several answers are accepted (DocVQA, InfoVQA),
    ``meta["answers"]`` lists all of them and ``answer`` is the first; on disk ``"answer"`` may
    then be that list (read back as both). :attr:`answers` gives the full list.
    """

    id: str
    images: list[bytes | str]
    question: str
    answer: str | None = None
    answer_type: str = "text"
    category: str = ""
    family: str = ""
    cues: Cues | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str | None = None) -> PromptRecord:
        """Raise :class:`RecordError` naming the record if a field is unusable."""
        where = where or f"record {self.id!r}"
        if not isinstance(self.question, str) or not self.question.strip():
            raise RecordError(where, "empty question", "empty_question")
        if self.answer_type not in ANSWER_TYPES:
            raise RecordError(where, f"answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}")
        if self.answer is not None and not isinstance(self.answer, str):
            raise RecordError(where, f"answer must be a string, got {type(self.answer).__name__}", "invalid_answer")
        if "answers" in (self.meta or {}):
            answers = self.meta["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise RecordError(where, f"meta.answers must be a non-empty list of strings, got {answers!r:.80}",
                                  "invalid_answer")
            if self.answer is None:
                raise RecordError(where, "meta.answers is given but answer is null", "invalid_answer")
        for i, im in enumerate(self.images):
            if not isinstance(im, (bytes, str)):
                raise RecordError(where, f"image {i} is {type(im).__name__}, expected bytes or a path")
        return self

    @property
    def answers(self) -> list[str] | None:
        """Every accepted reference answer, ``answer`` first (``meta["answers"]`` holds the rest), or None."""
        if self.answer is None:
            return None
        extra = (self.meta or {}).get("answers") or []
        return [self.answer] + [a for a in extra if a != self.answer]

    def image_name(self, index: int) -> str:
        """How messages name image ``index``: ``image 0``, with its path when it is a file."""
        im = self.images[index]
        return f"image {index}" if isinstance(im, bytes) else f"image {index} ({im})"

    def image_bytes(self, index: int) -> bytes:
        """Encoded bytes of image ``index`` (reads the file for a path)."""
        im = self.images[index]
        if isinstance(im, bytes):
            return im
        try:
            return Path(im).read_bytes()
        except OSError as e:
            raise RecordError(
                f"record {self.id!r}", f"cannot read image {index} at {im}: {e}", "missing_image"
            ) from e

    def to_json(self, *, image_dir: str | os.PathLike | None = None) -> dict:
        """JSON-ready dict. Bytes images become base64 unless ``image_dir`` is given, in which case
        they are written there as ``<id>_<i>.png`` and referenced by relative path."""
        images = []
        for i, im in enumerate(self.images):
            if isinstance(im, bytes) and image_dir is not None:
                name = f"{_safe_name(self.id)}_{i}{_image_ext(im)}"
                (Path(image_dir) / name).write_bytes(im)
                images.append({"path": name})
            elif isinstance(im, bytes):
                images.append({"b64": base64.b64encode(im).decode("ascii")})
            else:
                images.append({"path": str(im)})
        return {
            "id": self.id,
            "images": images,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "category": self.category,
            "family": self.family,
            "cues": self.cues.to_json() if self.cues is not None else None,
            "provenance": self.provenance,
            "meta": self.meta,
        }

    @classmethod
    def from_json(
        cls, d: dict | str | bytes, *, image_dir: str | os.PathLike | None = None, where: str | None = None
    ) -> PromptRecord:
        """Inverse of :meth:`to_json`; relative image paths resolve against ``image_dir``."""
        where = where or "record"
        if isinstance(d, (bytes, bytearray)):
            try:
                d = bytes(d).decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(
                    _with_id(where, _readable_id(bytes(d))),
                    f"not valid UTF-8 (byte 0x{d[e.start]:02x} at offset {e.start})",
                    "invalid_utf8",
                ) from e
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise RecordError(where, f"invalid JSON: {e}", "invalid_json") from e
        if not isinstance(d, dict):
            raise RecordError(where, f"expected a JSON object, got {type(d).__name__}")
        if "id" in d:
            where = _with_id(where, d["id"])
        for name in ("id", "question", "images"):
            if name not in d or d[name] is None:
                raise RecordError(where, f"missing field {name!r}", "missing_field")
        if not isinstance(d["images"], list):
            raise RecordError(where, f"images must be a list, got {type(d['images']).__name__}")
        for name in ("cues", "provenance", "meta"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise RecordError(where, f"{name} must be an object, got {type(d[name]).__name__}")
        images: list[bytes | str] = []
        for i, im in enumerate(d["images"]):
            if isinstance(im, str):
                im = {"path": im}
            if not isinstance(im, dict):
                raise RecordError(where, f"image {i}: expected {{'b64': ...}} or {{'path': ...}}")
            if "b64" in im:
                try:
                    images.append(base64.b64decode(im["b64"], validate=True))
                except ValueError as e:
                    raise RecordError(where, f"image {i}: invalid base64: {e}") from e
            elif "path" in im:
                p = Path(im["path"])
                if not p.is_absolute() and image_dir is not None:
                    p = Path(image_dir) / p
                images.append(str(p))
            else:
                raise RecordError(where, f"image {i}: expected a 'b64' or 'path' key, got {sorted(im)}")
        meta = dict(d.get("meta") or {})
        answers = answer_list(d.get("answer"), where)
        if isinstance(d.get("answer"), list):  # several accepted answers: the first is `answer`
            if "answers" in meta and meta["answers"] != answers:
                raise RecordError(
                    where, f"answer list {answers!r:.80} and meta.answers {meta['answers']!r:.80} differ",
                    "invalid_answer",
                )
            meta["answers"] = answers
        rec = cls(
            id=str(d["id"]),
            images=images,
            question=d["question"],
            answer=None if answers is None else answers[0],
            answer_type=d.get("answer_type") or "text",
            category=d.get("category") or "",
            family=d.get("family") or "",
            cues=Cues.from_json(d["cues"]) if d.get("cues") else None,
            provenance=dict(d.get("provenance") or {}),
            meta=meta,
        )
        return rec.validate(where)

    def to_bytes(self) -> bytes:
        """Self-contained JSON bytes (images inline) for ArrayRecord."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _with_id(where: str, record_id: Any) -> str:
    """``where`` extended with a record id: ``file.jsonl:3 (id 'x')``, or ``record 'x'`` alone."""
    if record_id is None:
        return where
    return f"record {record_id!r}" if where == "record" else f"{where} (id {record_id!r})"


def _readable_id(raw: bytes) -> Any:
    """The ``id`` of a record whose bytes are not valid UTF-8, if the rest still parses (else None)."""
    try:
        d = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    rid = d.get("id") if isinstance(d, dict) else None
    return None if isinstance(rid, str) and "\ufffd" in rid else rid  # a garbled id names nothing


def _answer_text(value: Any, where: str, what: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (np.str_, np.bytes_)):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(where, f"{what} is not valid UTF-8", "invalid_answer") from e
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return str(value)  # a JSON number: its text
    raise RecordError(where, f"{what} must be a string, got {type(value).__name__} {value!r:.40}", "invalid_answer")


def answer_list(value: Any, where: str = "record") -> list[str] | None:
    """A record's reference answer(s) as given -> all accepted answers (the first is the reference).

    A string (or a number, kept as its text) is one answer; a list (or array) holds every accepted
    answer, as DocVQA and InfoVQA give them. None stays None. An empty list or an item that is not
    a string or number raises :class:`RecordError` naming ``where``.
    """
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim > 0:
        value = list(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise RecordError(where, "answer list is empty (give at least one accepted answer, or null)",
                              "invalid_answer")
        return [_answer_text(v, where, f"answer {i}") for i, v in enumerate(value)]
    return [_answer_text(value, where, "answer")]


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".bin"


# ----------------------------------------------------------------------------- writers


def write_jsonl(
    records: Iterable[PromptRecord], path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None
) -> int:
    """Write records as JSONL; images inline (base64) or, with ``image_dir``, as files. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(image_dir=image_dir), ensure_ascii=False) + "\n")
            n += 1
    return n


def write_array_record(records: Iterable[PromptRecord], path: str | os.PathLike) -> int:
    """Write records to one ArrayRecord file (one JSON record per entry, images inline)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for rec in records:
            writer.write(rec.to_bytes())
            n += 1
    finally:
        writer.close()
    return n


# ----------------------------------------------------------------------------- sources


class JsonlSource:
    """Random access over the lines of a JSONL file (blank lines skipped); items are raw lines."""

    def __init__(self, path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        self._lines: list[tuple[int, bytes]] = []
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._lines.append((lineno, line))

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> tuple[int, bytes]:
        return self._lines[index]

    def to_record(self, raw: tuple[int, bytes], index: int) -> PromptRecord:
        lineno, line = raw
        return PromptRecord.from_json(line, image_dir=self.image_dir, where=f"{self.path}:{lineno}")

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, n={len(self)})"


class ArrayRecordSource:
    """ArrayRecord file(s) of JSON records, read through ``grain.sources.ArrayRecordDataSource``."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, image_dir=None):
        import grain

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.paths = [str(p) for p in paths]
        self.image_dir = image_dir if image_dir is not None else str(Path(self.paths[0]).parent)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return self._source[index]

    def to_record(self, raw: bytes, index: int) -> PromptRecord:
        return PromptRecord.from_json(raw, image_dir=self.image_dir, where=f"{self.paths[0]}[{index}]")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.paths!r}, n={len(self)})"


class ListSource:
    """In-memory records (tests, generated data)."""

    def __init__(self, records: Sequence[PromptRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def to_record(self, raw: PromptRecord, index: int) -> PromptRecord:
        return raw.validate()


def read_records_jsonl(
    path: str | os.PathLike, *, image_dir: str | os.PathLike | None = None
) -> Iterator[PromptRecord]:
    """Parse every record of a JSONL file; the first bad line raises naming file and line."""
    src = JsonlSource(path, image_dir=image_dir)
    for i in range(len(src)):
        yield src.to_record(src[i], i)


def read_records_array_record(path: str | os.PathLike, *, image_dir=None) -> Iterator[PromptRecord]:
    src = ArrayRecordSource(path, image_dir=image_dir)
    for i in range(len(src)):
        yield src.to_record(src[i], i)


def open_records(path: str | os.PathLike, **kwargs) -> JsonlSource | ArrayRecordSource:
    """A source for a records file or a dataset directory written by jdelta (``records.jsonl`` /
    ``records.array_record``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("records.array_record", "records.jsonl"):
            if (p / name).exists():
                return open_records(p / name, **kwargs)
        raise FileNotFoundError(f"{p}: no records.jsonl or records.array_record")
    if p.suffix == ".jsonl":
        return JsonlSource(p, **kwargs)
    if p.suffix == ".array_record" or ".array_record-" in p.name:
        return ArrayRecordSource(p, **kwargs)
    raise ValueError(f"{p}: unknown records format (expected .jsonl or .array_record)")


# ----------------------------------------------------------------------------- foreign layouts


def encode_image(image: Any, *, where: str = "record") -> bytes | str:
    """Image as stored by HF datasets / TFDS / files -> encoded bytes (or a path string)."""
    from PIL import Image

    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, dict):  # HF Image feature without decoding: {"bytes": ..., "path": ...}
        if image.get("bytes"):
            return image["bytes"]
        if image.get("path"):
            return str(image["path"])
        raise RecordError(where, "image dict has neither bytes nor path")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise RecordError(where, f"unsupported image value of type {type(image).__name__}")


def infer_answer_type(answer: str) -> str:
    """``yes_no`` for yes/no, ``number`` for a plain number (commas, %, $ allowed), else ``text``."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "yes_no"
    try:
        float(a.replace(",", "").rstrip("%").lstrip("$"))
        return "number"
    except ValueError:
        return "text"


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return _text(v.item())
    return str(v)


def _first(v: Any, where: str) -> tuple[str, list[str]]:
    """A reference answer and the full list of accepted answers (DocVQA-style lists)."""
    answers = answer_list(v, where)
    if answers is None:
        raise RecordError(where, "answer is null", "missing_field")
    return answers[0], answers


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise RecordError(where, f"missing field {key!r} (fields: {sorted(d)})", "missing_field")
    return d[key]


def map_chartqa(d: dict, index: int, where: str = "chartqa") -> PromptRecord:
    """ChartQA (``imgname``/``image``, ``query``, ``label``, optional ``human_or_machine``)."""
    where = f"{where}[{index}]"
    answer, answers = _first(_need(d, "label", where), where)
    image = d.get("image", d.get("imgname"))
    if image is None:
        raise RecordError(where, "missing field 'image' (or 'imgname')")
    split = d.get("human_or_machine")
    return PromptRecord(
        id=f"chartqa-{index}",
        images=[encode_image(image, where=where)],
        question=_text(_need(d, "query", where)),
        answer=answer,
        answer_type=infer_answer_type(answer),
        category="chart",
        family="chartqa",
        provenance={
            "dataset": "ChartQA",
            "index": index,
            **({"split": _text(split)} if split is not None else {}),
        },
        meta={"answers": answers},
    ).validate(where)


def _map_docvqa_like(d: dict, index: int, where: str, dataset: str, category: str) -> PromptRecord:
    where = f"{where}[{index}]"
    answer, answers = _first(_need(d, "answers", where), where)
    qid = d.get("questionId", d.get("question_id", index))
    return PromptRecord(
        id=f"{dataset.lower()}-{_text(qid)}",
        images=[encode_image(_need(d, "image", where), where=where)],
        question=_text(_need(d, "question", where)),
        answer=answer,
        answer_type="text",
        category=category,
        family=dataset.lower(),
        provenance={"dataset": dataset, "index": index, "questionId": _text(qid)},
        meta={"answers": answers},
    ).validate(where)


def map_docvqa(d: dict, index: int, where: str = "docvqa") -> PromptRecord:
    """DocVQA (``questionId``, ``question``, ``answers`` list, ``image``); scored with ANLS over all answers."""
    return _map_docvqa_like(d, index, where, "DocVQA", "document")


def map_infovqa(d: dict, index: int, where: str = "infovqa") -> PromptRecord:
    """InfographicVQA: same layout as DocVQA."""
    return _map_docvqa_like(d, index, where, "InfoVQA", "infographic")


def map_ai2d(d: dict, index: int, where: str = "ai2d") -> PromptRecord:
    """AI2D (``question``, ``options`` list, ``answer`` = index of the right option, ``image``).
    The question lists the options as ``A. ...``; the reference answer is the letter."""
    where = f"{where}[{index}]"
    options = [_text(o) for o in _need(d, "options", where)]
    try:
        k = int(_text(_need(d, "answer", where)))
    except ValueError as e:
        raise RecordError(where, f"answer must be an option index, got {d['answer']!r}") from e
    if not 0 <= k < len(options):
        raise RecordError(where, f"answer index {k} out of range for {len(options)} options")
    letters = "ABCDEFGHIJ"
    question = (
        _text(_need(d, "question", where))
        + "\n"
        + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    )
    return PromptRecord(
        id=f"ai2d-{index}",
        images=[encode_image(_need(d, "image", where), where=where)],
        question=question,
        answer=letters[k],
        answer_type="choice",
        category="diagram",
        family="ai2d",
        provenance={"dataset": "AI2D", "index": index},
        meta={"options": options, "answer_text": options[k]},
    ).validate(where)


def map_charxiv(d: dict, index: int, where: str = "charxiv") -> PromptRecord:
    """CharXiv reasoning questions (``image``, ``reasoning_q``, ``reasoning_a``, ``figure_id``)."""
    where = f"{where}[{index}]"
    answer = _text(_need(d, "reasoning_a", where))
    fid = d.get("figure_id", index)
    return PromptRecord(
        id=f"charxiv-{_text(fid)}",
        images=[encode_image(_need(d, "image", where), where=where)],
        question=_text(_need(d, "reasoning_q", where)),
        answer=answer,
        answer_type=infer_answer_type(answer),
        category="chart",
        family="charxiv",
        provenance={"dataset": "CharXiv", "index": index, "figure_id": _text(fid)},
    ).validate(where)


def map_prompt_record(d: dict, index: int, where: str = "records") -> PromptRecord:
    """jdelta's own schema stored as columns (e.g. a TFDS / HF export of PromptRecords)."""
    d = dict(d)
    if "images" in d:
        d["images"] = [
            {"b64": base64.b64encode(encode_image(im)).decode()} if not isinstance(im, (str, dict)) else im
            for im in d["images"]
        ]
    return PromptRecord.from_json(d, where=f"{where}[{index}]")


LAYOUTS: dict[str, Callable[[dict, int, str], PromptRecord]] = {
    "jdelta": map_prompt_record,
    "chartqa": map_chartqa,
    "docvqa": map_docvqa,
    "infovqa": map_infovqa,
    "ai2d": map_ai2d,
    "charxiv": map_charxiv,
}


def _layout(layout: str) -> Callable[[dict, int, str], PromptRecord]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


class MappedSource:
    """Random access over any indexable of dicts in a foreign layout (``LAYOUTS``)."""

    def __init__(self, items, layout: str, name: str):
        self._items = items
        self._map = _layout(layout)
        self.layout = layout
        self.name = name

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        return self._items[index]

    def to_record(self, raw: dict, index: int) -> PromptRecord:
        try:
            return self._map(raw, index, self.name)
        except RecordError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise RecordError(f"{self.name}[{index}]", f"{type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"MappedSource({self.name!r}, layout={self.layout!r}, n={len(self)})"


def tfds_source(builder_dir: str | os.PathLike, split: str, layout: str) -> MappedSource:
    """A prepared TFDS dataset on local disk (the builder directory holding ``dataset_info.json``),
    read with ``tfds`` random access (``as_data_source``; no TensorFlow needed for ArrayRecord files)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(builder_dir))
    return MappedSource(builder.as_data_source(split=split), layout, f"{builder.name}:{split}")


def hf_disk_source(path: str | os.PathLike, layout: str, split: str | None = None) -> MappedSource:
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (``Dataset`` or ``DatasetDict``)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; pass split=")
        ds = ds[split]
    return MappedSource(ds, layout, f"{Path(path).name}" + (f":{split}" if split else ""))
