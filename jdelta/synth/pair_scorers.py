"""Scorers for the pipeline: one interface, ``score(records, seed) -> list[entry]``.

* :class:`ModelPairScorer`: the real thing, :func:`jdelta.delta_scoring.score_prompts` with a teacher and
  a student (n sampled answers each, Δ per prompt).
* :class:`OraclePairScorer`: a deterministic "toy pair" for tests and benchmarks. The teacher
  answers the reference (wrong with probability ``teacher_noise``); the student answers the
  reference too, except for records whose family is in ``failing_families``, where it answers
  wrongly with probability ``fail_rate``. The answer texts then go through the same
  :func:`jdelta.delta_scoring.delta_records` as the real scorer (answer classing, every Δ metric,
  zero-delta tests, correctness), so both produce the same entry schema.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jdelta.data.records import PromptRecord


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

    def __init__(
        self,
        failing_families: Sequence[str],
        *,
        n: int = 8,
        fail_rate: float = 0.85,
        teacher_noise: float = 0.05,
        student_noise: float = 0.05,
        metric: str = "tv",
        unit_pad: int = 64,
        num_permutations: int = 99,
        num_posterior_draws: int = 100,
    ):
        self.failing = frozenset(failing_families)
        self.n, self.fail_rate = int(n), float(fail_rate)
        self.teacher_noise, self.student_noise = float(teacher_noise), float(student_noise)
        self.metric = metric
        self.unit_pad = int(unit_pad)
        self.num_permutations, self.num_posterior_draws = int(num_permutations), int(num_posterior_draws)
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
        rows = delta_records(
            recs, list(range(pad)), [t for t, _ in texts], [s for _, s in texts], key=jax.random.key(seed),
            metric=self.metric, num_permutations=self.num_permutations, num_posterior_draws=self.num_posterior_draws,
        )
        return rows[: len(records)]


class ModelPairScorer:
    """Teacher and student checkpoints scored with :func:`jdelta.delta_scoring.score_prompts`."""

    def __init__(self, teacher: str, student: str, *, tokenizer: str | None = None, mesh: str | None = None,
                 settings: Mapping[str, Any] | None = None):
        from jdelta.data.tokenizer import load_tokenizer
        from jdelta.delta_scoring import ScoreSettings
        from jdelta.models.loading import load_model, model_identity, parse_mesh, tokenizer_fingerprint

        self.mesh = parse_mesh(mesh)
        self.settings = ScoreSettings.make(**dict(settings or {}))
        self.metric = self.settings["metric"]
        self.tokenizer = load_tokenizer(tokenizer or teacher)
        self.teacher, _ = load_model(teacher, self.mesh)
        self.student, _ = load_model(student, self.mesh)
        self.identity = {
            "kind": "model_pair",
            "teacher": model_identity(teacher),
            "student": model_identity(student),
            "tokenizer": {"path": str(tokenizer or teacher), "vocab_sha256": tokenizer_fingerprint(self.tokenizer)},
            "settings": dict(self.settings),
        }

    def score(self, records: Sequence[PromptRecord], seed: int) -> list[dict]:
        from jdelta.delta_scoring import score_prompts

        if not records:
            return []
        st = {k: v for k, v in self.settings.items() if k != "seed"}
        return score_prompts(self.teacher, self.student, list(records), tokenizer=self.tokenizer, mesh=self.mesh,
                             seed=int(seed), **st)

    def teacher_writer(self, **kw):
        """A :class:`~jdelta.synth.writer.TeacherWriter` on this pair's teacher."""
        from jdelta.data.pipeline import PipelineConfig
        from jdelta.models.loading import image_config_for
        from jdelta.synth.writer import TeacherWriter

        st = self.settings
        cfg = PipelineConfig(batch_size=int(st["batch_size"]), image=image_config_for(self.teacher.config, st["max_pixels"]),
                             system=st["system"], enable_thinking=st["enable_thinking"], on_error="skip")
        return TeacherWriter(self.teacher, self.tokenizer, pipeline_config=cfg, mesh=self.mesh,
                             identity={"teacher": self.identity["teacher"]}, **kw)
