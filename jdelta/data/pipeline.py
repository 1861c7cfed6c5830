"""Grain pipelines from prompt records to padded, statically shaped model batches.

``prompt_dataset`` is a ``grain.MapDataset`` of processed examples (random access, lazily
computed): source -> seeded shuffle -> per-process shard -> repeat -> parse record -> decode
and process images -> tokenise the chat prompt. ``make_prompt_batches`` turns it into a
checkpointable iterator of batches whose shapes come from a few buckets, so jitted consumers
compile a handful of programs:

- ``input_ids [B, S]`` int32, LEFT-padded with the pad id (``S`` from ``seq_buckets``)
- ``attention_mask [B, S]`` int32, ``mm_token_type_ids [B, S]`` int32 (1 at image tokens)
- ``pixel_values [P, ...]`` float32, all images of the batch in row order, zero rows padded, in the
  model family's layout (``family``; :mod:`jdelta.data.prompt_format`): Qwen3-VL patch rows
  ``[P, 3*T*p*p]`` (``P`` from ``patch_buckets``), Gemma 3 whole images ``[P, 3, S, S]`` (``P``
  from ``image_buckets``); ``image_grid_thw [N, 3]`` int32 (``prod`` = an image's pixel rows:
  Qwen3-VL ``(t, h, w)``, Gemma 3 ``(1, 1, 1)``), ``(0, 0, 0)`` rows padded
- ``record_index [B]`` int64 (index in the source; -1 on padding rows of a short final batch)
- ``ids``, ``answers``, ``answer_types``, ``families`` ``[B]`` object arrays ("" / None on padding rows)
- ``records`` ``[B]`` object array: each row's :class:`~jdelta.data.records.PromptRecord` as parsed by
  the pipeline, images dropped (None on padding rows), so no consumer parses a record twice
- optional ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_mm_token_type_ids``
  (``with_hint``: ViCuR's privileged teacher prompt, the question followed by the record's
  ``[Hint]: ...`` cue, or by ``[Answer]: ...`` its reference answer with ``privileged="answer"``;
  the student prompt never carries either; a record without one is left out as ``missing_hint`` /
  ``missing_answer``, by ``on_error``) and ``pixel_values_pixelated`` (VA-OPD's detail-removed
  view, same shape as ``pixel_values``).

Records that fail (unreadable, bad image, empty or over-long question, prompt longer than the
largest bucket) are counted by reason in a :class:`SkipReport` kept in the iterator's state,
or raise when ``on_error="raise"``; ``make_prompt_batches(..., keep_skipped=True)`` also lists
them one by one (source index, id, reason, message) for stages that account for every record.
Nothing is dropped silently.

Shapes round up with :func:`jdelta.buckets.bucket`, the rule the sampler uses too: a sampler
built with this config's buckets pads nothing again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import grain
import numpy as np

from jdelta.buckets import bucket
from jdelta.config import build, check
from jdelta.data.chat import with_answer
from jdelta.data.image_processor import ImageConfig, ImageError, decode_image, pixelate
from jdelta.data.prompt_format import prompt_format
from jdelta.data.records import ListSource, PromptRecord, RecordError
from jdelta.data.tokenizer import load_tokenizer
from jdelta.models.gemma3.prompt_format import Gemma3PipelineConfig

logger = logging.getLogger(__name__)

SKIP_KEY = "_skip"
MAX_EXAMPLES_PER_REASON = 5


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the prompt pipeline (all plain values, so it sits in a YAML config)."""

    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)
    # Rows of ``pixel_values`` per batch; a batch needing more rounds up to a multiple of the largest.
    patch_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
    # Rows of ``image_grid_thw`` per batch (same rounding rule).
    image_buckets: tuple[int, ...] = (8, 16, 32, 64)
    family: Literal["qwen3_vl", "gemma3"] = "qwen3_vl"  # the models' prompt format (jdelta.models.family)
    image: ImageConfig = field(default_factory=ImageConfig)  # family qwen3_vl's image settings
    gemma3: Gemma3PipelineConfig = field(default_factory=Gemma3PipelineConfig)  # family gemma3's
    system: str | None = None
    enable_thinking: bool | None = None
    with_hint: bool = False  # also emit the privileged teacher prompt (ViCuR; see the module docstring)
    privileged: Literal["hint", "answer"] = "hint"  # what that prompt adds: the record's cue hint or its answer
    with_pixelated: bool = False  # also emit VA-OPD's pixelated view of every image
    max_question_chars: int = 8192
    on_error: Literal["skip", "raise"] = "skip"  # "skip": count by reason and go on; "raise": stop at the first bad record
    drop_remainder: bool = False  # else the short final batch is padded to batch_size rows
    num_epochs: int | None = 1  # None: repeat forever
    worker_count: int = 0  # grain worker processes for decode/process/tokenise (0: in-process)
    worker_buffer_size: int = 2

    def __post_init__(self):
        check(self.on_error in ("skip", "raise"), "on_error", f"must be 'skip' or 'raise', got {self.on_error!r}")
        check(self.privileged in ("hint", "answer"), "privileged",
              f"must be 'hint' or 'answer', got {self.privileged!r}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        for name in ("seq_buckets", "patch_buckets", "image_buckets"):
            b = getattr(self, name)
            check(bool(b) and list(b) == sorted(set(b)) and b[0] >= 1, name,
                  f"must be increasing positive integers, got {b!r}")
        check(self.worker_count >= 0, "worker_count", f"must be >= 0, got {self.worker_count}")


@dataclass
class SkipReport:
    """Records left out, counted by reason, with the first few messages of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> SkipReport:
        return cls(Counter(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()})

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        lines = [f"{self.total} records skipped:"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n} (e.g. {self.examples[reason][0]})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- per record


def _skip(reason: str, message: str, index: int = -1, record_id: str | None = None) -> dict:
    return {SKIP_KEY: reason, "message": message, "record_index": index, "id": record_id}


def _error_record_id(e: Exception, raw: Any) -> str | None:
    """The id of the record an error is about: the error's (``record_id``, an ImageError's
    ``record``), else what can be read from the raw item."""
    rid = getattr(e, "record_id", None) or getattr(e, "record", None)
    return str(rid) if rid is not None else _readable_id(raw)


def _readable_id(raw: Any) -> str | None:
    """The ``id`` of a raw item that did not parse as a record, if it can still be read (else None)."""
    raw = raw[1] if isinstance(raw, tuple) and len(raw) == 2 else raw  # JsonlSource: (line, bytes)
    if isinstance(raw, PromptRecord):
        return raw.id
    try:
        d = json.loads(raw) if isinstance(raw, (str, bytes, bytearray)) else raw
    except (ValueError, TypeError):
        return None
    rid = d.get("id") if isinstance(d, dict) else None
    return None if rid is None else str(rid)


class ProcessRecord:
    """``(source index, raw item) -> example dict`` (or a skip marker). Picklable for grain workers."""

    def __init__(self, source, tokenizer, config: PipelineConfig):
        self.source = source
        self.tokenizer = tokenizer
        self.config = config
        self.format = prompt_format(tokenizer, config)
        self.special = self.format.special

    def __call__(self, item: tuple[int, Any]) -> dict:
        index, raw = item
        cfg = self.config
        try:
            return self._process(index, raw)
        except (RecordError, ImageError) as e:
            if cfg.on_error == "raise":
                raise
            reason = "bad_image" if isinstance(e, ImageError) else e.reason
            return _skip(reason, str(e), index, _error_record_id(e, raw))
        except (ValueError, KeyError, TypeError, OSError) as e:
            if cfg.on_error == "raise":
                raise RecordError(f"source index {index}", f"{type(e).__name__}: {e}") from e
            return _skip("processing_error", f"source index {index}: {type(e).__name__}: {e}", index,
                         _readable_id(raw))

    def _fail(self, where: str, reason: str, problem: str, index: int, record_id: str) -> dict:
        if self.config.on_error == "raise":
            raise RecordError(where, problem, reason)
        return _skip(reason, f"{where}: {problem}", index, record_id)

    def _process(self, index: int, raw: Any) -> dict:
        cfg = self.config
        rec = self.source.to_record(raw, index)
        where = f"record {rec.id!r}"
        if len(rec.question) > cfg.max_question_chars:
            return self._fail(
                where,
                "question_too_long",
                f"question has {len(rec.question)} chars > {cfg.max_question_chars}",
                index,
                rec.id,
            )
        pil_images = [decode_image(rec.image_bytes(i), record=rec.id, name=rec.image_name(i))
                      for i in range(len(rec.images))]
        # The family's pixel rows (Qwen3-VL: uint8 patches, normalised by collate: 4x less copying).
        pixel_values, grids, layout = self.format.images(pil_images, record=rec.id)
        prompt = self.format.prompt(rec.question, layout)
        if len(prompt) > cfg.seq_buckets[-1]:
            return self._fail(
                where, "prompt_too_long", f"prompt has {len(prompt)} tokens > {cfg.seq_buckets[-1]}", index, rec.id
            )
        ex = {
            "input_ids": prompt.input_ids,
            "mm_token_type_ids": prompt.mm_token_type_ids,
            "pixel_values": pixel_values,
            "image_grid_thw": grids,
            "record_index": index,
            "id": rec.id,
            "answer": rec.answer,
            "answer_type": rec.answer_type,
            "family": rec.family,
            "record": replace(rec, images=[]),  # parsed once; the pixels travel separately
        }
        if cfg.with_hint:
            if cfg.privileged == "answer":
                hint, question = None, with_answer(rec.question, rec.answer) if rec.answer else None
            else:
                hint = rec.cues.hint.strip() if rec.cues is not None and rec.cues.hint.strip() else None
                question = rec.question if hint else None
            if question is None:
                what = "reference answer" if cfg.privileged == "answer" else "cue hint (cues.hint)"
                return self._fail(where, f"missing_{cfg.privileged}",
                                  f"no {what} for the privileged teacher prompt (with_hint)", index, rec.id)
            teacher = self.format.prompt(question, layout, hint=hint)
            if len(teacher) > cfg.seq_buckets[-1]:
                return self._fail(
                    where,
                    "prompt_too_long",
                    f"hinted prompt has {len(teacher)} tokens > {cfg.seq_buckets[-1]}",
                    index,
                    rec.id,
                )
            ex["teacher_input_ids"] = teacher.input_ids
            ex["teacher_mm_token_type_ids"] = teacher.mm_token_type_ids
        if cfg.with_pixelated:
            ex["pixel_values_pixelated"], _, _ = self.format.images([pixelate(im) for im in pil_images],
                                                                    record=rec.id)
        return ex


# ----------------------------------------------------------------------------- batching


def _left_pad(seqs: Sequence[np.ndarray], rows: int, length: int, value: int) -> np.ndarray:
    out = np.full((rows, length), value, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, length - len(s) :] = s
    return out


def collate(examples: Sequence[dict], config: PipelineConfig, pad_id: int, fmt=None) -> dict[str, np.ndarray]:
    """Pad ``examples`` (at most ``batch_size``) into one statically shaped batch (see module doc);
    ``fmt``: the family's prompt format (:mod:`jdelta.data.prompt_format`) that made them."""
    fmt = fmt if fmt is not None else prompt_format(None, config)
    b = config.batch_size
    seq_len = bucket(max(len(e["input_ids"]) for e in examples), config.seq_buckets)
    patches = sum(len(e["pixel_values"]) for e in examples)
    n_images = sum(len(e["image_grid_thw"]) for e in examples)
    p_rows = fmt.pixel_rows(patches)
    n_rows = bucket(max(n_images, 1), config.image_buckets)

    def pixels(key: str) -> np.ndarray:
        return fmt.collate_pixels([e[key] for e in examples], p_rows)

    grid = np.zeros((n_rows, 3), np.int32)
    if n_images:
        grid[:n_images] = np.concatenate([e["image_grid_thw"] for e in examples], axis=0)
    ids = [e["input_ids"] for e in examples]
    attention = _left_pad([np.ones(len(s), np.int32) for s in ids], b, seq_len, 0)
    obj = lambda key, fill: np.array([e[key] for e in examples] + [fill] * (b - len(examples)), dtype=object)
    batch = {
        "input_ids": _left_pad(ids, b, seq_len, pad_id),
        "attention_mask": attention,
        "mm_token_type_ids": _left_pad([e["mm_token_type_ids"] for e in examples], b, seq_len, 0),
        "pixel_values": pixels("pixel_values"),
        "image_grid_thw": grid,
        "record_index": np.array(
            [e["record_index"] for e in examples] + [-1] * (b - len(examples)), np.int64
        ),
        "ids": obj("id", ""),
        "answers": obj("answer", None),
        "answer_types": obj("answer_type", ""),
        "families": obj("family", ""),
        "records": obj("record", None),
    }
    if config.with_hint:
        t_ids = [e["teacher_input_ids"] for e in examples]
        t_len = bucket(max(len(s) for s in t_ids), config.seq_buckets)
        batch["teacher_input_ids"] = _left_pad(t_ids, b, t_len, pad_id)
        batch["teacher_attention_mask"] = _left_pad([np.ones(len(s), np.int32) for s in t_ids], b, t_len, 0)
        batch["teacher_mm_token_type_ids"] = _left_pad(
            [e["teacher_mm_token_type_ids"] for e in examples], b, t_len, 0
        )
    if config.with_pixelated:
        batch["pixel_values_pixelated"] = pixels("pixel_values_pixelated")
    return batch


class PromptBatchIterator(grain.DatasetIterator):
    """Batches of processed examples; skip markers are counted, never batched.

    Its state (``get_state``/``set_state``, a JSON-able dict) holds the parent grain iterator's
    position and the skip counts, so ``grain.checkpoint`` / Orbax restore both.
    """

    def __init__(self, parent: grain.DatasetIterator, config: PipelineConfig, pad_id: int,
                 keep_skipped: bool = False):
        super().__init__(parent)
        self._config = config
        self._pad_id = pad_id
        self._format = prompt_format(None, config)
        self.skip_report = SkipReport()
        # With keep_skipped: one entry per record left out (record_index, id, reason, message), in
        # the order met; for stages that account for every input record (not kept in the state).
        self.skipped: list[dict] | None = [] if keep_skipped else None
        self.batches = 0
        self._reported = False

    def __next__(self) -> dict[str, np.ndarray]:
        examples: list[dict] = []
        while len(examples) < self._config.batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            if SKIP_KEY in ex:
                self.skip_report.add(ex[SKIP_KEY], ex["message"])
                if self.skipped is not None:
                    self.skipped.append({"record_index": int(ex.get("record_index", -1)), "id": ex.get("id"),
                                         "reason": ex[SKIP_KEY], "message": ex["message"]})
            else:
                examples.append(ex)
        if not examples or (self._config.drop_remainder and len(examples) < self._config.batch_size):
            if not self._reported:  # the end of the data: say what was left out, once
                self._reported = True
                log = logger.warning if self.skip_report.total else logger.info
                log("prompt pipeline finished after %d batches; %s", self.batches, self.skip_report.summary())
            raise StopIteration
        self.batches += 1
        return collate(examples, self._config, self._pad_id, self._format)

    def get_state(self) -> dict:
        return {
            "parent": self._parent.get_state(),
            "skips": self.skip_report.as_dict(),
            "batches": self.batches,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skip_report = SkipReport.from_dict(state["skips"])
        self.batches = int(state["batches"])

    def __str__(self) -> str:
        return f"PromptBatchIterator(batch_size={self._config.batch_size})"


class PromptBatchDataset(grain.IterDataset):
    """``IterDataset`` of padded batches over an ``IterDataset`` of examples / skip markers."""

    def __init__(self, parent: grain.IterDataset, config: PipelineConfig, pad_id: int, keep_skipped: bool = False):
        super().__init__(parent)
        self._config = config
        self._pad_id = pad_id
        self._keep_skipped = keep_skipped

    def __iter__(self) -> PromptBatchIterator:
        return PromptBatchIterator(self._parent.__iter__(), self._config, self._pad_id, self._keep_skipped)

    def __str__(self) -> str:
        return f"PromptBatchDataset(batch_size={self._config.batch_size})"


# ----------------------------------------------------------------------------- public entry points


def _with_source_index(n: int, index: int, raw: Any) -> tuple[int, Any]:
    # Past the first epoch grain hands out indices beyond len(source); the record's index is modulo.
    return index % n, raw


def _as_tokenizer(tokenizer):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def as_source(records):
    """A records source as is; an in-memory list of :class:`PromptRecord` wrapped as one."""
    if isinstance(records, (list, tuple)) and all(isinstance(r, PromptRecord) for r in records):
        return ListSource(records)
    return records


def prompt_dataset(
    source,
    *,
    tokenizer,
    seed: int = 0,
    shuffle: bool = True,
    config: PipelineConfig | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    select: slice | None = None,
) -> grain.MapDataset:
    """Random-access dataset of processed examples (dicts, or skip markers with ``"_skip"``).

    source: anything with ``__len__``, ``__getitem__`` and ``to_record(raw, index)`` (see
    ``jdelta.data.records``), or a list of :class:`PromptRecord`. ``select``: only these source
    indices (a slice, e.g. one shard; ``record_index`` stays the index in ``source``). The shuffle
    is seeded (a fresh permutation per epoch); each process keeps every ``process_count``-th
    element from ``process_index`` (default: JAX's).
    """
    cfg = config or PipelineConfig()
    tok = _as_tokenizer(tokenizer)
    source = as_source(source)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if len(source) == 0:
        raise ValueError(f"{source!r} is empty")
    ds = grain.MapDataset.source(source).map_with_index(functools.partial(_with_source_index, len(source)))
    if select is not None:
        ds = ds[select]
        if len(ds) == 0:
            raise ValueError(f"{source!r}: the selection {select} holds no records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if cfg.num_epochs != 1:  # after the shuffle: grain reseeds it per epoch, so each epoch has its own order
        ds = ds.repeat(cfg.num_epochs)
    return ds.map(ProcessRecord(source, tok, cfg))


def make_prompt_batches(
    source,
    *,
    tokenizer,
    seed: int = 0,
    shuffle: bool = True,
    config: PipelineConfig | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    select: slice | None = None,
    keep_skipped: bool = False,
) -> PromptBatchIterator:
    """Checkpointable iterator of padded batches (see module doc). ``it.skip_report`` counts the
    records left out so far; ``it.get_state()`` / ``it.set_state()`` resume exactly.
    ``select``: see :func:`prompt_dataset`; ``keep_skipped``: list each record left out in
    ``it.skipped``."""
    cfg = config or PipelineConfig()
    tok = _as_tokenizer(tokenizer)
    examples = prompt_dataset(
        source,
        tokenizer=tok,
        seed=seed,
        shuffle=shuffle,
        config=cfg,
        process_index=process_index,
        process_count=process_count,
        select=select,
    ).to_iter_dataset()
    if cfg.worker_count > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        examples = examples.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return iter(PromptBatchDataset(examples, cfg, prompt_format(tok, cfg).special.pad, keep_skipped))


def config_from_dict(d: dict) -> PipelineConfig:
    """``PipelineConfig`` from a plain (YAML) dict, validated (unknown keys and wrong types raise naming them)."""
    return build(PipelineConfig, d or {})


def config_to_dict(config: PipelineConfig) -> dict:
    return asdict(config)


__all__ = [
    "PipelineConfig",
    "PromptBatchIterator",
    "SkipReport",
    "as_source",
    "collate",
    "config_from_dict",
    "make_prompt_batches",
    "prompt_dataset",
]
