"""Build a trained toy pair: tokenizer, training data, teacher, student, held-out evaluation.

:func:`build_pair` is the library behind ``jdelta toy-models``. Everything is derived from the
:class:`PairConfig` (world, model sizes, training settings, seed), so the same config gives the
same files, byte for byte. The output directory::

    tokenizer/                      the world's byte-level BPE (Qwen3-VL specials and chat template)
    teacher/, student/              HF layout: config.json, model.safetensors, tokenizer files, toy.json
    metrics.json                    held-out accuracy per family (clean and pixelated), training curves
    report.md                       the same as tables
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jdelta.config import check, to_dict
from jdelta.toy.train import (
    Encoded,
    ModelSize,
    TrainSettings,
    encode_records,
    image_config,
    model_config,
    train_model,
)
from jdelta.toy.world import WorldConfig, answer_corpus, world_records

TOY_FILE = "toy.json"  # written last into each model directory: the world and how the model was made


@dataclass(frozen=True)
class PairConfig:
    """A toy teacher/student pair: the world, sizes, training settings and data amounts.

    seed: training seed (initialisation and batch order; the student uses ``seed + 1``; the
    ``seed`` of ``teacher_train`` / ``student_train`` must be left unset); the world's data comes
    from ``world.seed``. row_length: tokens per training row (prompt + completion).
    teacher_hint_fraction: share of the teacher's training rows whose question carries the
    record's ViCuR hint (``[Hint]: ...``), so that the teacher can use one (ViCuR's privileged
    teacher); the student never sees hints. student_families: the families the student is
    trained on (None: all of the world's); a family left out is a skill the student lacks and
    can learn from the teacher. teacher_init: a trained toy teacher to continue from instead of
    starting from scratch, a ``jdelta toy-models`` output directory or a shipped pair's name
    (``v1``, ``v2``; ``"shipped"``: ``v1``, as world v2's metrics record it): a curriculum's
    second phase (``teacher_train`` is then that phase), with that teacher's tokenizer and
    size (``teacher`` must equal it).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    teacher: ModelSize = field(default_factory=lambda: ModelSize(hidden=64, layers=2, intermediate=128,
                                                                 vision_hidden=32, vision_depth=1))
    student: ModelSize = field(default_factory=lambda: ModelSize(hidden=32, layers=1, intermediate=64,
                                                                 vision_hidden=16, vision_depth=1))
    teacher_train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=7000, pixelated_fraction=0.2))
    student_train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=2000, pixelated_fraction=0.2))
    train_records: int = 6000
    heldout_per_family: int = 200
    vocab_size: int = 512
    row_length: int = 48
    seed: int = 0
    teacher_hint_fraction: float = 0.0
    student_families: tuple[str, ...] | None = None
    teacher_init: str | None = None

    def __post_init__(self):
        check(self.train_records >= len(self.world.families), "train_records",
              f"must be >= the number of families, got {self.train_records}")
        check(self.heldout_per_family >= 1, "heldout_per_family", f"must be >= 1, got {self.heldout_per_family}")
        check(self.vocab_size >= 320, "vocab_size", f"must be >= 320, got {self.vocab_size}")
        check(self.row_length >= 16, "row_length", f"must be >= 16, got {self.row_length}")
        for name in ("teacher_train", "student_train"):
            check(getattr(self, name).seed == 0, name, "seed is set by pair.seed (the student gets seed + 1); "
                  "leave it out")
        check(0.0 <= self.teacher_hint_fraction <= 1.0, "teacher_hint_fraction",
              f"must be in [0, 1], got {self.teacher_hint_fraction}")
        if self.student_families is not None:
            unknown = [f for f in self.student_families if f not in self.world.names]
            check(not unknown and len(self.student_families) >= 1, "student_families",
                  f"must name at least one of the world's families {list(self.world.names)}, got "
                  f"{list(self.student_families)}")


def teacher_init_dir(cfg: PairConfig) -> tuple[Path, dict] | None:
    """``(directory, toy.json)`` of ``cfg.teacher_init`` (a directory, a shipped pair's name or
    ``"shipped"`` = ``v1``: that pair's teacher), checked to be a trained toy model of ``cfg.teacher``'s size."""
    from jdelta.errors import UserError
    from jdelta.toy import SHIPPED

    if cfg.teacher_init is None:
        return None
    name = "v1" if cfg.teacher_init == "shipped" else cfg.teacher_init
    path = SHIPPED[name] / "teacher" if name in SHIPPED else Path(cfg.teacher_init)
    if not (path / TOY_FILE).is_file():
        raise UserError(f"config key 'pair.teacher_init': {path} is not a trained toy model (no {TOY_FILE})")
    info = json.loads((path / TOY_FILE).read_text())
    size = info.get("size")
    if size != to_dict(cfg.teacher):
        raise UserError(f"config key 'pair.teacher_init': {path} is a teacher of size {size}, but pair.teacher is "
                        f"{to_dict(cfg.teacher)}")
    return path, info


def hinted_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """``[n]`` bool: which training rows carry the hint (a seeded draw, fixed per record)."""
    if fraction <= 0:
        return np.zeros(n, bool)
    return np.random.default_rng([seed, 7]).random(n) < fraction


def encode_split(cfg: PairConfig, tokenizer, split: str, n: int, *, with_pixelated: bool,
                 hinted: np.ndarray | bool = False, families: tuple[str, ...] | None = None,
                 length: int | None = None) -> Encoded:
    """``n`` records of ``split`` as training/evaluation rows of ``length`` tokens (default
    ``cfg.row_length``; ``families``: keep only those; ``hinted``: per record of the split, before
    that filter)."""
    w = cfg.world
    records = world_records(w, split, n)
    hint = np.broadcast_to(np.asarray(hinted, bool), (n,))
    keep = [i for i, r in enumerate(records) if families is None or r.family in families]
    return encode_records([records[i] for i in keep], tokenizer, width=w.width, height=w.height,
                          length=length or cfg.row_length, with_pixelated=with_pixelated, hinted=hint[keep])


def _write_model(model, config, tokenizer, path: Path, info: dict) -> None:
    """HF layout into ``path`` via a temporary sibling renamed at the end (never half-written)."""
    from jdelta.models.qwen3_vl.weights import save_hf_checkpoint

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(model, config, tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / TOY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def evaluate_pair(teacher, student, heldout: Encoded, world: WorldConfig,
                  heldout_hint: Encoded | None = None) -> dict[str, Any]:
    """Greedy held-out accuracy per family (clean and pixelated images) for both models, plus the
    teacher's visual advantage per family (mean drop of its completion-token log-prob when
    pixelated, the reference completion teacher-forced); with ``heldout_hint`` (the same rows with the hint), the accuracy given the hint."""
    from jdelta.toy.evaluate import by_family, greedy_correct, mean_by_family, score_rows

    out: dict[str, Any] = {}
    for role, model in (("teacher", teacher), ("student", student)):
        _, logp = score_rows(model, heldout)
        _, logp_pix = score_rows(model, heldout, pixelated=True)
        correct = greedy_correct(model, heldout)
        correct_pix = greedy_correct(model, heldout, pixelated=True)
        out[role] = {"accuracy": by_family(correct, heldout.families, world.names),
                     "pixelated_accuracy": by_family(correct_pix, heldout.families, world.names),
                     "answer_logprob": mean_by_family(logp, heldout.families, world.names),
                     "visual_advantage": mean_by_family(np.maximum(logp - logp_pix, 0.0), heldout.families,
                                                        world.names)}
        if heldout_hint is not None:
            out[role]["hint_accuracy"] = by_family(greedy_correct(model, heldout_hint), heldout.families, world.names)
    return out


def build_pair(cfg: PairConfig, out: str | os.PathLike, *, log: Callable[[str], None] = print,
               commit: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train the pair into ``out`` (see the module doc); a model directory already there (with its
    ``toy.json``) is kept. ``commit`` is called once the first artefact is on disk. Returns the metrics."""
    from jdelta.data.tokenizer import build_demo_tokenizer, load_tokenizer
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint
    from jdelta.toy import SHIPPED

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, dict[str, float]] = {}

    def clock(name: str, t0: float, c0: float) -> None:
        timing[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    t0, c0 = time.perf_counter(), time.process_time()
    tok_dir = out / "tokenizer"
    init_dir, init_toy = teacher_init_dir(cfg) or (None, None)
    if not (tok_dir / "tokenizer.json").is_file():
        if init_dir is not None:  # the starting teacher's tokenizer, unchanged
            load_tokenizer(init_dir).save_pretrained(str(tok_dir))
        else:
            build_demo_tokenizer(tok_dir, answer_corpus(cfg.world), vocab_size=cfg.vocab_size)
    tokenizer = load_tokenizer(tok_dir)
    if commit is not None:
        commit()
    n_families = len(cfg.world.families)
    hint = hinted_rows(cfg.train_records, cfg.teacher_hint_fraction, cfg.seed)
    data = {
        "teacher": encode_split(cfg, tokenizer, "train", cfg.train_records, hinted=hint,
                                with_pixelated=cfg.teacher_train.pixelated_fraction > 0),
        "student": encode_split(cfg, tokenizer, "train", cfg.train_records, families=cfg.student_families,
                                with_pixelated=cfg.student_train.pixelated_fraction > 0),
    }
    n_held = cfg.heldout_per_family * n_families
    heldout = encode_split(cfg, tokenizer, "heldout", n_held, with_pixelated=True)
    # The accuracy given the hint, only for a teacher trained with hints (rows longer by the hint).
    heldout_hint = None if cfg.teacher_hint_fraction <= 0 else encode_split(
        cfg, tokenizer, "heldout", n_held, with_pixelated=False, hinted=True, length=cfg.row_length + 64)
    clock("data", t0, c0)
    log(f"data: {len(data['teacher'])} teacher rows ({int(hint.sum())} with hints), {len(data['student'])} student "
        f"rows, {len(heldout)} held-out rows ({timing['data']['wall_s']:.0f} s)")
    weights = {f.family: f.weight for f in cfg.world.families}
    models, curves = {}, {}
    for role, size, settings, seed in (("teacher", cfg.teacher, cfg.teacher_train, cfg.seed),
                                       ("student", cfg.student, cfg.student_train, cfg.seed + 1)):
        train = data[role]
        path = out / role
        mcfg = model_config(tokenizer, size)
        frame = int(np.prod(train.grid))  # block-local vision attention, one block per image
        if (path / TOY_FILE).is_file():
            models[role] = load_hf_checkpoint(path, vision_max_frame_patches=frame)[0]
            curves[role] = json.loads((path / TOY_FILE).read_text()).get("loss_curve", [])
            log(f"{role}: kept {path}")
            continue
        t1, c1 = time.perf_counter(), time.process_time()
        settings = TrainSettings(**{**to_dict(settings), "seed": seed})

        def progress(step: int, loss: float, seconds: float, role=role, settings=settings) -> None:
            log(f"  {role} step {step}/{settings.steps} loss {loss:.3f} ({seconds:.0f} s)")

        start = continued_from = None
        if role == "teacher" and init_dir is not None:
            # a shipped pair's name as given, else the directory
            continued_from = {"path": cfg.teacher_init if cfg.teacher_init in ("shipped", *SHIPPED) else str(init_dir),
                              "toy": {k: v for k, v in init_toy.items() if k != "loss_curve"}}
            start = load_hf_checkpoint(init_dir, vision_max_frame_patches=frame)[0]
        model, losses = train_model(mcfg, train, settings, family_weights=weights, log=progress,
                                    log_every=max(1, settings.steps // 10), start=start)
        clock(role, t1, c1)
        every = max(1, settings.steps // 50)
        curve = [[i + every, float(losses[i: i + every].mean())] for i in range(0, settings.steps, every)]
        curves[role] = curve
        info = {"role": role, "world": to_dict(cfg.world), "size": to_dict(size), "train": to_dict(settings),
                "train_records": cfg.train_records, "training_rows": len(train),
                "families": sorted(set(train.families)),
                "hint_fraction": cfg.teacher_hint_fraction if role == "teacher" else 0.0,
                "continued_from": continued_from,
                "loss_curve": curve, "seconds": timing[role],
                "image": to_dict(image_config(cfg.world.width, cfg.world.height)),
                "made_by": "jdelta toy-models (jdelta.toy.build.build_pair)"}
        _write_model(model, mcfg, tokenizer, path, info)
        models[role] = model
        log(f"{role}: trained in {timing[role]['wall_s']:.0f} s wall, {timing[role]['cpu_s']:.0f} s CPU -> {path}")
    t2, c2 = time.perf_counter(), time.process_time()
    metrics = evaluate_pair(models["teacher"], models["student"], heldout, cfg.world, heldout_hint)
    clock("evaluate", t2, c2)
    metrics.update(world=to_dict(cfg.world), config=to_dict(cfg), timing=timing, loss_curves=curves,
                   heldout_rows=len(heldout))
    return metrics


def _pct(row: dict) -> str:
    return f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def target_checks(metrics: dict[str, Any], world: WorldConfig) -> dict[str, Any]:
    """The world's targets on the held-out set: teacher >= 70% over its families; the student within
    10 points on >= 2 families (zero-Δ) and >= 20 points behind on >= 2 (Δ > 0); pixelation costs the
    teacher more on the fine-detail families than on the coarse ones."""
    t, s = metrics["teacher"], metrics["student"]
    gaps = {f: t["accuracy"][f]["accuracy"] - s["accuracy"][f]["accuracy"] for f in world.names}
    drop = {f: t["accuracy"][f]["accuracy"] - t["pixelated_accuracy"][f]["accuracy"] for f in world.names}
    fine = [f.family for f in world.families if f.detail == "fine"]
    coarse = [f.family for f in world.families if f.detail == "coarse"]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    checks = {
        "teacher_accuracy": t["accuracy"]["all"]["accuracy"],
        "teacher_at_least_70": t["accuracy"]["all"]["accuracy"] >= 0.70,
        "zero_delta_families": sorted(f for f, g in gaps.items() if abs(g) <= 0.10),
        "delta_families": sorted(f for f, g in gaps.items() if g >= 0.20),
        "gap": gaps,
        "pixelation_drop": drop,
        "fine_drop_mean": mean([drop[f] for f in fine]),
        "coarse_drop_mean": mean([drop[f] for f in coarse]),
    }
    checks["two_zero_delta"] = len(checks["zero_delta_families"]) >= 2
    checks["two_delta"] = len(checks["delta_families"]) >= 2
    checks["fine_hurt_more"] = bool(checks["fine_drop_mean"] > checks["coarse_drop_mean"])
    return checks


def report_markdown(metrics: dict[str, Any], world: WorldConfig) -> str:
    """Held-out accuracy per family for both models (95% Wilson intervals), pixelated accuracy, the
    teacher's visual advantage, and the targets."""
    t, s = metrics["teacher"], metrics["student"]
    checks = target_checks(metrics, world)
    n = t["accuracy"]["all"]["n"]
    lines = ["# Toy teacher and student", "",
             f"Held-out set: {n} generated records ({n // len(world.families)} per family), never trained on; "
             "greedy answers, exact match; accuracy in % with 95% Wilson intervals.", "",
             "| family | needs | teacher | teacher, pixelated | student | student, pixelated | gap | teacher VA |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in world.families:
        f = spec.family
        lines.append(f"| {f} ({spec.kind}, level {spec.difficulty}) | {spec.detail} | {_pct(t['accuracy'][f])} | "
                     f"{100 * t['pixelated_accuracy'][f]['accuracy']:.1f} | {_pct(s['accuracy'][f])} | "
                     f"{100 * s['pixelated_accuracy'][f]['accuracy']:.1f} | {100 * checks['gap'][f]:+.1f} | "
                     f"{t['visual_advantage'][f]:.3f} |")
    lines.append(f"| **all** | | {_pct(t['accuracy']['all'])} | {100 * t['pixelated_accuracy']['all']['accuracy']:.1f} | "
                 f"{_pct(s['accuracy']['all'])} | {100 * s['pixelated_accuracy']['all']['accuracy']:.1f} | | |")
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines += ["", "Targets:", "",
              f"- teacher >= 70% over its families: {yes(checks['teacher_at_least_70'])} "
              f"({100 * checks['teacher_accuracy']:.1f}%)",
              f"- student within 10 points on >= 2 families (zero-Δ): {yes(checks['two_zero_delta'])} "
              f"({', '.join(checks['zero_delta_families']) or 'none'})",
              f"- student >= 20 points behind on >= 2 families (Δ > 0): {yes(checks['two_delta'])} "
              f"({', '.join(checks['delta_families']) or 'none'})",
              f"- pixelation costs the teacher more on fine-detail than on coarse families: "
              f"{yes(checks['fine_hurt_more'])} (mean drop {100 * checks['fine_drop_mean']:.1f} vs "
              f"{100 * checks['coarse_drop_mean']:.1f} points)", ""]
    timing = metrics.get("timing", {})
    if timing:
        lines.append("Time: " + ", ".join(f"{k} {v['wall_s']:.0f} s wall / {v['cpu_s']:.0f} s CPU"
                                           for k, v in timing.items()))
        lines.append("")
    return "\n".join(lines)


class HeldoutSetup(NamedTuple):
    """Two saved toy models loaded for evaluation, their world and its freshly generated held-out
    rows (``heldout_hint``: the same rows with the hint, when the teacher was trained with hints)."""

    teacher: Any
    student: Any
    world: WorldConfig
    heldout: Encoded
    heldout_hint: Encoded | None


def load_heldout(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, *,
                 heldout_per_family: int = 200, row_length: int = 96) -> HeldoutSetup:
    """The pair in ``teacher_dir`` / ``student_dir`` (their world from ``toy.json``) and its held-out set."""
    from jdelta.config import build
    from jdelta.data.tokenizer import load_tokenizer
    from jdelta.models.qwen3_vl.weights import load_hf_checkpoint

    info = json.loads((Path(teacher_dir) / TOY_FILE).read_text())
    world = build(WorldConfig, info["world"])
    tokenizer = load_tokenizer(teacher_dir)
    records = world_records(world, "heldout", heldout_per_family * len(world.families))
    heldout = encode_records(records, tokenizer, width=world.width, height=world.height, length=row_length,
                             with_pixelated=True)
    heldout_hint = None if not info.get("hint_fraction") else encode_records(
        records, tokenizer, width=world.width, height=world.height, length=row_length + 64, hinted=True)
    # block-local vision attention, one block per image (the dense block-diagonal result, far cheaper
    # with 64 images a batch)
    frame = int(np.prod(heldout.grid))
    teacher, _ = load_hf_checkpoint(teacher_dir, vision_max_frame_patches=frame)
    student, _ = load_hf_checkpoint(student_dir, vision_max_frame_patches=frame)
    return HeldoutSetup(teacher, student, world, heldout, heldout_hint)


def evaluate_dirs(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, *,
                  heldout_per_family: int = 200, row_length: int = 96) -> tuple[dict[str, Any], WorldConfig]:
    """:func:`evaluate_pair` for two saved toy models on a freshly generated held-out set
    (:func:`load_heldout`); returns ``(metrics, world)``."""
    s = load_heldout(teacher_dir, student_dir, heldout_per_family=heldout_per_family, row_length=row_length)
    return evaluate_pair(s.teacher, s.student, s.heldout, s.world, s.heldout_hint), s.world
