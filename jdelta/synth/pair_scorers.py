"""Scorers for the pipeline: one interface, ``score(records, seed) -> list[entry]``.

* :class:`ModelPairScorer`: the real thing, :func:`jdelta.delta_scoring.score_prompts` (one
  :class:`~jdelta.delta_scoring.Scorer`, static or continuous batching) with a teacher and
  a student (n sampled answers each, Δ per prompt); its :class:`TeacherWriter` (the teacher as
  writer of new questions) samples from the same loaded teacher. Nothing else in
  :mod:`jdelta.synth` touches models or the score library.
* :class:`OraclePairScorer`: a deterministic "toy pair" for tests and benchmarks. The teacher
  answers the reference (wrong with probability ``teacher_noise``); the student answers the
  reference too, except for records whose family is in ``failing_families``, where it answers
  wrongly with probability ``fail_rate``. The answer texts then go through the same
  :func:`jdelta.delta_scoring.delta_records` as the real scorer (answer classing, every Δ metric,
  zero-delta tests, correctness), so both produce the same entry schema.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jdelta.config import SamplingConfig, to_dict
from jdelta.data.records import PromptRecord
from jdelta.synth.pipeline_config import ScorerConfig, WriterConfig


class PairScorer(Protocol):
    identity: dict[str, Any]
    metric: str

    def score(self, records: Sequence[PromptRecord], seed: int) -> list[dict]: ...


def _wrong_answers(rec: PromptRecord) -> list[str]:
    """Two distinct wrong answers for a record (by answer type)."""
    a = (rec.answer or "").strip()
    if rec.answer_type == "yes_no":
        return ["no" if a.lower() == "yes" else "yes"] * 2
    try:
        x = float(a.replace(",", ""))
        return [f"{x + 1:g}", f"{x * 2 + 3:g}"]
    except ValueError:
        return [f"{a} x", "none"]


class OraclePairScorer:
    """A toy teacher/student pair whose failures are known (see the module docstring)."""

    def __init__(self, cfg: ScorerConfig, *, unit_pad: int = 64):
        self.failing = frozenset(cfg.failing_families)
        self.n, self.fail_rate = int(cfg.sampling.n), float(cfg.fail_rate)
        self.teacher_noise, self.student_noise = float(cfg.teacher_noise), float(cfg.student_noise)
        self.delta = cfg.delta
        self.metric = cfg.delta.metric
        self.unit_pad = int(unit_pad)  # prompts per Δ call: one compiled program per process
        self.identity = {
            "kind": "oracle_pair",
            "failing_families": sorted(self.failing),
            "n": self.n,
            "fail_rate": self.fail_rate,
            "teacher_noise": self.teacher_noise,
            "student_noise": self.student_noise,
        }

    def answers(self, rec: PromptRecord, seed: int) -> tuple[list[str], list[str]]:
        """The pair's ``n`` teacher and ``n`` student answer texts for one record (deterministic)."""
        h = hashlib.sha256(f"{seed}|{rec.id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
        ref = rec.answer if rec.answer is not None else "unknown"
        wrong = _wrong_answers(rec)
        fam = rec.family or (rec.meta or {}).get("family", "")
        s_err = self.fail_rate if fam in self.failing else self.student_noise
        teacher = [wrong[0] if u < self.teacher_noise else ref for u in rng.random(self.n)]
        student = [wrong[int(v * 2)] if u < s_err else ref for u, v in zip(rng.random(self.n), rng.random(self.n), strict=True)]
        return teacher, student

    def score(self, records: Sequence[PromptRecord], seed: int) -> list[dict]:
        import jax

        from jdelta.delta_scoring import delta_records

        if not records:
            return []
        texts = [self.answers(r, seed) for r in records]
        # Pad to a fixed prompt count so the Δ programs compile once per process.
        pad = max(self.unit_pad, len(records))
        recs = list(records) + [records[-1]] * (pad - len(records))
        texts = texts + [texts[-1]] * (pad - len(records))
        rows = delta_records(recs, list(range(pad)), [t for t, _ in texts], [s for _, s in texts],
                             key=jax.random.key(seed), tests=self.delta)
        return rows[: len(records)]


def make_pair_scorer(cfg: ScorerConfig, *, unit_pad: int = 64) -> PairScorer:
    """The scorer the ``scorer`` config describes (the oracle pair, or the model pair, loaded)."""
    return OraclePairScorer(cfg, unit_pad=unit_pad) if cfg.kind == "oracle" else ModelPairScorer(cfg)


class ModelPairScorer:
    """Teacher and student checkpoints scored with :func:`jdelta.delta_scoring.score_prompts`.

    The one place the pipeline touches the score library: the models are loaded through a
    :class:`~jdelta.models.loading.ModelSession` (on the ``scorer.mesh``), which also keeps the
    compiled samplers across units; :meth:`teacher_writer` samples from the same teacher.
    """

    def __init__(self, cfg: ScorerConfig):
        from jdelta.data.tokenizer import load_tokenizer
        from jdelta.models.family import prompt_special_tokens
        from jdelta.models.loading import (
            ModelSession,
            check_checkpoint_dir,
            check_same_tokenizer,
            model_identity,
            tokenizer_fingerprint,
        )

        self.cfg = cfg
        self.metric = cfg.delta.metric
        teacher_dir = check_checkpoint_dir(cfg.teacher.path, "scorer.teacher")
        student_dir = check_checkpoint_dir(cfg.student.path, "scorer.student")
        tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else teacher_dir
        self.tokenizer = load_tokenizer(tok_dir)
        if cfg.tokenizer is None and (student_dir / "tokenizer.json").is_file():
            check_same_tokenizer(self.tokenizer, load_tokenizer(student_dir), ("teacher", "student"))
        self.special = prompt_special_tokens(self.tokenizer)
        self.session = ModelSession(cfg.mesh.make())
        self._scorer = None  # built on first use
        self.teacher = self.session.model(cfg.teacher, role="scorer.teacher")
        self.student = self.session.model(cfg.student, role="scorer.student")
        self.identity = {
            "kind": "model_pair",
            "teacher": model_identity(teacher_dir),
            "student": model_identity(student_dir),
            "tokenizer": {"path": str(tok_dir), "vocab_sha256": tokenizer_fingerprint(self.tokenizer)},
            "settings": to_dict({"sampling": cfg.sampling, "prompt": cfg.prompt, "delta": cfg.delta}),
        }

    def score(self, records: Sequence[PromptRecord], seed: int) -> list[dict]:
        """:func:`jdelta.delta_scoring.score_prompts` of ``records`` with ``seed``, through one
        :class:`~jdelta.delta_scoring.Scorer` kept across units (``scorer.engine``'s engines too)."""
        import jax

        from jdelta.delta_scoring import Scorer

        if not records:
            return []
        if self._scorer is None:
            self._scorer = Scorer(self.teacher, self.student, self.tokenizer, sampling=self.cfg.sampling,
                                  prompt=self.cfg.prompt, tests=self.cfg.delta, session=self.session,
                                  engine=self.cfg.engine, engine_slots=self.cfg.engine_slots)
        return self._scorer.score(list(records), jax.random.key(int(seed)))

    def teacher_writer(self, cfg: WriterConfig) -> TeacherWriter:
        """The teacher as writer (sampling settings from ``cfg``, one generation per seed)."""
        return TeacherWriter(self, cfg)


class TeacherWriter:
    """The teacher model writes: each instruction becomes the question of a prompt on its seed's
    image (the prompt pipeline's chat template and image processing), sampled once per seed."""

    def __init__(self, pair: ModelPairScorer, cfg: WriterConfig):
        from jdelta.completions import sampling_params
        from jdelta.models.loading import pipeline_config_for

        self.pair = pair
        batch_size = pair.cfg.sampling.batch_size
        self.pipeline = pipeline_config_for(pair.teacher.config, pair.cfg.prompt, batch_size=batch_size)
        sampling = SamplingConfig(n=1, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=batch_size)
        self.params = sampling_params(sampling, pair.special.stop_ids)
        self.sampler = pair.session.sampler(pair.teacher, pipeline=self.pipeline, pad_id=pair.special.pad)
        self.identity = {"kind": "teacher_writer", "temperature": cfg.temperature, "top_p": cfg.top_p,
                         "max_new_tokens": cfg.max_new_tokens, "teacher": pair.identity["teacher"]}

    def write(self, seeds: Sequence[PromptRecord], instructions: Sequence[str], seed: int) -> list[str]:
        """One generation per seed; a prompt the pipeline cannot process yields ``""`` (counted
        downstream as ``no_questions``)."""
        import jax

        from jdelta.completions import prompt_batches, sample_texts

        recs = [PromptRecord(id=s.id, images=list(s.images), question=ins, answer=None, answer_type="text",
                             category=s.category, family=s.family) for s, ins in zip(seeds, instructions, strict=True)]
        out = [""] * len(recs)
        key = jax.random.key(seed)
        for b, batch in enumerate(prompt_batches(recs, self.pair.tokenizer, self.pipeline)):
            texts, _ = sample_texts(self.sampler, self.pair.tokenizer, batch.inputs, self.params,
                                    jax.random.fold_in(key, b))
            for i, t in zip(batch.indices, texts, strict=True):
                out[i] = t[0]
        return out
