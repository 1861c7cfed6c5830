"""Parameter counts and shapes of a Qwen3-VL config (jax.eval_shape: no weights are read).

``model`` takes a size name (2b, 4b, 8b, 32b: the bundled ``configs/models/qwen3-vl-<size>.json``),
a ``config.json`` file, or a checkpoint directory holding one; ``json`` prints the counts as JSON;
``cue_recovery`` adds ViCuR's cue-recovery module (default settings: after layers 0, 5, 10, ...).
"""

from __future__ import annotations

import dataclasses
import json

from jdelta.models.cue_recovery import CueRecoveryConfig
from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.info import describe, parameter_counts, resolve_config


@dataclasses.dataclass(frozen=True)
class Config:
    """model: size name, config.json or checkpoint directory. json: print the counts as one JSON object.
    cue_recovery: count the student with ViCuR's cue-recovery module attached."""

    model: str
    json: bool = False
    cue_recovery: bool = False


def run(cfg: Config) -> int:
    path = resolve_config(cfg.model)
    config = Qwen3VLConfig.from_pretrained(path)
    counts = parameter_counts(config, CueRecoveryConfig() if cfg.cue_recovery else None)
    if cfg.json:
        print(json.dumps({"config": str(path), **counts}))
        return 0
    print(f"config: {path}")
    for line in describe(config):
        print(line)
    for name in ("vision", "text", "embeddings", "cue_recovery", "total"):
        if name not in counts:
            continue
        n = counts[name]
        print(f"{name + ':':14s}{n:,} ({n / 1e9:.3f}B)")
    return 0
