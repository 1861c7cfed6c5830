"""Parameter counts and shapes of a model config of any family (jax.eval_shape: no weights are read).

``model`` takes a bundled config name (``qwen3-vl-<size>``: 2b, 4b, 8b, 32b; a bare size means
Qwen3-VL; ``gemma3-<size>``: 4b, 12b, 27b; files in ``configs/models/``), a ``config.json`` file, or a
checkpoint directory holding one (its family from ``model_type``); ``json`` prints the counts as JSON;
``cue_recovery`` adds ViCuR's cue-recovery module (Qwen3-VL; default settings: after layers 0, 5, 10, ...).
"""

from __future__ import annotations

import dataclasses
import json

from jdelta.errors import UserError
from jdelta.models.cue_recovery import CueRecoveryConfig
from jdelta.models.family import resolve_config


@dataclasses.dataclass(frozen=True)
class Config:
    """model: size name, config.json or checkpoint directory. json: print the counts as one JSON object.
    cue_recovery: count the student with ViCuR's cue-recovery module attached."""

    model: str
    json: bool = False
    cue_recovery: bool = False


def run(cfg: Config) -> int:
    try:
        family, path = resolve_config(cfg.model)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from e
    config = family.config_class.from_pretrained(path)
    if cfg.cue_recovery:
        if family.name != "qwen3_vl":
            raise UserError(f"cue_recovery: the cue-recovery module is counted for Qwen3-VL only, not {family.name}")
        counts = family.parameter_counts(config, CueRecoveryConfig())
    else:
        counts = family.parameter_counts(config)
    if cfg.json:
        print(json.dumps({"config": str(path), "family": family.name, **counts}))
        return 0
    print(f"config: {path} (family {family.name})")
    for line in family.describe(config):
        print(line)
    for name in ("vision", "projector", "text", "embeddings", "cue_recovery", "total"):
        if name not in counts:
            continue
        n = counts[name]
        print(f"{name + ':':14s}{n:,} ({n / 1e9:.3f}B)")
    return 0
