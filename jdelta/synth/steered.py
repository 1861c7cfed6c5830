"""The procedural generator, steered: question families and difficulty drawn in proportion to
the failure modes' Δ mass.

Weights: for each targeted mode whose group is a generator family, the Δ mass is split over the
difficulty levels its seeds had (from the seed records' ``meta["difficulty"]``, default 2).
A floor (``floor`` x the largest weight, default 5%) keeps every family in play so a later
round can discover failures the seeds did not show. Without any targeted generator family the
draw is uniform (and the plan says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jdelta.data.charts import FAMILIES, FAMILY_KINDS, GeneratorConfig, generate_record
from jdelta.data.records import PromptRecord


def steering_weights(
    modes: Sequence[Mapping[str, Any]],
    difficulty_of: Mapping[str, int],
    *,
    floor: float = 0.05,
    levels: Sequence[int] = (1, 2, 3),
) -> dict[str, Any]:
    """``{"weights": {"family/level": w}, "uniform": bool}`` from targeted modes. Pure.

    ``modes`` are :func:`jdelta.synth.failure_modes.target_modes` entries (``group`` = family,
    ``ids``, ``delta_mass``); ``difficulty_of`` maps a seed id to its generator difficulty.
    """
    mass: dict[tuple[str, int], float] = {}
    for m in modes:
        fam = m["group"]
        if fam not in FAMILY_KINDS or not m["ids"]:
            continue
        lv = [int(difficulty_of.get(i, 2)) for i in m["ids"]]
        for level in set(lv):
            mass[(fam, level)] = mass.get((fam, level), 0.0) + m["delta_mass"] * lv.count(level) / len(lv)
    uniform = not mass or max(mass.values()) <= 0
    top = 1.0 if uniform else max(mass.values())
    weights = {}
    for fam in FAMILIES:
        for level in levels:
            w = mass.get((fam, level), 0.0)
            weights[f"{fam}/{level}"] = max(w, floor * top) if not uniform else 1.0
    total = sum(weights.values())
    return {"weights": {k: round(v / total, 9) for k, v in weights.items()}, "uniform": uniform}


def steered_plan(n: int, weights: Mapping[str, float], seed: int) -> list[tuple[str, int]]:
    """``n`` (family, difficulty) draws from ``weights`` (deterministic in ``seed``)."""
    keys = sorted(weights)
    p = np.asarray([float(weights[k]) for k in keys])
    rng = np.random.default_rng([int(seed), 0x57EE])
    picks = rng.choice(len(keys), size=int(n), p=p / p.sum()) if n else []
    out = []
    for i in picks:
        fam, level = keys[int(i)].split("/")
        out.append((fam, int(level)))
    return out


def steered_record(
    index: int, family: str, difficulty: int, *, seed: int, round_index: int, width: int, height: int,
    weight: float | None = None,
) -> PromptRecord:
    """Generated record ``index`` of the steered set of ``round_index`` (provenance added)."""
    cfg = GeneratorConfig(width=width, height=height, difficulty=int(difficulty))
    rec = generate_record(index, seed, family, config=cfg)
    rec.id = f"s{round_index}-{seed}-{index:07d}"
    rec.provenance = {
        "stage": "synthesis",
        "generator": "steered_procedural",
        "round": round_index,
        "seed_id": None,
        "steering": {"family": family, "difficulty": int(difficulty), "weight": weight},
        "source": rec.provenance,
    }
    return rec
