"""Parameter counts and shapes of a Qwen3-VL config, from ``jax.eval_shape`` (no weights are
allocated or read), and the bundled configs of the released sizes.

The bundled configs ship inside the package (``jdelta/configs/models/qwen3-vl-<size>.json``;
the repository's top-level ``configs/`` points there) and are found through
:mod:`importlib.resources`, so a wheel install finds them too.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

from flax import nnx

from jdelta.models.cue_recovery import CueRecoveryConfig, attach_cue_recovery
from jdelta.models.qwen3_vl.config import Qwen3VLConfig
from jdelta.models.qwen3_vl.weights import abstract_model

SIZES = ("2b", "4b", "8b", "32b")


def bundled_config(size: str) -> Path:
    """The shipped ``config.json`` of a released size (one of :data:`SIZES`)."""
    ref = resources.files("jdelta") / "configs" / "models" / f"qwen3-vl-{size.lower()}.json"
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"bundled config {path} not found (the install lacks jdelta/configs)")
    return path


def resolve_config(model: str) -> Path:
    """Size name (``2b`` ...), ``config.json`` file or checkpoint directory -> the ``config.json`` to read."""
    if model.lower() in SIZES:
        return bundled_config(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model {model!r}: not one of {', '.join(SIZES)} and no config.json at {path}")
    return path


def parameter_counts(config: Qwen3VLConfig, cue_recovery: CueRecoveryConfig | None = None) -> dict[str, int]:
    """Parameter counts by group, from the abstract model.

    Groups: ``vision`` (the whole vision tower incl. mergers), ``text`` (decoder layers and
    final norm), ``embeddings`` (token embedding, plus the LM head when untied), ``total``; with
    ``cue_recovery`` settings also ``cue_recovery`` (ViCuR's module, counted in ``total``; see
    :mod:`jdelta.models.cue_recovery` for how it compares with the paper's +100.7M / +536.9M).
    """
    model = abstract_model(config)
    counts = {"vision": 0, "text": 0, "embeddings": 0}
    if cue_recovery is not None:
        model = nnx.eval_shape(lambda: attach_cue_recovery(abstract_model(config), cue_recovery))
        counts["cue_recovery"] = 0
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        n = math.prod(var.get_value().shape)
        if path[0] == "cue_recovery":
            counts["cue_recovery"] += n
        elif path[0] == "visual":
            counts["vision"] += n
        elif path[0] == "lm_head" or path[-1] == "embed_tokens":
            counts["embeddings"] += n
        else:
            counts["text"] += n
    counts["total"] = sum(counts.values())
    return counts


def describe(config: Qwen3VLConfig) -> list[str]:
    """Human-readable shape lines of the text and vision towers."""
    t, v = config.text, config.vision
    return [
        f"text:   {t.num_hidden_layers} layers, hidden {t.hidden_size}, mlp {t.intermediate_size}, "
        f"heads {t.num_attention_heads}/{t.num_key_value_heads} kv, head_dim {t.head_dim}, vocab {t.vocab_size}, "
        f"tied lm_head: {config.tie_word_embeddings}",
        f"vision: {v.depth} blocks, hidden {v.hidden_size}, mlp {v.intermediate_size}, heads {v.num_heads}, "
        f"patch {v.patch_size}, merge {v.spatial_merge_size}, deepstack {list(v.deepstack_visual_indexes)}",
    ]
