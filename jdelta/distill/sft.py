"""Off-policy fine-tuning: the student learns teacher-written responses (no teacher in the loop).

The setting where a DeltaPrompts dataset is used without the teacher: responses were
sampled once (``jdelta sample``) and are stored; the student minimises their negative
log-likelihood. The NLL is computed from the student's final hidden states and LM head
in chunks over the sequence, each chunk rematerialised in the backward pass, so
``[B, T, V]`` logits are never held (vocabulary 151,936).

Input: batches with left-padded prompts (``input_ids``, ``attention_mask``, optional
``pixel_values``/``image_grid_thw`` in the model layout) and right-padded responses
``completion [B, T]`` with ``completion_length [B]``. :func:`sft_batches` builds such a
checkpointable Grain iterator from pre-tokenised records; :func:`sample_sft_batches` builds
one from ``jdelta sample`` output joined to its prompt records (images included), the
prompts rebuilt by the prompt pipeline (chat template, image processing) as the sampler did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta import losses
from jdelta.config import check
from jdelta.distill.batch import (
    assemble_batch,
    completion_hidden,
    cut_at_special,
    model_inputs,
    rope_index_fn,
    special_ids,
    student_view,
)
from jdelta.distill.loop import StepInput
from jdelta.distill.train_state import TrainState
from jdelta.logprobs import chunked_token_logprobs
from jdelta.models.family import logit_softcap
from jdelta.sharding import Rules, activation_sharding

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """chunk_size: positions per NLL chunk; reduction: ``token_mean`` (all response tokens of the
    batch) or ``batch_mean`` (per-response mean, then mean); pad_id (None: the data source's, 0
    for a library caller); completion/prompt buckets as in
    :class:`jdelta.distill.on_policy.DistillConfig`."""

    chunk_size: int = 128
    reduction: Literal["token_mean", "batch_mean"] = "token_mean"
    pad_id: int | None = None
    completion_bucket: int = 32
    prompt_bucket: int = 32

    def __post_init__(self):
        check(self.reduction in ("token_mean", "batch_mean"), "reduction",
              f"must be 'token_mean' or 'batch_mean', got {self.reduction!r}")
        check(self.chunk_size >= 1, "chunk_size", f"must be >= 1, got {self.chunk_size}")
        check(self.pad_id is None or self.pad_id >= 0, "pad_id", f"must be >= 0, got {self.pad_id}")
        check(self.completion_bucket >= 1, "completion_bucket", f"must be >= 1, got {self.completion_bucket}")
        check(self.prompt_bucket >= 1, "prompt_bucket", f"must be >= 1, got {self.prompt_bucket}")

    def resolved(self, pad_id: int = 0) -> SFTConfig:
        """This config with ``pad_id`` left None filled in (from the data source)."""
        return self if self.pad_id is not None else dataclasses.replace(self, pad_id=int(pad_id))


def chunked_nll(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, chunk_size: int,
                softcap: float | None = None) -> jax.Array:
    """Per-token ``-log p(target)`` ``[B, T]`` (float32) from ``hidden [B, T, H]`` and ``lm_head [H, V]``
    (``softcap``: the model's ``final_logit_softcapping``).

    ``chunk_size`` positions at a time under ``jax.checkpoint``: forward and backward peak at
    ``B * chunk_size * V`` logits instead of ``B * T * V``.
    """
    return -chunked_token_logprobs(hidden, lm_head, targets, chunk_size=chunk_size, softcap=softcap).token_logprobs


def make_sft_loss(cfg: SFTConfig):
    """``loss_fn(student, batch, rng, shared) -> (loss, aux)``: NLL of ``completion`` given the prompt."""

    def loss_fn(student, batch, rng, shared):
        del rng, shared
        comp, mask = batch["completion"], batch["completion_mask"]
        hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), comp.shape[1])
        nll = chunked_nll(hidden, student.lm_head_weight(), comp, chunk_size=cfg.chunk_size,
                          softcap=logit_softcap(student))
        loss = losses.reduce_masked(nll, mask, cfg.reduction)
        maskf = mask.astype(jnp.float32)
        return loss, {"nll": (nll * maskf).sum() / jnp.maximum(maskf.sum(), 1.0), "completion_tokens": maskf.sum()}

    return loss_fn


class SFTProducer:
    """The loop's producer for SFT: next dataset batch -> per-sample train batch on the mesh."""

    def __init__(self, student_template: nnx.Module, batches: Iterator[Mapping[str, Any]], cfg: SFTConfig, *,
                 mesh: Mesh | None = None, rules: Rules | None = None):
        self.batches, self.cfg, self.mesh, self.rules = batches, cfg.resolved(), mesh, rules
        self._rope = rope_index_fn(student_template)
        self._special = special_ids(student_template)
        self._image_token_id = getattr(getattr(student_template, "config", None), "image_token_id", None)

    def produce(self, state: TrainState, step: int) -> StepInput:
        del state, step
        t0 = time.perf_counter()
        b = next(self.batches)
        if "completion" not in b:
            raise ValueError("an SFT batch needs 'completion' (teacher-written response token ids)")
        comp = np.asarray(b["completion"], np.int32)
        lengths = np.asarray(b["completion_length"]) if "completion_length" in b else (
            comp != self.cfg.pad_id).sum(-1)
        if self._special:
            _, n_bad = cut_at_special(comp, lengths, self._special)
            if n_bad:
                raise ValueError(f"{n_bad} SFT response(s) in this batch contain vision placeholder token ids "
                                 f"{self._special}; clean the dataset (responses must be text)")
        host = assemble_batch(b, comp, lengths, rollouts_per_prompt=1, rope_fn=self._rope, pad_id=self.cfg.pad_id,
                              completion_bucket=self.cfg.completion_bucket, prompt_bucket=self.cfg.prompt_bucket,
                              image_token_id=self._image_token_id)
        train = student_view(host)
        if self.mesh is not None:
            train = {k: jax.device_put(v, activation_sharding(self.mesh, ("batch",) + (None,) * (v.ndim - 1),
                                                              v.shape, self.rules)) for k, v in train.items()}
        stats = {"sft/mean_length": float(np.mean(lengths))}
        return StepInput(batch=train, timings={"data": time.perf_counter() - t0}, stats=stats,
                         tokens=int(host["attention_mask"].sum()))


def collate_sft(records: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pre-tokenised ``{"prompt_ids": [...], "response_ids": [...]}`` records -> a batch
    (prompts left-padded, responses right-padded with ``pad_id``)."""
    for i, r in enumerate(records):
        if not r.get("prompt_ids") or not r.get("response_ids"):
            raise ValueError(f"SFT record {i} needs non-empty 'prompt_ids' and 'response_ids', got keys {sorted(r)}")
    s = max(len(r["prompt_ids"]) for r in records)
    t = max(len(r["response_ids"]) for r in records)
    b = len(records)
    ids = np.full((b, s), pad_id, np.int32)
    mask = np.zeros((b, s), np.int32)
    comp = np.full((b, t), pad_id, np.int32)
    lengths = np.zeros((b,), np.int32)
    for i, r in enumerate(records):
        p, c = r["prompt_ids"], r["response_ids"]
        ids[i, s - len(p):], mask[i, s - len(p):] = p, 1
        comp[i, : len(c)], lengths[i] = c, len(c)
    return {"input_ids": ids, "attention_mask": mask, "completion": comp, "completion_length": lengths}


def read_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of pre-tokenised records; a bad line is an error naming file and line."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not rec.get("prompt_ids") or not rec.get("response_ids"):
            raise ValueError(f"{path}:{n}: record needs non-empty 'prompt_ids' and 'response_ids'")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no SFT records")
    return records


def sft_batches(records: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int = 0, pad_id: int = 0,
                shuffle: bool = True) -> grain.DatasetIterator:
    """A checkpointable Grain iterator of SFT batches (shuffled each epoch, repeated forever)."""
    ds = grain.MapDataset.source(list(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat().batch(batch_size, drop_remainder=True, batch_fn=lambda rs: collate_sft(rs, pad_id))
    return iter(ds.to_iter_dataset())


# ----------------------------------------------------------------------------- `jdelta sample` output


@dataclasses.dataclass(frozen=True)
class SampleRow:
    """One kept ``jdelta sample`` line: its line number, joined prompt record index, response ids."""

    line: int
    prompt_id: str
    record_index: int
    sample_index: int
    token_ids: tuple[int, ...]


def read_sample_output(path: str | Path, prompts, *, drop_truncated: bool = False,
                       vision_ids: Sequence[int] = (), retokenize: Any = None,
                       end_id: int | None = None) -> tuple[list[SampleRow], Any]:
    """Read ``jdelta sample`` output (its run directory, or the ``samples.jsonl`` in it) and join
    each line to its record in ``prompts`` (a records source, see ``jdelta.data.records``) by
    ``prompt_id``.

    Returns the kept rows and a :class:`jdelta.data.pipeline.SkipReport` of the lines left out:
    ``missing_prompt`` (no record with that id), ``truncated`` (``finish_reason == "length"``
    when ``drop_truncated``), ``vision_token_in_response`` (a response holding a vision
    placeholder id from ``vision_ids``). A malformed line raises naming file and line.

    ``retokenize``: a tokenizer; each response becomes its ``text`` tokenised by it, plus
    ``end_id`` after a stopped sample (``finish_reason == "stop"``): the responses of a teacher
    with another tokenizer (another model family) as the student's tokens.
    """
    from jdelta.data.pipeline import SkipReport

    path = Path(path)
    if path.is_dir():  # a `jdelta sample` run directory
        path = path / "samples.jsonl"
    skips = SkipReport()
    rows: list[SampleRow] = []
    id_map: dict[str, int] | None = None
    vision = set(int(v) for v in vision_ids)

    def record_id(i: int) -> str:
        return prompts.to_record(prompts[i], i).id

    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        pid, ids = d.get("prompt_id"), d.get("token_ids")
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"{where}: needs a non-empty string 'prompt_id'")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"{where}: needs non-empty 'token_ids' (a list of non-negative ints)")
        if d.get("finish_reason") not in ("stop", "length"):
            raise ValueError(f"{where}: finish_reason {d.get('finish_reason')!r}; expected 'stop' or 'length'")
        # fast path: the sampler's record_index, confirmed by id; else look the id up
        ri = d.get("record_index")
        if not (isinstance(ri, int) and 0 <= ri < len(prompts) and record_id(ri) == pid):
            if id_map is None:
                id_map = {}
                for i in range(len(prompts)):
                    id_map.setdefault(record_id(i), i)
            ri = id_map.get(pid)
        if ri is None:
            skips.add("missing_prompt", f"{where}: prompt_id {pid!r} is not in the prompt records")
            continue
        if drop_truncated and d["finish_reason"] == "length":
            skips.add("truncated", f"{where}: finish_reason 'length' (data.drop_truncated)")
            continue
        if retokenize is None and vision & set(ids):  # retokenized: the ids are another tokenizer's
            skips.add("vision_token_in_response", f"{where}: response holds vision placeholder ids "
                                                  f"{sorted(vision & set(ids))}")
            continue
        if retokenize is not None:
            text = d.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: needs a string 'text' to retokenize (data.response=text)")
            ids = list(retokenize(text, add_special_tokens=False)["input_ids"])
            if d["finish_reason"] == "stop" and end_id is not None:
                ids.append(int(end_id))
            if not ids:
                skips.add("empty_response", f"{where}: the response text is empty")
                continue
            if vision & set(ids):
                skips.add("vision_token_in_response", f"{where}: the retokenized response holds vision "
                                                      f"placeholder ids {sorted(vision & set(ids))}")
                continue
        rows.append(SampleRow(n, pid, int(ri), int(d.get("sample_index", 0)), tuple(ids)))
    if not rows:
        raise ValueError(f"{path}: no usable samples; {skips.summary()}")
    return rows, skips


class _JoinedSource:
    """A records source with one item per kept sample row: the row's prompt record."""

    def __init__(self, prompts, record_index: Sequence[int]):
        self._prompts, self._index = prompts, list(record_index)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        return self._prompts[self._index[i]]

    def to_record(self, raw, i):
        return self._prompts.to_record(raw, self._index[i])


class SampleSFTIterator(grain.DatasetIterator):
    """Prompt-pipeline batches of sample rows plus their responses: ``completion [B, T]``
    (right-padded), ``completion_length [B]``, ``sample_row [B]`` (-1 on padding rows) and
    ``record_index`` (the prompt record's). Checkpointable through the pipeline iterator's state.
    ``skip_report``: lines left out when reading plus records the pipeline left out."""

    def __init__(self, parent, rows: Sequence[SampleRow], read_skips, pad_id: int):
        super().__init__(parent)
        self._rows, self._read_skips, self._pad_id = list(rows), read_skips, pad_id

    @property
    def skip_report(self):
        from jdelta.data.pipeline import SkipReport

        merged = SkipReport.from_dict(self._read_skips.as_dict())
        for reason, n in self._parent.skip_report.counts.items():
            merged.counts[reason] += n
            merged.examples.setdefault(reason, list(self._parent.skip_report.examples.get(reason, [])))
        return merged

    def __next__(self) -> dict[str, np.ndarray]:
        b = dict(next(self._parent))
        rows = np.asarray(b["record_index"], np.int64)
        resp = [self._rows[r].token_ids if r >= 0 else () for r in rows]
        t = max(1, max(len(x) for x in resp))
        comp = np.full((len(rows), t), self._pad_id, np.int32)
        for i, x in enumerate(resp):
            comp[i, : len(x)] = x
        b["completion"], b["completion_length"] = comp, np.array([len(x) for x in resp], np.int32)
        b["sample_row"] = rows
        b["record_index"] = np.array([self._rows[r].record_index if r >= 0 else -1 for r in rows], np.int64)
        return b

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SampleSFTIterator({len(self._rows)} samples)"


def check_sample_tokenizer(samples: str | Path, tokenizer) -> None:
    """Refuse to train on ``jdelta sample`` token ids written by another tokenizer: the run
    directory's manifest records the sampler's tokenizer fingerprint (a bare ``samples.jsonl`` has none)."""
    from jdelta.models.loading import tokenizer_fingerprint

    path = Path(samples)
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())["inputs"]["tokenizer"]["fingerprint"]
    except (ValueError, KeyError, TypeError):
        return
    mine = tokenizer_fingerprint(tokenizer)
    if recorded != mine:
        raise ValueError(f"{path}: the samples' token ids are of another tokenizer (sha256 {recorded[:12]}, the data "
                         f"tokenizer's is {mine[:12]}): use data.response=text to retokenize the sampled text")


def sample_sft_batches(samples: str | Path, prompts, *, tokenizer, config, seed: int = 0, shuffle: bool = True,
                       drop_truncated: bool = False, process_index: int | None = None,
                       process_count: int | None = None, response: str = "token_ids") -> SampleSFTIterator:
    """SFT batches from ``jdelta sample`` output ``samples`` and the prompt records ``prompts``
    (a path or a records source) it was sampled from. ``config`` is the
    :class:`jdelta.data.pipeline.PipelineConfig` (use the sampler's image and chat settings);
    each batch is the pipeline's prompt batch (``pixel_values [P, D]``, ``image_grid_thw [N, 3]``)
    with the responses added (see :class:`SampleSFTIterator`). ``response="text"``: the responses are
    the samples' text tokenised by ``tokenizer`` (a teacher of another family; see
    :func:`read_sample_output`), else their ``token_ids`` as sampled."""
    from jdelta.data.pipeline import make_prompt_batches
    from jdelta.data.records import open_records
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.family import prompt_special_tokens

    if response not in ("token_ids", "text"):
        raise ValueError(f"response must be 'token_ids' or 'text', got {response!r}")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    sp = prompt_special_tokens(tok)
    if response == "token_ids":
        check_sample_tokenizer(samples, tok)
    src = open_records(prompts) if isinstance(prompts, (str, Path)) else prompts
    rows, skips = read_sample_output(samples, src, drop_truncated=drop_truncated, vision_ids=sp.vision_ids,
                                     retokenize=tok if response == "text" else None, end_id=sp.stop_ids[0])
    if skips.total:
        logger.warning("%s: %d samples kept; %s", samples, len(rows), skips.summary())
    joined = _JoinedSource(src, [r.record_index for r in rows])
    if process_index is None and process_count is None:  # one program (multi-host: the same global batches)
        from jdelta.distributed import prompt_batches

        parent = prompt_batches(joined, tokenizer=tok, seed=seed, shuffle=shuffle, config=config)
    else:
        parent = make_prompt_batches(joined, tokenizer=tok, seed=seed, shuffle=shuffle, config=config,
                                     process_index=process_index, process_count=process_count)
    return SampleSFTIterator(parent, rows, skips, int(sp.pad))
