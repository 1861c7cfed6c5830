"""Off-policy fine-tuning: the student learns teacher-written responses (no teacher in the loop).

The setting where a DeltaPrompts dataset is used without the teacher: responses were
sampled once (``jdelta sample``) and are stored; the student minimises their negative
log-likelihood. The NLL is computed from the student's final hidden states and LM head
in chunks over the sequence, each chunk rematerialised in the backward pass, so
``[B, T, V]`` logits are never held (vocabulary 151,936).

Input: batches with left-padded prompts (``input_ids``, ``attention_mask``, optional
``pixel_values``/``image_grid_thw`` in the model layout) and right-padded responses
``completion [B, T]`` with ``completion_length [B]``. :func:`sft_batches` builds such a
checkpointable Grain iterator from pre-tokenised records.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdelta import losses
from jdelta.distill.loop import StepInput
from jdelta.distill.on_policy import (
    _rope_fn,
    assemble_batch,
    completion_hidden,
    cut_at_special,
    model_inputs,
    special_ids,
)
from jdelta.distill.train_state import TrainState
from jdelta.sharding import Rules, activation_sharding


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """chunk: positions per NLL chunk; reduction: ``token_mean`` (all response tokens of the
    batch) or ``batch_mean`` (per-response mean, then mean); pad_id; completion/prompt buckets
    as in :class:`jdelta.distill.on_policy.DistillConfig`."""

    chunk: int = 128
    reduction: str = "token_mean"
    pad_id: int = 0
    completion_bucket: int = 32
    prompt_bucket: int = 32

    def __post_init__(self):
        if self.reduction not in ("token_mean", "batch_mean"):
            raise ValueError(f"sft.reduction={self.reduction!r}; expected 'token_mean' or 'batch_mean'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> SFTConfig:
        cfg = dict(cfg or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(cfg) - known:
            raise ValueError(f"unknown sft options {sorted(set(cfg) - known)}; known: {sorted(known)}")
        return cls(**cfg)


def chunked_nll(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *, chunk_size: int) -> jax.Array:
    """Per-token ``-log p(target)`` ``[B, T]`` (float32) from ``hidden [B, T, H]`` and ``lm_head [H, V]``.

    ``chunk_size`` positions at a time under ``jax.checkpoint``: forward and backward peak at
    ``B * chunk_size * V`` logits instead of ``B * T * V``.
    """
    b, t, h = hidden.shape
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    hid = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, h).swapaxes(0, 1)
    tgt = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc, w):
        logits = jnp.einsum("bch,hv->bcv", hc, w.astype(hc.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return lse - jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]

    out = jax.lax.map(lambda xs: one(xs[0], xs[1], lm_head), (hid, tgt))
    return out.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def make_sft_loss(cfg: SFTConfig):
    """``loss_fn(student, batch, rng, shared) -> (loss, aux)``: NLL of ``completion`` given the prompt."""

    def loss_fn(student, batch, rng, shared):
        del rng, shared
        comp, mask = batch["completion"], batch["completion_mask"]
        hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), comp.shape[1])
        nll = chunked_nll(hidden, student.lm_head_weight(), comp, chunk_size=cfg.chunk)
        loss = losses.reduce_masked(nll, mask, cfg.reduction)
        maskf = mask.astype(jnp.float32)
        return loss, {"nll": (nll * maskf).sum() / jnp.maximum(maskf.sum(), 1.0), "completion_tokens": maskf.sum()}

    return loss_fn


class SFTProducer:
    """The loop's producer for SFT: next dataset batch -> per-sample train batch on the mesh."""

    def __init__(self, student_template: nnx.Module, batches: Iterator[Mapping[str, Any]], cfg: SFTConfig, *,
                 mesh: Mesh | None = None, rules: Rules | None = None):
        self.batches, self.cfg, self.mesh, self.rules = batches, cfg, mesh, rules
        self._rope = _rope_fn(student_template)
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
        train = {k: v for k, v in host.items() if not k.startswith("teacher_") and k not in (
            "prompt_index", "pixel_values_degraded")}
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
