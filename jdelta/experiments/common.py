"""Shared pieces of the toy-world experiments (``jdelta experiment NAME``).

Everything runs in one process on the shipped trained toy pair (``docs/toy_world.md``), with each
compiled program made once and reused across conditions and seeds:

* :class:`SeedResult`: what one seed of an experiment returns (metrics per condition, curves);
* :func:`load_pair` (cached): teacher, student, tokenizer and world of a trained toy pair;
* :func:`heldout_records` / :func:`seed_records` / :func:`encode`: the world's disjoint splits,
  a different slice per experiment seed, encoded as fixed-length rows (with pixelated views);
* :func:`accuracy`: greedy exact-match held-out accuracy per family (:mod:`jdelta.toy.evaluate`);
* :func:`visual_reliance`: the mean drop of a model's answer-token log-prob when its image is
  pixelated (VA-OPD's pixelation), per family;
* :func:`score_delta` / :func:`zero_delta_share`: Δ per prompt for the pair
  (:func:`jdelta.delta_scoring.score_prompts`) and the zero-Δ share per family with intervals;
* :class:`Distiller` (:func:`distiller`, cached): in-process on-policy distillation of the student
  (:mod:`jdelta.distill`: the :class:`~jdelta.distill.on_policy.OnPolicyDistiller` producer and the
  jitted train step, no run directory, checkpoint or export) on a prompt set for N steps with a
  chosen loss, recording held-out accuracy per family and the reverse KL every k steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Curves = dict[str, dict[str, list[tuple[int, float]]]]
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class SeedResult:
    """One seed of an experiment.

    metrics: ``{condition: {metric: value}}`` (NaN where a metric does not apply).
    curves: ``{metric: {condition: [(step, value), ...]}}`` (the same steps for every seed).
    notes: free-form per-seed facts for the record (set sizes, ...); JSON-serialisable.
    """

    metrics: dict[str, dict[str, float]]
    curves: Curves = dataclasses.field(default_factory=dict)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": {c: {m: _num(v) for m, v in ms.items()} for c, ms in self.metrics.items()},
                "curves": {m: {c: [[int(s), _num(v)] for s, v in pts] for c, pts in cs.items()}
                           for m, cs in self.curves.items()},
                "notes": self.notes}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SeedResult:
        return cls(metrics={c: {m: _float(v) for m, v in ms.items()} for c, ms in d["metrics"].items()},
                   curves={m: {c: [(int(s), _float(v)) for s, v in pts] for c, pts in cs.items()}
                           for m, cs in d.get("curves", {}).items()},
                   notes=dict(d.get("notes", {})))


def _num(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _float(v: Any) -> float:
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------- the pair


@dataclasses.dataclass
class Pair:
    """A loaded trained toy pair: models, tokenizer, world, and caches of compiled distillers."""

    root: Path
    teacher: Any
    student: Any
    tokenizer: Any
    world: Any
    pad_id: int
    stop_ids: tuple[int, ...]
    distillers: dict[Any, Distiller] = dataclasses.field(default_factory=dict)
    session: Any = None

    @property
    def families(self) -> tuple[str, ...]:
        return self.world.names

    def detail(self, family: str) -> str:
        return self.world.spec(family).detail


@functools.lru_cache(maxsize=4)
def load_pair(root: str | None = None) -> Pair:
    """The trained toy pair at ``root`` (a ``jdelta toy-models`` output; None: the shipped one),
    loaded once per process."""
    from jdelta.config import build
    from jdelta.data.tokenizer import SpecialTokens, load_tokenizer
    from jdelta.models.loading import ModelSession
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
    from jdelta.toy import toy_info, trained_pair
    from jdelta.toy.world import WorldConfig

    teacher_dir, student_dir = trained_pair(root)
    world = build(WorldConfig, toy_info(teacher_dir)["world"])
    # Block-local vision attention (one block per image): the dense block-diagonal mask's result at a
    # fraction of the cost when a batch holds many images (every toy image has the same grid).
    frame = (world.width // 16) * (world.height // 16)
    teacher, _ = load_hf_checkpoint(teacher_dir, vision_max_frame_patches=frame)
    student, _ = load_hf_checkpoint(student_dir, vision_max_frame_patches=frame)
    tok = load_tokenizer(teacher_dir)
    sp = SpecialTokens.from_tokenizer(tok)
    return Pair(teacher_dir.parent, teacher, student, tok, world, int(sp.pad), tuple(sp.stop_ids),
                session=ModelSession())


# ----------------------------------------------------------------------------- data


def heldout_records(pair: Pair, per_family: int, seed: int) -> list:
    """``per_family`` records per family of the ``heldout`` split; seed ``k`` takes the k-th slice."""
    from jdelta.toy.world import world_records

    n = per_family * len(pair.families)
    return world_records(pair.world, "heldout", n, start=seed * n)


def seed_records(pair: Pair, n: int, seed: int, split: str = "seeds") -> list:
    """``n`` prompt records (families in turn) of ``split``; seed ``k`` takes the k-th slice."""
    from jdelta.toy.world import world_records

    return world_records(pair.world, split, n, start=seed * n)


def encode(pair: Pair, records: Sequence, *, length: int = 96):
    """Records -> :class:`jdelta.toy.train.Encoded` rows (answer-terminated, with pixelated views)."""
    from jdelta.toy.train import encode_records

    return encode_records(records, pair.tokenizer, width=pair.world.width, height=pair.world.height,
                          length=length, with_pixelated=True)


def subset(enc, rows: Sequence[int]):
    """The rows ``rows`` of an :class:`~jdelta.toy.train.Encoded`."""
    return enc.take(rows)


def prompt_batch(enc, rows: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Rows of ``enc`` as a left-padded prompt batch for the distiller / sampler: the chat prompt
    without the answer (``input_ids, attention_mask [B, L]``), ``pixel_values`` and
    ``pixel_values_pixelated [B*P, D]``, ``image_grid_thw [B, 3]``."""
    from jdelta.data.image_processor import normalise_patches
    from jdelta.toy.train import prompt_rows

    rows = np.asarray(rows, np.int64)
    n = len(rows)
    ids, mask = prompt_rows(enc, rows, pad_id)
    patches = enc.patches[rows]
    out = {"input_ids": ids, "attention_mask": mask,
           "pixel_values": normalise_patches(patches.reshape(-1, *patches.shape[2:])),
           "image_grid_thw": np.tile(np.asarray(enc.grid, np.int32), (n, 1))}
    if enc.pixelated is not None:
        pix = enc.pixelated[rows]
        out["pixel_values_pixelated"] = normalise_patches(pix.reshape(-1, *pix.shape[2:]))
    return out


# ----------------------------------------------------------------------------- measurements


def accuracy(model, enc, families: Sequence[str]) -> dict[str, float]:
    """Greedy exact-match accuracy per family (and ``"all"``, the mean over rows), in [0, 1]."""
    from jdelta.toy.evaluate import greedy_correct, mean_by_family

    return mean_by_family(greedy_correct(model, enc).astype(np.float64), enc.families, families)


def visual_reliance(model, enc, families: Sequence[str]) -> dict[str, float]:
    """Mean drop of the model's mean completion-token log-prob (the reference completion and its
    closing ``<|im_end|>``, teacher-forced; world v1: the answer) when its image is pixelated
    (VA-OPD's pixelation), per family and ``"all"`` (nats per token)."""
    from jdelta.toy.evaluate import mean_by_family, score_rows

    _, lp = score_rows(model, enc)
    _, lp_pix = score_rows(model, enc, pixelated=True)
    return mean_by_family(lp - lp_pix, enc.families, families)


def score_delta(pair: Pair, records: Sequence, *, n: int, seed: int, max_new_tokens: int = 16,
                num_permutations: int = 199, batch_size: int = 16) -> list[dict]:
    """Δ per prompt for the pair (``n`` answers per model at temperature 1; the zero-Δ flags of
    :mod:`jdelta.delta_scoring`, permutation test at 5%); entries in record order."""
    from jdelta.config import PromptConfig, SamplingConfig
    from jdelta.delta_scoring import DeltaTestConfig, score_prompts

    px = pair.world.pixels
    entries = score_prompts(
        pair.teacher, pair.student, list(records), tokenizer=pair.tokenizer,
        sampling=SamplingConfig(n=n, temperature=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
        prompt=PromptConfig(min_pixels=px, max_pixels=px),
        tests=DeltaTestConfig(num_permutations=num_permutations, num_posterior_draws=200), session=pair.session)
    bad = [e for e in entries if e["status"] != "scored"]
    if bad:
        raise RuntimeError(f"{len(bad)} toy prompts were not scored: {bad[0].get('reason')}: {bad[0].get('message')}")
    return entries


def is_zero_delta(entry: Mapping[str, Any], test: str = "permutation") -> bool:
    """The entry's zero-Δ flag under ``test`` (``permutation`` / ``exact`` / ``posterior``)."""
    return bool(entry["zero_delta"][test])


def zero_delta_share(entries: Sequence[Mapping[str, Any]], families: Sequence[str],
                     test: str = "permutation") -> dict[str, dict[str, float]]:
    """Per family (and ``all``): ``{"n", "zero", "share", "ci_low", "ci_high"}`` (95% Wilson) and the
    mean Δ (tv)."""
    from jdelta.divergence import proportion_interval

    out = {}
    for name in [*families, "all"]:
        rows = [e for e in entries if name == "all" or e.get("family") == name]
        z = sum(is_zero_delta(e, test) for e in rows)
        lo, hi = proportion_interval(z, len(rows))
        out[name] = {"n": len(rows), "zero": z, "share": z / len(rows) if rows else float("nan"),
                     "ci_low": lo, "ci_high": hi,
                     "mean_delta": float(np.mean([e["delta"]["tv"] for e in rows])) if rows else float("nan")}
    return out


# ----------------------------------------------------------------------------- distillation


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """One in-process on-policy distillation: ``steps`` updates of ``batch`` prompts x
    ``rollouts`` student samples; AdamW (``learning_rate``, betas 0.9/0.95, ``weight_decay``,
    cosine with ``warmup_fraction``, clip 1.0: the VA-OPD recipe's optimiser but the learning rate);
    rollouts at ``temperature`` / ``top_p`` up to ``max_new_tokens``; ``va_*``: VA-OPD's λ, τ and
    high-group fraction (``mode="va_opd"``)."""

    mode: Literal["reverse_kl", "va_opd"] = "reverse_kl"
    steps: int = 100
    batch: int = 8
    rollouts: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 16
    va_lambda: float = 0.5
    va_tau: float = 1.0
    va_high_fraction: float = 0.2


@dataclasses.dataclass
class DistillRun:
    """A finished distillation: the trained state, curves ``{metric: [(step, value)]}`` (held-out
    ``accuracy/<family>``, ``accuracy/all``, ``reverse_kl``, ``train/loss``), seconds."""

    state: Any
    curves: dict[str, list[tuple[int, float]]]
    seconds: float

    def model(self):
        return self.state.model()

    def final(self, metric: str) -> float:
        return self.curves[metric][-1][1]


def endless_rows(n: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of ``n`` rows, ``batch`` at a time, in seeded shuffled epochs (rows repeat
    across epochs; a set smaller than ``batch`` repeats within a batch)."""
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    while True:
        while len(order) < batch:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch]
        order = order[batch:]


class Distiller:
    """The student distilled from the teacher in-process (see the module docstring). Built once
    per ``(pair, settings)`` by :func:`distiller`: the rollout sampler, the teacher pass, the train
    step and the held-out reverse KL compile once and serve every run."""

    def __init__(self, pair: Pair, settings: DistillSettings):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jdelta import losses
        from jdelta.distill.batch import completion_hidden, model_inputs
        from jdelta.distill.on_policy import DistillConfig, OnPolicyDistiller, make_distill_loss
        from jdelta.distill.step import jit_train_step, make_train_step
        from jdelta.distill.train_state import OptimizerConfig, TrainState, make_optimizer, make_schedule

        self.pair, self.settings = pair, settings
        s = settings
        ocfg = OptimizerConfig(learning_rate=s.learning_rate, b1=0.9, b2=0.95, weight_decay=s.weight_decay,
                               warmup_fraction=s.warmup_fraction, clip_norm=1.0, total_steps=s.steps)
        self.tx = make_optimizer(ocfg)
        self._TrainState = TrainState
        # The sampler re-points a module at each state's parameters (nnx.update); every module and
        # state here starts from a clone, so no update can reach the shared pair.student.
        template = TrainState.create(nnx.clone(pair.student), self.tx).model()
        self.dcfg = DistillConfig(
            mode=s.mode, rollouts_per_prompt=s.rollouts, temperature=s.temperature, top_p=s.top_p,
            max_new_tokens=s.max_new_tokens, stop_token_ids=pair.stop_ids, pad_id=pair.pad_id, chunk_size=16,
            completion_bucket=s.max_new_tokens, prompt_bucket=64, vocab_size=len(pair.tokenizer), seed=0,
            va_lambda=s.va_lambda, va_tau=s.va_tau, va_high_fraction=s.va_high_fraction)
        self.producer = OnPolicyDistiller(template, pair.teacher, self.dcfg, iter(()))
        step_fn = make_train_step(make_distill_loss(self.dcfg), schedule=make_schedule(ocfg))
        self.train_step = jit_train_step(step_fn, self.initial_state(0), donate=False)
        vocab = self.dcfg.vocab_size

        def kl_per_response(state, batch, teacher_head):
            student = state.model()
            comp, mask = batch["completion"], batch["completion_mask"]
            hidden = completion_hidden(student, batch["input_ids"], model_inputs(batch), comp.shape[1])
            per_tok = losses.chunked_token_divergence(hidden, student.lm_head_weight(), batch["teacher_hidden"],
                                                      teacher_head, mask, kind="reverse_kl", chunk_size=16,
                                                      vocab_size=vocab)
            m = mask.astype(jnp.float32)
            return (per_tok * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)

        self._kl = jax.jit(kl_per_response)

    def initial_state(self, seed: int):
        """A fresh train state of the pair's student (cloned: training never touches ``pair.student``)."""
        from flax import nnx

        return self._TrainState.create(nnx.clone(self.pair.student), self.tx, seed=seed)

    def reverse_kl(self, state, prompts: Mapping[str, np.ndarray], families: Sequence[str], *, seed: int,
                   ) -> dict[str, float]:
        """Mean per-token reverse KL(student || teacher) on the student's own samples for ``prompts``
        (exact, full vocabulary), per response then averaged per family and ``all``."""
        import jax

        from jdelta.distill.batch import cut_at_padded_ids, cut_at_special, special_ids

        p = self.producer
        p.bind(state)
        res = p.sampler.generate({k: prompts[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                         "image_grid_thw")},
                                 self.dcfg.sampling_params(), rng=jax.random.fold_in(jax.random.key(seed), 7919))
        comp = np.asarray(res.tokens)
        lengths, _ = cut_at_special(comp, res.lengths, special_ids(p.student))
        lengths, _ = cut_at_padded_ids(comp, lengths, self.dcfg.vocab_size)
        train, _, _ = p.train_batch(prompts, comp, lengths)
        per = np.asarray(self._kl(state, train, p.teacher_head), np.float64)
        fam = np.repeat(np.asarray(families, dtype=object), self.dcfg.rollouts_per_prompt)
        out = {f: float(per[fam == f].mean()) for f in dict.fromkeys(families)}
        out["all"] = float(per.mean())
        return out

    def run(self, train_enc, *, seed: int, heldout=None, kl_enc=None, eval_every: int = 0,
            probes: Mapping[str, Callable[[Any], Mapping[str, float]]] | None = None,
            log: Log | None = None, label: str = "") -> DistillRun:
        """Distil the initial student on the rows of ``train_enc`` (seeded shuffled epochs) for
        ``settings.steps`` steps. Every ``eval_every`` steps (and at 0 and the end): held-out
        accuracy per family on ``heldout`` (curves ``accuracy/<family>``, ``accuracy/all``, in [0, 1]),
        the reverse KL on ``kl_enc``'s prompts (``reverse_kl/<family>``, ``reverse_kl/all``) and each
        ``probes[name](student model) -> {key: value}`` (curves ``<name>/<key>``)."""
        s, pair = self.settings, self.pair
        t0 = time.perf_counter()
        rows = endless_rows(len(train_enc), s.batch, seed)
        self.producer.prompts = (prompt_batch(train_enc, r, pair.pad_id) for r in rows)
        self.producer.cfg = dataclasses.replace(self.dcfg, seed=seed)
        state = self.initial_state(seed)
        kl_prompts = None if kl_enc is None else prompt_batch(kl_enc, np.arange(len(kl_enc)), pair.pad_id)
        curves: dict[str, list[tuple[int, float]]] = {}

        def add(step: int, values: Mapping[str, float], prefix: str) -> None:
            for k, v in values.items():
                curves.setdefault(f"{prefix}{k}", []).append((step, float(v)))

        def evaluate(step: int) -> None:
            if heldout is not None:
                add(step, accuracy(state.model(), heldout, pair.families), "accuracy/")
            if kl_prompts is not None:
                add(step, self.reverse_kl(state, kl_prompts, kl_enc.families, seed=seed + step), "reverse_kl/")
            for name, probe in (probes or {}).items():
                add(step, probe(state.model()), f"{name}/")

        if eval_every:
            evaluate(0)
        for step in range(s.steps):
            inp = self.producer.produce(state, step)
            state, m = self.train_step(state, inp.batch, inp.shared)
            curves.setdefault("train/loss", []).append((step + 1, float(m["loss"])))
            done = step + 1
            if eval_every and (done % eval_every == 0 or done == s.steps):
                evaluate(done)
                if log is not None:
                    acc = curves.get("accuracy/all", [(0, float("nan"))])[-1][1]
                    kl = curves.get("reverse_kl/all", [(0, float("nan"))])[-1][1]
                    log(f"  {label} step {done}/{s.steps}: held-out accuracy {100 * acc:.1f}%, reverse KL {kl:.4f}, "
                        f"loss {float(m['loss']):.4f} ({time.perf_counter() - t0:.0f}s)")
        self.producer.prompts = iter(())
        return DistillRun(state, curves, time.perf_counter() - t0)


def distiller(pair: Pair, settings: DistillSettings) -> Distiller:
    """The pair's :class:`Distiller` for ``settings`` (built on first use, then reused)."""
    if settings not in pair.distillers:
        pair.distillers[settings] = Distiller(pair, settings)
    return pair.distillers[settings]


# ----------------------------------------------------------------------------- misc


def family_metrics(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    """``{"<prefix>/<family>": value}`` for a per-family dict."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float:
    """First step of ``curve`` whose value is >= ``target`` (NaN if never)."""
    for step, v in curve:
        if v >= target - 1e-12:
            return float(step)
    return float("nan")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


__all__ = ["Curves", "DistillRun", "DistillSettings", "Distiller", "Log", "Pair", "SeedResult", "accuracy",
           "distiller", "encode", "endless_rows", "family_metrics", "heldout_records", "is_zero_delta", "load_pair",
           "prompt_batch", "score_delta", "seed_records", "steps_to_reach", "subset", "visual_reliance",
           "zero_delta_share"]
